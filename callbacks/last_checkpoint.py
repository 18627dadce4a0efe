"""``last.ckpt`` that is always the newest state of a fit, for ``--ckpt_path last``."""

from __future__ import annotations

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """Writes ``<dirpath>/last.ckpt`` after every validation, every ``every_n_train_steps``
    training steps, and at the end of fit; nothing else.

    A ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only when a top-k
    checkpoint is saved at that step (lightning 2.6), so after a validation that is not among the
    best, or at the end of fit, ``last`` is stale and a resumed or tested run silently uses old
    weights. Keep the best-k checkpoints in a monitored ``ModelCheckpoint`` listed before this
    one (its state, saved inside ``last.ckpt``, is then up to date at a validation step).

    Args:
        dirpath: the checkpoint folder (the best-k checkpoints may share it).
        every_n_train_steps: also write it this often, so that a killed long run loses at most
            this many steps (0: only at validation and the end of fit).
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 100) -> None:
        super().__init__(dirpath=dirpath, monitor=None, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps)

    def _save_last_now(self, trainer: Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args, **kwargs) -> None:
        if self._every_n_train_steps and trainer.global_step % self._every_n_train_steps == 0:
            self._save_last_now(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass  # step-based runs: the step interval, validation and the end of fit cover it

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_last_now(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_last_now(trainer)
