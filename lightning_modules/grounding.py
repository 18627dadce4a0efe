"""GroundingModule: frozen Stable Diffusion + trainable grounding head."""

from __future__ import annotations

import math
from dataclasses import asdict, is_dataclass

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from grounded_diffusion.checkpoint_io import checkpoint_fits, checkpoint_name
from grounded_diffusion.data.prompts import PromptSet
from grounded_diffusion.errors import ConfigError, check_choice, check_in_range
from grounded_diffusion.fit_faults import apply_resumed_lr, check_finite_loss
from grounded_diffusion.inference import RealImageMode, convert_images, ground_generated, synthesise_triplets
from grounded_diffusion.losses import grounding_loss
from grounded_diffusion.metrics import CategoryIoU, GroupedIoU, PairConfusion, confused_pairs, summarize_iou
from grounded_diffusion.models.backbones import BackboneConfig, build_backbone
from grounded_diffusion.models.concept_attention import argmax_masks
from grounded_diffusion.models.daam import WordMatching, normalized_heat_maps
from grounded_diffusion.models.grounding_head import GroundingHead, HeadConfig
from grounded_diffusion.models.oracle import Oracle
from grounded_diffusion.quiet import quiet_known_noise
from grounded_diffusion.reports import ARGMAX, LEGACY_BASELINE, TRAINING_FREE, TRIVIAL, table1_results


