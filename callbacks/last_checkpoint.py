"""``last.ckpt`` that is always the newest state of a fit, for ``--ckpt_path last``."""

from __future__ import annotations

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """Writes ``<dirpath>/last.ckpt`` after every validation, every ``every_n_train_steps``
    training steps, and after the fit's last training step; nothing else. Every checkpoint of the
    fit also carries the global random streams, so that a resumed fit draws on where it stopped,
    and a validation gives back the streams it found, so that what it draws (some models draw in
    eval too) changes nothing the training draws.

    The last step's checkpoint is written as the step ends, not when fit ends: by then Lightning's
    loops count the running epoch as finished, so a fit resumed from it with a larger
    ``max_steps`` would skip the rest of that epoch's batches.

    A ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only when a top-k
    checkpoint is saved at that step (lightning 2.6), so after a validation that is not among the
    best, or at the end of fit, ``last`` is stale and a resumed or tested run silently uses old
    weights. Keep the best-k checkpoints in a monitored ``ModelCheckpoint`` listed before this
    one (its state, saved inside ``last.ckpt``, is then up to date at a validation step).

    Args:
        dirpath: the checkpoint folder (the best-k checkpoints may share it).
        every_n_train_steps: also write it this often, so that a killed long run loses at most
            this many steps (0: only at validation and the last step).
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 100) -> None:
        super().__init__(
            dirpath=dirpath,
            monitor=None,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
        )
        self._random_state_to_restore: dict | None = None
        self._random_state_before_validation: dict | None = None

    # The global random streams are part of a fit's state, which Lightning leaves out of its
    # checkpoints: with them a resumed fit draws what an uninterrupted one would (the segmenters'
    # flips, the world models' noise). Kept in the checkpoint itself (this callback's own state is
    # restored only into one of the same arguments); restored as training starts, after the
    # sanity validation.
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        checkpoint["random_state"] = random_state()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self._random_state_to_restore = checkpoint.get("random_state")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._random_state_to_restore is not None:
            set_random_state(self._random_state_to_restore)
            self._random_state_to_restore = None

    def _save_last_now(self, trainer: Trainer, again_this_step: bool = False) -> None:
        """``again_this_step``: also when this step was saved already (a validation after its
        step's own save, whose results the checkpoint should hold)."""
        if again_this_step and not trainer.sanity_checking:
            self._last_global_step_saved = -1
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args, **kwargs) -> None:
        every_n = self._every_n_train_steps and trainer.global_step % self._every_n_train_steps == 0
        if every_n or is_last_training_batch(trainer):
            self._save_last_now(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass  # step-based runs: the step interval, validation and the end of fit cover it

    # Without this, how often a fit validates would change what it learns wherever a model draws
    # in eval: transformers 5.17's Mask2Former decoder draws once a layer (its layerdrop test).
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._random_state_before_validation = random_state()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        set_random_state(
            self._random_state_before_validation
        )  # before the save: it holds the training's streams
        self._save_last_now(trainer, again_this_step=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Only for a fit stopped otherwise: saved here, the loops' progress counts the unfinished
        # epoch as done and a resumed fit skips the rest of it.
        self._save_last_now(trainer)


def is_last_training_batch(trainer: Trainer) -> bool:
    """Whether the fit stops after this batch: for reaching ``max_steps`` or ``max_epochs``, or
    because a callback asked it to (``max_time``'s Timer does so as the batch ends, before the
    checkpoint callbacks, which Lightning runs last) and ``min_steps`` / ``min_epochs`` let it
    (Lightning trains on until they are met)."""
    if trainer.should_stop and trainer.fit_loop._can_stop_early:
        return True
    if 0 < trainer.max_steps <= trainer.global_step:
        return True
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
    return trainer.is_last_batch and 0 < max_epochs <= trainer.current_epoch + 1


def random_state() -> dict:
    """The global torch random streams: the CPU's and, once CUDA is in use, the process's GPU's.

    Under DDP only rank 0's are saved, and every rank gets them back: with one seed, as
    ``seed_everything`` gives every rank, the ranks' streams are the same."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_random_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
