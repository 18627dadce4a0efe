"""What the LightningModules share about a fit that goes wrong or is resumed: a diverged loss is
one line whose advice fits the cause (bad samples, or a learning rate too high, with or without a
checkpoint to go back to), and a learning rate given when resuming is applied, not ignored."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from grounded_diffusion.errors import ConfigError, UserError


class TrainingDiverged(UserError, FloatingPointError):
    """The loss is NaN or infinite; nothing was updated with it."""


def nonfinite_samples(inputs: Sequence[Tensor], ids: Sequence[str]) -> list[str]:
    """The ids of the samples whose floating-point inputs hold a NaN or an infinity."""
    bad = torch.zeros(len(ids), dtype=torch.bool)
    for tensor in inputs:
        if tensor.is_floating_point():
            bad |= ~torch.isfinite(tensor.flatten(1)).all(1).cpu()
    return [sample_id for sample_id, is_bad in zip(ids, bad.tolist()) if is_bad]


def last_checkpoint_exists(trainer: Trainer) -> bool:
    """Whether ``--ckpt_path last`` finds a checkpoint in this fit's checkpoint folders."""
    return last_checkpoint(trainer) is not None


def last_checkpoint(trainer: Trainer) -> str | None:
    """The file ``--ckpt_path last`` resumes from (the newest of the checkpoint callbacks' last
    checkpoints, as Lightning picks it), or None."""
    found = {p for callback in trainer.checkpoint_callbacks for p in callback._find_last_checkpoints(trainer)}
    found = [p for p in found if os.path.isfile(p)]
    return max(found, key=os.path.getmtime) if found else None


def check_finite_loss(
    module: LightningModule,
    loss: Tensor,
    inputs: Sequence[Tensor] = (),
    ids: Sequence[str] = (),
    source: str = "the cache",
) -> None:
    """Raise ``TrainingDiverged`` when ``loss`` is not finite (only then are the inputs read):
    naming the samples whose inputs are not finite, else the learning rate and where to resume."""
    if torch.isfinite(loss):
        return
    where = f"The loss is {loss.item()} at step {module.global_step}; nothing was updated with it."
    bad = nonfinite_samples(inputs, ids) if ids else []
    if bad:
        raise TrainingDiverged(
            f"{where} The cause is the data, not the learning rate: sample {', '.join(bad[:5])} of {source} holds "
            "NaN or infinite values. Delete its file and rerun the predict command that built it (it makes it "
            "again), then fit again."
        )
    trainer = module._trainer
    lr = (
        trainer.optimizers[0].param_groups[0]["lr"]
        if trainer is not None and trainer.optimizers
        else module.hparams.get("lr")
    )
    go_on = (
        "and resume from the last checkpoint: --ckpt_path last"
        if trainer is not None and last_checkpoint_exists(trainer)
        else "and start the fit again (no checkpoint was written before this step)"
    )
    raise TrainingDiverged(
        f"{where} The learning rate is too high for it (now {lr:g}): lower model.init_args.lr or train in float32 "
        f"(trainer.precision: 32-true), {go_on}."
    )


def apply_resumed_lr(module: LightningModule, checkpoint: dict) -> None:
    """A fit resumed with another ``model.init_args.lr`` than its checkpoint's trains at the new one:
    the restored optimizer state would otherwise keep the old rate without a word. With an lr
    schedule, whose state is built on the old rate, it is refused instead."""
    resuming_fit = module._trainer is not None and module.trainer.state.fn == "fit"
    saved, configured = checkpoint.get("hyper_parameters", {}).get("lr"), module.hparams.get("lr")
    if not resuming_fit or saved is None or configured is None or saved == configured:
        return
    if any(checkpoint.get("lr_schedulers", [])):
        raise ConfigError(
            f"The checkpoint was trained at model.init_args.lr {saved:g} under an lr schedule, this fit has {configured:g}: "
            f"resume with --model.init_args.lr {saved:g}, or start a new fit at {configured:g}."
        )
    for state in checkpoint.get("optimizer_states", []):
        for group in state["param_groups"]:
            group["lr"] = configured
    rank_zero_info(f"Resuming at model.init_args.lr {configured:g} (the checkpoint trained at {saved:g}).")