class GroundingModule(LightningModule):
    """Trains the grounding head on cached triplets; ``predict`` makes triplets: it synthesises
    them from prompts (Stable Diffusion + oracle masks) or converts images with masks.

    Args:
        backbone: the frozen diffusion model and where features are captured.
        head: widths of the grounding head.
        oracle: labels synthesised images (e.g. ``MaskRCNNOracle``); needed by synthesis only.
        guidance_scale: classifier-free guidance of the synthesis.
        ignore_zero_masks: train without zero masks (paper §4.3); False = "normal training".
        lr / weight_decay / betas: Adam, the paper's defaults.
        mask_threshold: a pixel belongs to the object where sigmoid(logit) > this.
        daam_threshold: τ of the training-free baseline (its normalised map > τ), 0.4 as Tang et
            al. for DAAM. The baselines are the backbone's: DAAM on a UNet, joint attention and
            ConceptAttention on a diffusion transformer; the ``daam_*`` settings name DAAM, whose
            τ convention the others share.
        daam_thresholds: a grid of τ to choose the baseline's threshold on seen categories only;
            the test then also reports it at the τ with the best seen mIoU (``tuned``).
        test_min_oracle_score: the automatic counterpart of the paper's hand-checked test sets:
            ``test`` leaves out of scoring (for ours, the baseline and the trivial predictors alike) every
            object whose mask is empty or whose oracle score is under this; the report says per
            group how many objects were scored and dropped, and gives the unfiltered numbers too.
            ``null`` scores every object.
        real_image_mode: how images reach the capture step: ``noise`` or ``ddim_inversion``.
        daam_word_matching: which occurrences of a category's words make its DAAM map when
            triplets are made: ``whole`` (not those inside a longer category of the prompt: the
            "dog" of "hot dog") or ``reference`` (all, as the ``daam`` package).
    """

    def __init__(
        self,
        backbone: BackboneConfig = BackboneConfig(),
        head: HeadConfig = HeadConfig(),
        oracle: Oracle | None = None,
        guidance_scale: float = 7.5,
        ignore_zero_masks: bool = True,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        mask_threshold: float = 0.5,
        daam_threshold: float = 0.4,
        daam_thresholds: list[float] | None = None,
        test_min_oracle_score: float | None = 0.7,
        real_image_mode: RealImageMode = "noise",
        daam_word_matching: WordMatching = "whole",
    ) -> None:
        super().__init__()
        check_choice("real_image_mode", real_image_mode, RealImageMode)
        check_choice("daam_word_matching", daam_word_matching, WordMatching)
        for key, value, default in [
            ("mask_threshold", mask_threshold, 0.5),
            ("daam_threshold", daam_threshold, 0.4),
            ("test_min_oracle_score", test_min_oracle_score, 0.7),
            *(("daam_thresholds", t, None) for t in daam_thresholds or []),
        ]:
            check_in_range(f"model.init_args.{key}", value, 0.0, 1.0, default)
        check_in_range("model.init_args.lr", lr, 0.0, None, 1e-4)
        check_in_range("model.init_args.weight_decay", weight_decay, 0.0, None, 1e-4)
        self.save_hyperparameters(ignore=["oracle"])
        # A checkpoint holds no pickled class, which a weights-only load refuses: configs built in
        # Python are saved as dicts, as the CLI saves its raw config. The models take typed ones.
        for name in ("backbone", "head"):
            if is_dataclass(self.hparams[name]):
                self.hparams[name] = asdict(self.hparams[name])
        backbone = BackboneConfig(**backbone) if isinstance(backbone, dict) else backbone
        head = HeadConfig(**head) if isinstance(head, dict) else head
        self.backbone_config, self.head_config, self.oracle = backbone, head, oracle
        self.configure_models()
        self.results: dict[str, dict] = {}
        self.samples_source = "the training data"

    def configure_models(self) -> None:
        self.backbone = build_backbone(self.backbone_config)
        self.head = GroundingHead(
            self.backbone.feature_channels(),
            self.backbone.text_dim,
            self.head_config,
            num_timesteps=self.backbone_config.num_timesteps,
        )

    @property
    def baseline_thresholds(self) -> dict[str, dict[str, float | str]]:
        """The backbone's training-free baselines (DAAM; on a diffusion transformer, joint
        attention and ConceptAttention) at the configured τ, and at every τ of the tuning grid:
        ``{"daam": {"daam": 0.4, "daam@0.2": 0.2, ...}}`` (``table1_results``). ConceptAttention
        is also scored by its argmax over the concepts, as its paper scores several classes."""
        grid = self.hparams.daam_thresholds or []
        methods = [
            self.backbone.baseline_method,
            *(["concept_attention"] if self.backbone.concept_attention else []),
        ]
        thresholds = {m: {m: self.hparams.daam_threshold, **{f"{m}@{t:g}": t for t in grid}} for m in methods}
        if self.backbone.concept_attention:
            thresholds["concept_attention"]["concept_attention@argmax"] = ARGMAX
        return thresholds

    def configure_metrics(self) -> None:
        variants = [key for scored in self.baseline_thresholds.values() for key in scored]
        num, methods = len(self.category_split.categories), ["ours", *variants, *TRIVIAL]
        self.val_iou = CategoryIoU(num)
        self.test_iou = GroupedIoU(num, methods)
        filtered = self.hparams.test_min_oracle_score is not None
        self.test_iou_unfiltered = GroupedIoU(num, methods) if filtered else None
        self.test_pairs = PairConfusion(num)  # ours: which categories' masks land on each other
        self.baselines_seen: set[str] = set()  # the training-free methods whose maps the test data holds

    def check_datamodule(self, datamodule) -> None:
        """Config-time check (the CLI calls it before any run): synthesis needs an oracle that
        can label every category the prompts may name."""
        if isinstance(getattr(datamodule, "source", None), PromptSet):
            if self.oracle is None:
                raise ConfigError(
                    "data.init_args.source is a PromptSet (synthesis), which needs "
                    "model.init_args.oracle, e.g. class_path: grounded_diffusion.models.oracle.MaskRCNNOracle"
                )
            self.oracle.check_categories(datamodule.category_split.categories)

    def cache_metadata(self, prompts: bool) -> dict:
        """How this module makes triplets, recorded in the cache (``cache.json``)."""
        backbone = self.backbone
        metadata = {
            "backbone": backbone.config.identity(),
            "capture_timestep": backbone.timestep,
            "feature_groups": backbone.feature_channels(),
            "daam_word_matching": self.hparams.daam_word_matching,
        }
        if backbone.concept_attention:  # its maps' settings (not the features')
            blocks = [f"transformer_blocks.{i}" for i in backbone.concept_blocks]
            metadata["concept_attention"] = {
                "blocks": blocks,
                "background": list(backbone.config.concept_background),
            }
        if prompts:
            metadata.update(guidance_scale=self.hparams.guidance_scale, oracle=self.oracle.describe())
        else:
            metadata.update(real_image_mode=self.hparams.real_image_mode)
        return metadata

    def setup(self, stage: str) -> None:
        quiet_known_noise(evaluating=stage != "fit")
        device = self.trainer.strategy.root_device
        if device.type == "cpu" and self.backbone.dtype == torch.float16:
            raise ConfigError(
                "model.init_args.backbone.dtype is float16 but this run is on the CPU, where float16 UNet "
                "kernels are missing or very slow: use float32 (experiments/offline.yaml does) or bfloat16, "
                "or run on a GPU."
            )
        datamodule = self.trainer.datamodule
        if stage == "predict":
            self.check_datamodule(datamodule)
            self.predict_mode = getattr(datamodule, "predict_mode", "triplets")
            if self.oracle is not None and isinstance(getattr(datamodule, "source", None), PromptSet):
                self.oracle.build()  # before Lightning moves the module to its device
            return
        if not hasattr(datamodule, "category_split"):
            raise ConfigError(
                "GroundingModule needs a datamodule with a category_split (e.g. TripletDataModule)"
            )
        self.category_split = datamodule.category_split
        self.samples_source = f"the triplet cache {datamodule.cache.root}"  # (for errors that name a sample)
        self.check_cache(datamodule.cache.metadata())
        embeds = self.backbone.category_embeddings(self.category_split.categories).float()
        self.register_buffer("category_embeds", embeds, persistent=False)
        self.configure_metrics()

    def check_cache(self, metadata: dict) -> None:
        """Features must come from the backbone setting this module was built for."""
        ours = self.backbone_config.identity()
        theirs = metadata.get("backbone", {})
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if k != "dtype" and theirs.get(k) != v}
        if diff:
            details = "; ".join(f"{k}: cache {a!r}, model {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(
                f"The triplet cache was built with other backbone settings ({details}). Rebuild it "
                "with `predict` and these configs, or point data.init_args.cache_dir elsewhere."
            )

    # -- checkpoints hold the head only: the frozen models are reloaded from their weights ----

    def _frozen_state(self) -> dict[str, Tensor]:
        frozen = {"backbone": self.backbone, "oracle": self.oracle}
        return {
            f"{name}.{k}": v
            for name, module in frozen.items()
            if module is not None
            for k, v in module.state_dict().items()
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(("backbone.", "oracle."))]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        head = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        checkpoint_fits(checkpoint, self, checkpoint_name(self), state=head)
        state.update(self._frozen_state())
        apply_resumed_lr(self, checkpoint)

    # -- forward, loss ---------------------------------------------------------------------------

    def forward(self, features: list[Tensor], categories: Tensor, output_size: tuple[int, int]) -> Tensor:
        """Mask logits [B, O, H, W] for cached features and category indices (-1 = empty slot)."""
        embeds = self.category_embeds[categories.clamp(min=0)]
        return self.head([f.float() for f in features], embeds, categories >= 0, output_size)

    def _features(self, batch: dict) -> list[Tensor]:
        if "features" in batch:
            return batch["features"]
        # Replay storage: the frozen UNet recomputes the features from the stored latent.
        return self.backbone.replay_features(batch["latents"], batch["timestep"], batch["prompt"])

    def _logits(self, batch: dict) -> Tensor:
        return self(self._features(batch), batch["categories"], batch["masks"].shape[-2:])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        logits = self._logits(batch)
        loss = grounding_loss(logits, batch["masks"], batch["categories"], self.hparams.ignore_zero_masks)
        inputs = batch["features"] if "features" in batch else [batch["latents"]]
        check_finite_loss(self, loss, inputs, batch["id"], self.samples_source)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["id"]))
        return loss

    def _evaluate(self, batch: dict, stage: str) -> Tensor:
        logits = self._logits(batch)
        loss = grounding_loss(logits, batch["masks"], batch["categories"], ignore_zero_masks=False)
        self.log(f"{stage}/loss", loss, batch_size=len(batch["id"]), sync_dist=True)
        return logits.sigmoid() > self.hparams.mask_threshold

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        preds = self._evaluate(batch, "val")
        self.val_iou.update(preds, batch["masks"], batch["categories"])
        return preds

    def scored_objects(self, batch: dict) -> Tensor:
        """[B, O] bool: the test objects that count. Without the filter, every real slot; with it,
        those whose mask is not empty and whose oracle score (synthesis) reaches the minimum."""
        categories, min_score = batch["categories"], self.hparams.test_min_oracle_score
        scored = categories >= 0
        if min_score is not None:
            scored &= batch["masks"].flatten(2).any(-1)
            if "oracle_scores" in batch:
                scored &= batch["oracle_scores"] >= min_score
        return scored

    def baseline_maps(self, batch: dict, method: str) -> Tensor | None:
        """The cached maps of ``method``; caches from before baselines were keyed by method hold
        every backbone's under "daam" (read with a one-line notice)."""
        if method in batch or method != self.backbone.baseline_method or LEGACY_BASELINE not in batch:
            return batch.get(method)
        if not getattr(self, "_legacy_notice", False):
            self._legacy_notice = True
            rank_zero_info(
                f"The cache keeps the {TRAINING_FREE[method]} maps under '{LEGACY_BASELINE}' (written "
                f"before baselines were named by method): reading them as '{method}'."
            )
        return batch[LEGACY_BASELINE]

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        """Ours, the training-free baseline (from the cached maps) and the trivial predictors on
        the same samples."""
        preds = self._evaluate(batch, "test")
        masks, categories = batch["masks"], batch["categories"]
        predictions = {"ours": preds, TRIVIAL[0]: torch.ones_like(masks), TRIVIAL[1]: torch.zeros_like(masks)}
        for method, variants in self.baseline_thresholds.items():
            maps = self.baseline_maps(batch, method)
            if maps is None:
                continue
            self.baselines_seen.add(method)
            heat = normalized_heat_maps(maps, masks.shape[-2:])
            for key, threshold in variants.items():
                predictions[key] = (
                    argmax_masks(maps, masks.shape[-2:]) if threshold == ARGMAX else heat > threshold
                )
        scored = categories.masked_fill(~self.scored_objects(batch), -1)  # dropped objects: empty slots
        self.test_pairs.update(preds, masks, scored, categories)
        for method, pred in predictions.items():
            self.test_iou.update(method, pred, masks, scored, batch["group"])
            if self.test_iou_unfiltered is not None:
                self.test_iou_unfiltered.update(method, pred, masks, categories, batch["group"])
        return preds

    def _log_summary(self, prefix: str, summary: dict) -> None:
        logged = {f"{prefix}/{k}": v for k, v in summary.items() if k != "per_category"}
        logged.update({f"{prefix}/iou/{c}": v for c, v in summary["per_category"].items()})
        self.log_dict(logged, sync_dist=True)  # equal on every rank (the metric synced them): a no-op mean

    def on_validation_epoch_end(self) -> None:
        # compute() syncs the summed states across ranks: every rank must call it.
        summary = summarize_iou(self.val_iou.compute(), self.category_split)
        self.val_iou.reset()
        self._log_summary("val", summary)
        self.results["val"] = summary

    def on_test_epoch_end(self) -> None:
        table = self.test_iou.compute(self.category_split)
        self.test_iou.reset()
        self._log_summary("test", table["ours"]["all"])
        thresholds = {m: v for m, v in self.baseline_thresholds.items() if m in self.baselines_seen}
        for method in ("ours", *thresholds):
            for group, summary in table[method].items():
                keys = ["miou", "image_noun_miou", "objects"]
                if not math.isnan(summary["on_other_object"]):  # NaN where no image has two objects
                    keys.append("on_other_object")
                self.log_dict({f"test/{method}/{group}/{k}": summary[k] for k in keys}, sync_dist=True)
        results = table1_results(table, thresholds)
        results["confused_pairs"] = confused_pairs(self.test_pairs.compute(), self.category_split.categories)
        self.test_pairs.reset()
        if self.test_iou_unfiltered is not None:
            unfiltered = self.test_iou_unfiltered.compute(self.category_split)
            self.test_iou_unfiltered.reset()
            scored = {group: summary["objects"] for group, summary in table["ours"].items()}
            counts = {
                group: {"scored": scored[group], "dropped": every["objects"] - scored[group]}
                for group, every in unfiltered["ours"].items()
            }
            min_score = self.hparams.test_min_oracle_score
            results["test_filter"] = {"min_oracle_score": min_score, "objects": counts}
            results["unfiltered"] = table1_results(unfiltered, thresholds)
        self.results["test"] = results

    # -- predict: triplets from prompts (synthesis) or from images with masks (paper §4.1), ----
    # -- or grounded images (generation + the trained head's masks) ---------------------------

    def on_predict_start(self) -> None:
        # (The checkpoint is restored after setup: here is the first place that knows of it.)
        if self.predict_mode == "ground" and self.trainer.ckpt_path is None:
            raise ConfigError(
                "Grounded generation needs a trained head: add --ckpt_path PATH (a checkpoint of "
                "`fit` with the same model config, e.g. outputs/scenes/checkpoints/last.ckpt)."
            )

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """A batch of the source -> triplets for the cache (synthesised from prompts, or converted
        from images with masks), or, for a grounded-image datamodule, images with one mask
        probability map per category (``grounded_diffusion.inference`` makes each)."""
        h = self.hparams
        if getattr(self, "predict_mode", "triplets") == "ground":
            images, probs = ground_generated(
                self.backbone,
                self.head,
                batch["prompt"],
                batch["categories"],
                batch["seed"],
                h.guidance_scale,
            )
            return {**batch, "image": images, "probs": probs}
        if "image" in batch:
            return convert_images(self.backbone, batch, h.real_image_mode, h.daam_word_matching)
        return synthesise_triplets(self.backbone, self.oracle, batch, h.guidance_scale, h.daam_word_matching)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.head.parameters(),
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )
