"""Saves a trained world model (VAE, text-to-image pipeline, oracle) in its shipping format when
fit ends: ``pl_module.export(dirpath)`` on rank 0."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer


class ExportPretrained(Callback):
    """
    Args:
        dirpath: the folder the model is saved to (replaced).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            pl_module.export(self.dirpath)
            print(f"Saved {type(pl_module).__name__}'s model to {self.dirpath}")
