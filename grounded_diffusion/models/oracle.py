"""Oracles: label generated images with one mask per named category (Protocol I ground truth).

An oracle is an ``nn.Module`` with ``labels`` (the names it can segment, checked at config time)
and ``forward(images, categories) -> (masks, scores)``. ``MaskRCNNOracle`` is torchvision's COCO
Mask R-CNN, as in the paper; ``SegmenterOracle`` a semantic segmenter (the shapes world's own).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torchvision
from torch import Tensor, nn

from grounded_diffusion.data.vocabulary import VOC_TO_COCO, UnknownCategoryError, check_categories
from grounded_diffusion.errors import (
    ConfigError,
    MissingWeightsError,
    check_choice,
    check_in_range,
    torchvision_weights_file,
)
from grounded_diffusion.models.embedded import embedded_model
from grounded_diffusion.models.segmenters import load_segmenter
from grounded_diffusion.shapes_world.models import SHAPES_ORACLE_ID

InstanceMode = Literal["union", "top1"]


class Oracle(nn.Module):
    """Base class: frozen, always in inference mode."""

    def train(self, mode: bool = True) -> Oracle:
        return super().train(False)  # batch norm must use its running statistics (the authors' bug)

    @property
    def labels(self) -> Sequence[str]:
        raise NotImplementedError

    def check_categories(self, categories: Sequence[str]) -> None:
        """Fail, naming them, on categories this oracle cannot label."""
        try:
            check_categories([self.label_of(c) for c in categories], self.labels, "category")
        except UnknownCategoryError as err:
            raise UnknownCategoryError(
                f"The oracle ({type(self).__name__}) cannot label these categories. {err}"
            ) from None

    def label_of(self, category: str) -> str:
        """The oracle's name for a category (PASCAL names map onto COCO's)."""
        return VOC_TO_COCO.get(category, category)

    def describe(self) -> dict:
        """What made the masks, for the cache's metadata."""
        raise NotImplementedError

    def build(self) -> None:
        """Load the model (a synthesis run calls it before moving to its device); an oracle
        configured for fit or test, which never use it, costs nothing."""

    def forward(self, images: Tensor, categories: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
        """RGB images, uint8 [B, 3, H, W] -> masks bool [B, O, H, W] and scores [B, O] (0 where
        nothing was found), O = the most categories of a sample; empty slots stay empty."""
        raise NotImplementedError


class MaskRCNNOracle(Oracle):
    """torchvision's Mask R-CNN trained on COCO.

    Args:
        architecture: a torchvision detection builder, e.g. ``maskrcnn_resnet50_fpn_v2``.
        weights: its weights enum (``DEFAULT``, ``COCO_V1`` or the full name such as
            ``MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1``); ``null`` = random weights (offline tests).
        score_threshold: detections below it are ignored (the authors: 0.05).
        instances: ``union`` of all kept instances of a category, or ``top1``, its best instance
            only (the authors' code).
        mask_threshold: a pixel belongs to an instance where its mask probability exceeds this.
        detector_kwargs: passed to the torchvision builder, e.g. ``min_size`` / ``max_size``
            (input resizing, default 800 / 1333) or ``box_detections_per_img``.
    """

    def __init__(
        self,
        architecture: str = "maskrcnn_resnet50_fpn_v2",
        weights: str | None = "DEFAULT",
        score_threshold: float = 0.5,
        instances: InstanceMode = "union",
        mask_threshold: float = 0.5,
        detector_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        check_choice("instances", instances, InstanceMode)
        check_in_range("model.init_args.oracle.init_args.score_threshold", score_threshold, 0.0, 1.0, 0.5)
        check_in_range("model.init_args.oracle.init_args.mask_threshold", mask_threshold, 0.0, 1.0, 0.5)
        self.architecture, self.weights_name = architecture, weights
        self.score_threshold, self.instances, self.mask_threshold = score_threshold, instances, mask_threshold
        enum = torchvision.models.get_model_weights(architecture)
        self.weights = enum.verify(weights) if weights is not None else None
        self._labels = list((self.weights or enum.DEFAULT).meta["categories"])
        self.detector_kwargs = {"box_score_thresh": score_threshold, **(detector_kwargs or {})}
        self.model: nn.Module | None = None
        if self.weights is not None and not torchvision_weights_file(self.weights).exists():
            self.build()  # a download: fail now, at config time, if it cannot happen
        self.requires_grad_(False)
        self.eval()

    def build(self) -> None:
        if self.model is not None:
            return
        if self.weights is None:
            model = torchvision.models.get_model(
                self.architecture, weights=None, weights_backbone=None, **self.detector_kwargs
            )
        else:
            model = self._load_pretrained()
        self.model = model.requires_grad_(False).eval()

    def _load_pretrained(self) -> nn.Module:
        file, name = (
            torchvision_weights_file(self.weights),
            f"{type(self.weights).__name__}.{self.weights.name}",
        )
        fix = (
            f"Download {self.weights.url} on a machine with network access and put it at {file} (the folder is "
            "$TORCH_HOME/hub/checkpoints), or set model.init_args.oracle.init_args.weights: null for a random "
            "detector (tests only)."
        )
        try:
            return torchvision.models.get_model(
                self.architecture, weights=self.weights, **self.detector_kwargs
            )
        except OSError as err:  # URLError when offline; a partial download
            raise MissingWeightsError(f"Could not load the oracle's weights {name} ({err}). {fix}") from None
        except (RuntimeError, pickle.UnpicklingError, EOFError) as err:  # a truncated or foreign file
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MissingWeightsError(
                f"The oracle's weights file {file} is corrupt ({first_line}); delete it. {fix}"
            ) from None

    @property
    def labels(self) -> Sequence[str]:
        return [name for name in self._labels if name not in ("__background__", "N/A")]

    def describe(self) -> dict:
        return {
            "oracle": type(self).__name__,
            "architecture": self.architecture,
            "weights": self.weights_name,
            "score_threshold": self.score_threshold,
            "instances": self.instances,
            "mask_threshold": self.mask_threshold,
        }

    @torch.no_grad()
    def forward(self, images: Tensor, categories: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
        if self.model is None:  # used outside a synthesis run (a script, a test)
            self.build()
            self.model.to(images.device)
        batch, _, height, width = images.shape
        slots = max(len(c) for c in categories)
        masks = torch.zeros(batch, slots, height, width, dtype=torch.bool, device=images.device)
        scores = torch.zeros(batch, slots, device=images.device)
        # torchvision detectors take RGB floats in [0, 1] and normalise them themselves.
        detections = self.model(list(images.float() / 255))
        for b, (found, names) in enumerate(zip(detections, categories)):
            for o, name in enumerate(names):
                keep = (found["labels"] == self._labels.index(self.label_of(name))) & (
                    found["scores"] >= self.score_threshold
                )
                if not keep.any():
                    continue
                instance_scores, instance_masks = (
                    found["scores"][keep],
                    found["masks"][keep, 0] > self.mask_threshold,
                )
                if self.instances == "top1":
                    best = instance_scores.argmax()
                    instance_scores, instance_masks = (
                        instance_scores[best : best + 1],
                        instance_masks[best : best + 1],
                    )
                masks[b, o] = instance_masks.any(0)
                scores[b, o] = instance_scores.max()
        return masks, scores


class SegmenterOracle(Oracle):
    """A semantic segmenter as oracle: a category's mask is where the segmenter's most likely
    class is that category; its score, the mean probability of the class over that mask (0 and
    an empty mask where no pixel takes the class: not found).

    The shapes world's oracle (``embedded/shapes-oracle``) is an LR-ASPP trained on rendered
    scenes with exact masks (``make world``); any folder that
    ``SemanticSegmentationModule.export`` wrote (with ``background: class``) works too.

    Args:
        weights: ``embedded/shapes-oracle`` or such a folder.
        min_pixels: a category covering fewer pixels than this counts as not found.
    """

    def __init__(self, weights: str = SHAPES_ORACLE_ID, min_pixels: int = 8) -> None:
        super().__init__()
        self.weights_name, self.min_pixels = weights, min_pixels
        embedded = embedded_model(weights, "oracle")  # (shipped: models/embedded.py)
        self.folder = embedded.folder() if embedded is not None else Path(weights)
        config_file = self.folder / "config.json"
        if not config_file.is_file():
            raise MissingWeightsError(
                f"The oracle's weights '{weights}' are missing ({config_file} does not exist); give a folder written by "
                "SemanticSegmentationModule.export (experiments/world/oracle.yaml)."
            )
        config = json.loads(config_file.read_text())
        if config.get("background") != "class":
            raise ConfigError(
                f"The oracle segmenter in {self.folder} was trained with background "
                f"'{config.get('background')}'; an oracle needs background: class"
            )
        self._labels = list(config["classes"])
        self.segmenter = None
        self.requires_grad_(False)

    def build(self) -> None:
        if self.segmenter is None:
            self.segmenter = load_segmenter(self.folder)[0].requires_grad_(False)

    @property
    def labels(self) -> Sequence[str]:
        return self._labels

    def label_of(self, category: str) -> str:
        return category

    def describe(self) -> dict:
        return {"oracle": type(self).__name__, "weights": self.weights_name, "min_pixels": self.min_pixels}

    @torch.no_grad()
    def forward(self, images: Tensor, categories: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
        if self.segmenter is None:
            self.build()
            self.segmenter.to(images.device)
        probs = self.segmenter.scores(images.float() / 255).softmax(1)  # [B, 1 + K, H, W]
        best = probs.argmax(1)
        slots = max(len(c) for c in categories)
        # class index of each slot (1 + position in the class list); -1 for empty slots
        index = torch.tensor(
            [
                [self._labels.index(n) + 1 for n in names] + [-1] * (slots - len(names))
                for names in categories
            ],
            device=images.device,
        )
        masks = best[:, None] == index[:, :, None, None]
        area = masks.flatten(2).sum(-1)
        class_probs = probs.gather(1, index.clamp(min=0)[:, :, None, None].expand(-1, -1, *probs.shape[-2:]))
        scores = (class_probs * masks).flatten(2).sum(-1) / area.clamp(min=1)
        found = area >= self.min_pixels
        return masks & found[:, :, None, None], scores * found
