"""Protocol II (paper §5.2): a standard semantic segmenter trained on synthetic grounded images
(optionally + real images of seen classes), scored zero-shot on real images (ZS3)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor

from grounded_diffusion.checkpoint_io import checkpoint_fits, checkpoint_name
from grounded_diffusion.data.segmentation_sets import BackgroundMode
from grounded_diffusion.data.vocabulary import resolve_vocabulary
from grounded_diffusion.errors import ConfigError, check_choice
from grounded_diffusion.fit_faults import apply_resumed_lr, check_finite_loss
from grounded_diffusion.metrics import SemanticIoU, zs3_summary
from grounded_diffusion.models.segmenters import Architecture, Segmenter, build_segmenter, save_segmenter
from grounded_diffusion.quiet import quiet_known_noise

LrSchedule = Literal["poly", "constant"]


class SemanticSegmentationModule(LightningModule):
    """
    Args:
        vocabulary: ``pascal``, ``coco``, a classes file or a list of names: the classes the
            segmenter predicts; must be the datamodule's.
        background: ``ignore`` (no background class: the ZS3 convention on VOC) or ``class``
            (background is class 0); must be the datamodule's.
        architecture: ``maskformer`` (the paper's), ``mask2former`` (both from transformers),
            ``deeplabv3`` (torchvision, lighter) or ``lraspp`` (torchvision's LR-ASPP, from
            scratch: the shapes world's oracle).
        backbone: MaskFormer/Mask2Former: a transformers checkpoint (``microsoft/resnet-101``,
            the paper's) or ``null`` for a tiny random one (offline); DeepLabV3: ``resnet50``,
            ``resnet101`` or ``mobilenet_v3_large`` (also what ``null`` means); LR-ASPP:
            ``mobilenet_v3_small`` (``null``) or ``mobilenet_v3_large``.
        pretrained_backbone: start from the backbone's ImageNet weights.
        num_queries: MaskFormer/Mask2Former queries.
        lr / weight_decay: AdamW (paper: 1e-4 / 1e-4).
        lr_schedule: ``poly`` (MaskFormer's own recipe: the learning rate falls as
            ``(1 - step / total_steps) ** poly_power`` to 0 at the fit's last step) or ``constant``.
        poly_power: the exponent of ``poly`` (MaskFormer's: 0.9).
    """

    def __init__(
        self,
        vocabulary: str = "pascal",
        architecture: Architecture = "maskformer",
        backbone: str | None = "microsoft/resnet-101",
        pretrained_backbone: bool = True,
        num_queries: int = 100,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        background: str = "ignore",  # (not Literal: configs interpolate it, checked below)
        lr_schedule: LrSchedule = "poly",
        poly_power: float = 0.9,
    ) -> None:
        super().__init__()
        check_choice("architecture", architecture, Architecture)
        check_choice("model.init_args.background", background, BackgroundMode)
        check_choice("model.init_args.lr_schedule", lr_schedule, LrSchedule)
        self.save_hyperparameters()
        self.classes = resolve_vocabulary(vocabulary)
        self.num_classes = len(self.classes) + (background == "class")
        self.configure_models()
        self.results: dict[str, dict] = {}

    def configure_models(self) -> None:
        h = self.hparams
        self.segmenter: Segmenter = build_segmenter(
            h.architecture, self.num_classes, h.backbone, h.pretrained_backbone, h.num_queries
        )

    def setup(self, stage: str) -> None:
        quiet_known_noise(evaluating=stage != "fit")
        datamodule = self.trainer.datamodule
        if datamodule.category_split.categories != self.classes:
            raise ConfigError(
                f"The model predicts the classes of vocabulary {self.hparams.vocabulary!r} but the data is labelled "
                f"with {getattr(datamodule, 'vocabulary', datamodule.category_split.categories)!r}: set "
                "model.init_args.vocabulary and data.init_args.vocabulary alike."
            )
        if getattr(datamodule, "background", self.hparams.background) != self.hparams.background:
            raise ConfigError(
                f"The model treats background as '{self.hparams.background}' but the data as '{datamodule.background}': "
                "set model.init_args.background and data.init_args.background alike."
            )
        self.category_split = datamodule.category_split
        self.val_iou, self.test_iou = SemanticIoU(self.num_classes), SemanticIoU(self.num_classes)

    @staticmethod
    def _images(batch: dict) -> Tensor:
        return batch["image"].float() / 255

    def forward(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> class scores [B, K, H, W] (background = class 0 when it is a class)."""
        return self.segmenter.scores(images)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.segmenter.loss(self._images(batch), batch["labels"])
        check_finite_loss(self, loss)  # (images are uint8: always finite)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def _score_at_original_resolution(self, metric: SemanticIoU, batch: dict) -> None:
        """Each image's scores upsampled (bilinear) to its label map's own size, then the argmax:
        mIoU at original resolution, labels untouched, as the ZS3 literature scores."""
        scores = self(self._images(batch))
        for image_scores, labels in zip(scores, batch["labels"]):
            full = F.interpolate(image_scores[None], size=labels.shape, mode="bilinear", align_corners=False)
            metric.update(full.argmax(1)[0], labels)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._score_at_original_resolution(self.val_iou, batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._score_at_original_resolution(self.test_iou, batch)

    def _summarise(self, stage: str, metric: SemanticIoU) -> None:
        # every rank: compute() syncs
        summary = zs3_summary(metric.compute(), self.category_split, self.hparams.background == "class")
        metric.reset()
        # equal on every rank (compute() synced them): sync_dist is a no-op mean, and no advice
        self.log_dict({f"{stage}/{k}": v for k, v in summary.items() if k != "per_category"}, sync_dist=True)
        self.results[stage] = summary

    def on_validation_epoch_end(self) -> None:
        self._summarise("val", self.val_iou)

    def on_test_epoch_end(self) -> None:
        self._summarise("test", self.test_iou)

    def export(self, folder: str) -> None:
        """The trained segmenter alone (config.json + model.safetensors): what
        ``SegmenterOracle`` loads."""
        h = self.hparams
        save_segmenter(
            self.segmenter,
            folder,
            architecture=h.architecture,
            backbone=h.backbone,
            num_queries=h.num_queries,
            num_classes=self.num_classes,
            classes=list(self.classes),
            background=h.background,
        )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint_fits(checkpoint, self, checkpoint_name(self))
        # A fit resumed under another schedule would restart it silently (checkpoints from before
        # the schedule existed had none: constant). load_from_checkpoint has no trainer: nothing resumes.
        saved = checkpoint.get("hyper_parameters", {}).get("lr_schedule", "constant")
        resuming_fit = self._trainer is not None and self.trainer.state.fn == "fit"
        if resuming_fit and saved != self.hparams.lr_schedule:
            raise ConfigError(
                f"The checkpoint was trained with lr_schedule '{saved}', this fit has '{self.hparams.lr_schedule}': "
                f"resume it with --model.init_args.lr_schedule {saved}, or start a new fit."
            )
        apply_resumed_lr(self, checkpoint)

    def configure_optimizers(self) -> dict:
        h = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        if h.lr_schedule == "constant":
            return {"optimizer": optimizer}
        # Over the whole fit (max_steps, or the epochs' batches): a resumed fit goes on with the
        # schedule of the one it resumes (the scheduler's state is in last.ckpt).
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError(
                "lr_schedule 'poly' decays over the whole fit, which has no end here: set "
                "trainer.max_steps (or trainer.max_epochs), or model.init_args.lr_schedule: constant."
            )
        scheduler = torch.optim.lr_scheduler.PolynomialLR(
            optimizer, total_iters=int(total), power=h.poly_power
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
