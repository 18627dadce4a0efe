"""Writes the triplets of a ``predict`` run into the cache, from every rank."""

from __future__ import annotations

from dataclasses import asdict

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from grounded_diffusion.data.cache import TripletCache, pack_masks


class TripletCacheWriter(BasePredictionWriter):
    """Each rank writes its own samples as they come (atomic files + manifest lines), so an
    interrupted build keeps everything finished and the rerun does the rest."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.cache: TripletCache = trainer.datamodule.cache
        backbone = pl_module.backbone
        metadata = {
            "storage": "features",
            "backbone": asdict(backbone.config),
            "capture_timestep": backbone.timestep,
            "real_image_mode": pl_module.hparams.real_image_mode,
            "feature_groups": backbone.feature_channels(),
            "feature_dtype": "float16",
        }
        if trainer.is_global_zero:
            self.cache.initialise(metadata)
        trainer.strategy.barrier()
        self.cache.initialise(metadata)  # the other ranks check that it matches

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for i, sample_id in enumerate(prediction["id"]):
            num_objects = len(prediction["categories"][i])
            bits, shape = pack_masks(prediction["masks"][i, :num_objects])
            tensors = {f"features.{g}": f[i] for g, f in enumerate(prediction["features"])}
            tensors.update(masks=bits, image=prediction["image"][i])
            record = {
                "id": sample_id,
                "prompt": prediction["prompt"][i],
                "categories": prediction["categories"][i],
                "split": prediction["split"][i],
            }
            self.cache.write(record, tensors, {"mask_shape": shape})
