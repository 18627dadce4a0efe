"""Writes the grounded images of a ``predict`` run: image, label map, overlay, COCO RLE masks."""

from __future__ import annotations

import time

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from callbacks.cache_writer import show_speed
from grounded_diffusion.data.grounded_folder import GroundedImageFolder
from grounded_diffusion.errors import ConfigError


class GroundedImageWriter(BasePredictionWriter):
    """Each rank writes its samples as they come (atomic files, manifest line last); when every
    rank is done, rank 0 writes the image-set lists and the COCO JSON.

    Args:
        mask_threshold: a category's mask is where its probability reaches this (COCO masks),
            and a pixel of the label map takes its most probable category above it.
        ignore_band: label-map pixels whose winning probability lies within this distance of
            the threshold get 255 ("ignore"), so that a segmenter does not learn from uncertain
            borders; 0 disables it.
        overlays: also write ``overlays/<id>.png`` (the label map painted over the image).
    """

    def __init__(self, mask_threshold: float = 0.5, ignore_band: float = 0.0, overlays: bool = True) -> None:
        super().__init__(write_interval="batch")
        if not 0 < mask_threshold < 1 or not 0 <= ignore_band < 0.5:
            raise ConfigError(
                f"mask_threshold must lie in (0, 1) and ignore_band in [0, 0.5); got {mask_threshold}, {ignore_band}"
            )
        self.mask_threshold, self.ignore_band, self.overlays = mask_threshold, ignore_band, overlays

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        self.folder: GroundedImageFolder = datamodule.folder
        self.classes = list(datamodule.classes)
        if trainer.is_global_zero:
            self.folder.initialise(self.classes)
        trainer.strategy.barrier()
        self.folder.initialise(self.classes)  # the other ranks check that it matches
        self.started, self.written = time.perf_counter(), 0

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        self.folder.write_batch(
            prediction, self.classes, self.mask_threshold, self.ignore_band, self.overlays
        )
        self.written += len(prediction["id"])
        show_speed(trainer, self.written, self.started)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier()  # every rank's samples are in the manifest
        if trainer.is_global_zero:
            summary = self.folder.finalize()
            print(
                f"grounded images: {summary['images']} in {self.folder.root} {summary['splits']} "
                "(VOC-style folder + annotations.json)"
            )
