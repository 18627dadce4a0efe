"""GroundingModule: frozen Stable Diffusion + trainable grounding head."""

from __future__ import annotations

from dataclasses import asdict

import torch
from lightning import LightningModule
from torch import Tensor, nn

from grounded_diffusion.data.sources import sample_seed
from grounded_diffusion.errors import ConfigError
from grounded_diffusion.losses import grounding_loss
from grounded_diffusion.metrics import CategoryIoU, summarize_iou
from grounded_diffusion.models.backbone import BackboneConfig, StableDiffusionBackbone
from grounded_diffusion.models.grounding_head import GroundingHead, HeadConfig

STAGES = ("val", "test")
BASELINES = ("all_foreground", "all_background")
REAL_IMAGE_MODES = ("noise", "ddim_inversion")


class GroundingModule(LightningModule):
    """Trains the grounding head on cached triplets; ``predict`` turns images into triplets.

    Args:
        backbone: the frozen diffusion model and where features are captured.
        head: widths of the grounding head.
        ignore_zero_masks: train without zero masks (paper §4.3); False = "normal training".
        lr / weight_decay / betas: Adam, the paper's defaults.
        mask_threshold: a pixel belongs to the object where sigmoid(logit) > this.
        real_image_mode: how images reach the capture step: ``noise`` or ``ddim_inversion``.
    """

    def __init__(
        self,
        backbone: BackboneConfig = BackboneConfig(),
        head: HeadConfig = HeadConfig(),
        ignore_zero_masks: bool = True,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        mask_threshold: float = 0.5,
        real_image_mode: str = "noise",
    ) -> None:
        super().__init__()
        if real_image_mode not in REAL_IMAGE_MODES:
            raise ConfigError(f"real_image_mode '{real_image_mode}' is not one of {REAL_IMAGE_MODES}")
        self.save_hyperparameters()
        # hparams may hold the CLI's raw config (dicts); the models are built from typed configs.
        self.backbone_config, self.head_config = backbone, head
        self.configure_models()
        self.results: dict[str, dict] = {}

    def configure_models(self) -> None:
        self.backbone = StableDiffusionBackbone(self.backbone_config)
        self.head = GroundingHead(
            self.backbone.feature_channels(),
            self.backbone.text_encoder.config.hidden_size,
            self.head_config,
        )

    def configure_metrics(self) -> None:
        num = len(self.category_split.categories)
        self.metrics = nn.ModuleDict({stage: CategoryIoU(num) for stage in STAGES})
        self.baselines = nn.ModuleDict({name: CategoryIoU(num) for name in BASELINES})

    def setup(self, stage: str) -> None:
        if stage == "predict":
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "category_split"):
            raise ConfigError("GroundingModule needs a datamodule with a category_split (e.g. TripletDataModule)")
        self.category_split = datamodule.category_split
        self.check_cache(datamodule.cache.metadata())
        embeds = self.backbone.category_embeddings(self.category_split.categories).float()
        self.register_buffer("category_embeds", embeds, persistent=False)
        self.configure_metrics()

    def check_cache(self, metadata: dict) -> None:
        """Features must come from the backbone setting this module was built for."""
        ours = asdict(self.backbone_config)
        theirs = metadata.get("backbone", {})
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if k != "dtype" and theirs.get(k) != v}
        if diff:
            details = "; ".join(f"{k}: cache {a!r}, model {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(
                f"The triplet cache was built with other backbone settings ({details}). Rebuild it "
                "with `predict` and these configs, or point data.init_args.cache_dir elsewhere."
            )

    # -- checkpoints hold the head only: the frozen backbone is reloaded from its weights ------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("backbone.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        backbone = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        checkpoint["state_dict"].update(backbone)

    # -- forward, loss ---------------------------------------------------------------------------

    def forward(self, features: list[Tensor], categories: Tensor, output_size: tuple[int, int]) -> Tensor:
        """Mask logits [B, O, H, W] for cached features and category indices (-1 = empty slot)."""
        embeds = self.category_embeds[categories.clamp(min=0)]
        return self.head([f.float() for f in features], embeds, categories >= 0, output_size)

    def _logits(self, batch: dict) -> Tensor:
        return self(batch["features"], batch["categories"], batch["masks"].shape[-2:])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits = self._logits(batch)
        loss = grounding_loss(logits, batch["masks"], batch["categories"], self.hparams.ignore_zero_masks)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"The loss is {loss.item()} at step {self.global_step} (samples {batch['id']}). "
                "Nothing was updated with it. Lower model.init_args.lr, or train in float32 "
                "(trainer.precision: 32), and resume from the last checkpoint with --ckpt_path last."
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["id"]))
        return loss

    def _evaluate(self, batch: dict, stage: str) -> Tensor:
        logits = self._logits(batch)
        loss = grounding_loss(logits, batch["masks"], batch["categories"], ignore_zero_masks=False)
        self.log(f"{stage}/loss", loss, batch_size=len(batch["id"]), sync_dist=True)
        preds = logits.sigmoid() > self.hparams.mask_threshold
        self.metrics[stage].update(preds, batch["masks"], batch["categories"])
        return preds

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        preds = self._evaluate(batch, "test")
        masks, categories = batch["masks"], batch["categories"]
        self.baselines["all_foreground"].update(torch.ones_like(masks), masks, categories)
        self.baselines["all_background"].update(torch.zeros_like(masks), masks, categories)
        return preds

    def _summarize(self, stage: str) -> dict:
        # compute() syncs the summed states across ranks: every rank must call it.
        summary = summarize_iou(self.metrics[stage].compute(), self.category_split)
        self.metrics[stage].reset()
        logged = {f"{stage}/{k}": v for k, v in summary.items() if k != "per_category"}
        logged.update({f"{stage}/iou/{c}": v for c, v in summary["per_category"].items()})
        self.log_dict(logged)
        return summary

    def on_validation_epoch_end(self) -> None:
        self.results["val"] = self._summarize("val")

    def on_test_epoch_end(self) -> None:
        summary = self._summarize("test")
        summary["baselines"] = {}
        for name, metric in self.baselines.items():
            summary["baselines"][name] = summarize_iou(metric.compute(), self.category_split)
            metric.reset()
        self.results["test"] = summary

    # -- predict: the real-image path of paper §4.1 -------------------------------------------

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Images + masks -> UNet features at the capture step (fp16), ready for the cache."""
        backbone = self.backbone
        latents = backbone.encode_images(batch["image"].float() / 127.5 - 1)
        prompt_embeds = backbone.encode_prompts(batch["prompt"])
        noise = torch.stack([
            torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(sample_seed(i)))
            for i in batch["id"]
        ]).to(latents)  # one draw per sample id: the same features in any batch, on any rank
        latents = backbone.latents_at_capture_step(latents, prompt_embeds, noise, self.hparams.real_image_mode)
        timesteps = torch.full((len(latents),), backbone.timestep, device=latents.device)
        features = backbone.unet_features(latents, timesteps, prompt_embeds)
        return {**batch, "features": [f.half() for f in features]}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.head.parameters(),
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )
