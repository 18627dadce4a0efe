"""Writes the triplets of a ``predict`` run into the cache, from every rank."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from grounded_diffusion.data.cache import TripletCache, encode_image, pack_masks
from grounded_diffusion.data.prompts import PromptSet, group_of
from grounded_diffusion.errors import ConfigError, check_choice
from grounded_diffusion.reports import TRAINING_FREE

StorageMode = Literal["features", "latents"]
ImageFormat = Literal["jpeg", "png"]


class TripletCacheWriter(BasePredictionWriter):
    """Each rank writes its own samples as they come (atomic files + manifest lines), so an
    interrupted build keeps everything finished and the rerun does the rest.

    Args:
        storage: ``features`` keeps the captured UNet features (fp16); ``latents`` keeps the
            latent the UNet saw at the capture step (in the UNet's dtype) and its timestep, from
            which training recomputes the features (about 300x smaller at SD-1.5 shapes). Both
            keep the image, the masks (bit-packed), oracle scores and DAAM maps.
        image_format: ``jpeg`` (lossy; the image only feeds reports and overlays, training reads
            features and masks) or ``png`` (lossless, about 5x the bytes).
        image_quality: JPEG quality (1-100).
    """

    def __init__(
        self, storage: StorageMode = "features", image_format: ImageFormat = "jpeg", image_quality: int = 90
    ) -> None:
        super().__init__(write_interval="batch")
        check_choice("storage", storage, StorageMode)
        check_choice("image_format", image_format, ImageFormat)
        if not 1 <= image_quality <= 100:
            raise ConfigError(f"image_quality {image_quality} is not in 1..100")
        self.storage, self.image_format, self.image_quality = storage, image_format, image_quality

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # A build with nothing left to do never reaches on_predict_start; a cache whose cache.json
        # was lost (every sample done) gets it back here, or its samples would be stranded.
        if stage == "predict" and len(trainer.datamodule.predict_set) == 0:
            self._initialise_cache(trainer, pl_module)
            rank_zero_info(
                f"The cache at {self.cache.root} holds every sample this config asks for: nothing to build."
            )

    def _initialise_cache(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        self.cache: TripletCache = datamodule.cache
        metadata = {
            "storage": self.storage,
            "vocabulary": list(datamodule.category_split.categories),
            **pl_module.cache_metadata(prompts=isinstance(datamodule.source, PromptSet)),
        }
        if trainer.is_global_zero:
            self.cache.initialise(metadata)
        trainer.strategy.barrier()
        self.cache.initialise(metadata)  # the other ranks check that it matches

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._initialise_cache(trainer, pl_module)
        self.unseen = trainer.datamodule.category_split.unseen
        self.started, self.written = time.perf_counter(), 0
        # Encoding and writing run in one background thread while the GPU makes the next batch.
        self.pool, self.pending = ThreadPoolExecutor(1, thread_name_prefix="cache-writer"), []

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        # One device-to-host copy here; the thread then only touches CPU tensors.
        on_cpu = {
            k: [f.cpu() for f in v] if k == "features" else v.cpu() if isinstance(v, torch.Tensor) else v
            for k, v in prediction.items()
        }
        while self.pending and (self.pending[0].done() or len(self.pending) >= 2):  # at most two in flight
            self._collect(self.pending.pop(0), trainer)  # (and a failed write stops the run here)
        self.pending.append(self.pool.submit(self._write_batch, on_cpu, pl_module.backbone.timestep))

    def _write_batch(self, prediction: dict, timestep: int) -> int:
        for i, sample_id in enumerate(prediction["id"]):
            categories = prediction["categories"][i]
            tensors, metadata = sample_tensors(
                prediction, i, self.storage, timestep, self.image_format, self.image_quality
            )
            record = {
                "id": sample_id,
                "prompt": prediction["prompt"][i],
                "categories": categories,
                "split": prediction["split"][i],
                "group": group_of(categories, self.unseen),
            }
            if "source" in prediction:  # (the fingerprint of what the sample was made from)
                record["source"] = prediction["source"][i]
            self.cache.write(record, tensors, metadata)
        return len(prediction["id"])

    def _collect(self, future: Future, trainer: Trainer) -> None:
        self.written += future.result()  # a failed write raises here, in the run's thread
        show_speed(trainer, self.written, self.started)

    def _finish(self, trainer: Trainer) -> None:
        """Every submitted batch written (also when the run fails: finished samples are kept)."""
        pending, self.pending = self.pending, []
        try:
            for future in pending:
                self._collect(future, trainer)
        finally:
            self.pool.shutdown(wait=True)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=True)  # what was submitted still reaches the disk


def show_speed(trainer: Trainer, written: int, started: float) -> None:
    """samples/s of this rank on the progress bar (Lightning's own counts batches)."""
    rate = written / max(time.perf_counter() - started, 1e-9)
    text = f"{rate:.2f} samples/s, {written} written"
    bar = trainer.progress_bar_callback
    if (
        isinstance(bar, RichProgressBar)
        and bar.progress is not None
        and bar.predict_progress_bar_id is not None
    ):
        bar.progress.update(bar.predict_progress_bar_id, description=f"{bar.predict_description} ({text})")
    elif isinstance(bar, TQDMProgressBar) and bar._predict_progress_bar is not None:
        bar.predict_progress_bar.set_postfix_str(text)


def sample_tensors(
    prediction: dict, i: int, storage: str, timestep: int, image_format: str = "jpeg", image_quality: int = 90
) -> tuple[dict, dict]:
    """The tensors (and file metadata) of sample ``i`` of a prediction batch, as the cache keeps them."""
    num_objects = len(prediction["categories"][i])
    bits, shape = pack_masks(prediction["masks"][i, :num_objects])
    image_key, image = encode_image(prediction["image"][i], image_format, image_quality)
    tensors = {"masks": bits, image_key: image}
    if storage == "features":
        tensors.update({f"features.{g}": f[i].half() for g, f in enumerate(prediction["features"])})
    else:  # the latents as the UNet read them (predict_step hands them over in the UNet's dtype)
        tensors.update(latents=prediction["latents"][i], timestep=torch.tensor(timestep))
    for method in TRAINING_FREE:  # the training-free baseline's word maps, under its method's key
        if prediction.get(method) is not None:
            tensors[method] = prediction[method][i, :num_objects].half()
    if "oracle_scores" in prediction:
        tensors["oracle_scores"] = prediction["oracle_scores"][i, :num_objects].float()
    return tensors, {"mask_shape": shape}
