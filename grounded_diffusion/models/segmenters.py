"""Standard semantic segmenters for Protocol II (paper §5.2): trained on synthetic grounded images,
evaluated zero-shot on real VOC/COCO.

Each takes images in [0, 1] (normalised inside with ImageNet statistics) and gives
``scores(images)`` [B, K, H, W] at the input size (K classes; background is class 0 when it is a
class, see ``SegmentationDataModule.background``) and
``loss(images, labels)`` for label maps [B, H, W] (255 = ignore). Pure ``nn.Module``s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from grounded_diffusion.errors import ConfigError, UserError, check_choice, torchvision_weights_file

# Where the errors of an unreachable Hub come from (huggingface_hub's own subclass OSError).
NETWORK_MODULES = {"httpx", "httpx2", "requests", "urllib3", "huggingface_hub"}

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


LrasppBackbone = Literal["mobilenet_v3_small", "mobilenet_v3_large"]
TransformerArchitecture = Literal["maskformer", "mask2former"]
Architecture = Literal["maskformer", "mask2former", "deeplabv3", "lraspp"]
ARCHITECTURES = get_args(Architecture)


class MissingBackboneWeightsError(UserError, RuntimeError):
    pass


RANDOM_RESNET_101 = "random-resnet-101"


class Segmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalise(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std

    def scores(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, images: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError


class PixelClassifier(Segmenter):
    """A segmenter that classifies each pixel (DeepLabV3, LR-ASPP): trained with cross-entropy."""

    def loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over labelled pixels; 0 for a batch with none (with background
        ignored, an image may hold no class at all), where the plain mean would be NaN."""
        labels = labels.long()
        total = F.cross_entropy(self.scores(images), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


class DeepLabV3(PixelClassifier):
    """torchvision's DeepLabV3, the light option.

    Args:
        num_classes: classes, background included when it is a class.
        backbone: ``resnet50``, ``resnet101`` or ``mobilenet_v3_large``.
        weights_backbone: ImageNet weights of the backbone (``DEFAULT`` or an enum name), or
            ``null`` for random weights (offline runs).
    """

    def __init__(
        self, num_classes: int, backbone: str = "resnet101", weights_backbone: str | None = "DEFAULT"
    ) -> None:
        super().__init__()
        builder = f"deeplabv3_{backbone}"
        if builder not in torchvision.models.list_models(torchvision.models.segmentation):
            raise ConfigError(f"backbone '{backbone}' is not one of resnet50, resnet101, mobilenet_v3_large")
        weights = (
            None
            if weights_backbone is None
            else torchvision.models.get_model_weights(backbone).verify(weights_backbone)
        )
        try:
            self.model = torchvision.models.get_model(
                builder, weights=None, weights_backbone=weights, num_classes=num_classes, aux_loss=False
            )
        except OSError as err:  # offline: the download failed
            file = torchvision_weights_file(weights)
            raise MissingBackboneWeightsError(
                f"Cannot download the ImageNet weights {weights} of {builder}'s backbone ({err}). Put the file at "
                f"{file} (from {weights.url}), or set model.init_args.pretrained_backbone: false (random weights)."
            ) from None

    def scores(self, images: Tensor) -> Tensor:
        return self.model(self.normalise(images))["out"]


class LRASPP(PixelClassifier):
    """torchvision's LR-ASPP on a MobileNetV3 (``mobilenet_v3_small`` or ``_large``), trained from
    scratch: the shapes world's oracle, light enough to train on a CPU in minutes.

    Args:
        num_classes: classes, background included when it is a class.
        backbone: ``mobilenet_v3_small`` or ``mobilenet_v3_large``.
        input_scale: images are resized by this factor before the network (its features are at
            1/8 of its input) and its scores back to the input size: small images keep sharp edges.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: LrasppBackbone = "mobilenet_v3_small",
        input_scale: float = 2.0,
    ) -> None:
        super().__init__()
        from torchvision.models.segmentation.lraspp import _lraspp_mobilenetv3  # torchvision's own builder

        check_choice("backbone", backbone, LrasppBackbone)
        self.model = _lraspp_mobilenetv3(
            torchvision.models.get_model(backbone, weights=None, dilated=True), num_classes
        )
        self.input_scale = input_scale

    def scores(self, images: Tensor) -> Tensor:
        size = images.shape[-2:]
        if self.input_scale != 1:
            images = F.interpolate(
                images, scale_factor=self.input_scale, mode="bilinear", align_corners=False
            )
        scores = self.model(self.normalise(images))["out"]
        return (
            F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
            if self.input_scale != 1
            else scores
        )


class MaskFormer(Segmenter):
    """MaskFormer (the paper's choice) or Mask2Former from transformers: mask classification with
    learned queries; semantic scores are Σ_q p(class | q) · sigmoid(mask_q), as transformers'
    ``post_process_semantic_segmentation`` computes them (here batched, before the argmax).

    Args:
        num_classes: classes, background included when it is a class (an ordinary one here).
        architecture: ``maskformer`` or ``mask2former``.
        backbone: a transformers backbone checkpoint, e.g. ``microsoft/resnet-101`` (the paper's
            ResNet-101); ``random-resnet-101`` builds that architecture with random weights
            offline (real shapes and costs, for smoke runs); ``null`` a tiny random ResNet
            (offline runs and tests).
        pretrained_backbone: load the backbone checkpoint's weights (needs them in the HF cache
            or the Hub).
        num_queries: learned queries (MaskFormer: 100).
    """

    def __init__(
        self,
        num_classes: int,
        architecture: TransformerArchitecture = "maskformer",
        backbone: str | None = "microsoft/resnet-101",
        pretrained_backbone: bool = True,
        num_queries: int = 100,
    ) -> None:
        super().__init__()
        from transformers import (
            Mask2FormerConfig,
            Mask2FormerForUniversalSegmentation,
            MaskFormerConfig,
            MaskFormerForInstanceSegmentation,
            ResNetConfig,
        )

        check_choice("architecture", architecture, TransformerArchitecture)
        stages = ["stage1", "stage2", "stage3", "stage4"]
        if backbone is None:  # tiny and random: the embedded offline option
            backbone_args = dict(
                backbone_config=ResNetConfig(
                    embedding_size=16,
                    hidden_sizes=[16, 32, 64, 128],
                    depths=[1, 1, 1, 1],
                    layer_type="basic",
                    out_features=stages,
                )
            )
            sizes = dict(width=32, layers=1, heads=2, ffn=64)
        elif backbone == RANDOM_RESNET_101:  # microsoft/resnet-101's architecture, random weights
            backbone_args = dict(
                backbone_config=ResNetConfig(
                    embedding_size=64,
                    hidden_sizes=[256, 512, 1024, 2048],
                    depths=[3, 4, 23, 3],
                    layer_type="bottleneck",
                    out_features=stages,
                )
            )
            sizes = dict(width=256, layers=6, heads=8, ffn=2048)
        else:
            backbone_args = dict(
                backbone=backbone,
                use_pretrained_backbone=pretrained_backbone,
                backbone_kwargs={"out_features": stages},
            )
            sizes = dict(width=256, layers=6, heads=8, ffn=2048)
        try:
            if architecture == "maskformer":
                config = MaskFormerConfig(
                    num_labels=num_classes,
                    num_queries=num_queries,
                    fpn_feature_size=sizes["width"],
                    mask_feature_size=sizes["width"],
                    decoder_config=dict(
                        model_type="detr",
                        d_model=sizes["width"],
                        encoder_layers=sizes["layers"],
                        decoder_layers=sizes["layers"],
                        encoder_attention_heads=sizes["heads"],
                        decoder_attention_heads=sizes["heads"],
                        encoder_ffn_dim=sizes["ffn"],
                        decoder_ffn_dim=sizes["ffn"],
                        num_queries=num_queries,
                    ),
                    **backbone_args,
                )
                self.model = MaskFormerForInstanceSegmentation(config)
            else:
                config = Mask2FormerConfig(
                    num_labels=num_classes,
                    num_queries=num_queries,
                    feature_size=sizes["width"],
                    mask_feature_size=sizes["width"],
                    hidden_dim=sizes["width"],
                    encoder_layers=sizes["layers"],
                    decoder_layers=sizes["layers"] + 1,
                    num_attention_heads=sizes["heads"],
                    encoder_feedforward_dim=sizes["ffn"],
                    dim_feedforward=sizes["ffn"],
                    **backbone_args,
                )
                self.model = Mask2FormerForUniversalSegmentation(config)
        except Exception as err:
            if not isinstance(err, OSError) and type(err).__module__.split(".")[0] not in NETWORK_MODULES:
                raise
            raise MissingBackboneWeightsError(
                f"Cannot load the backbone '{backbone}' ({str(err).splitlines()[0]}). Download it where the Hub is "
                f"reachable (`hf download {backbone}`) and copy the HF cache here, or set "
                "model.init_args.backbone: null for a tiny random one (or pretrained_backbone: false)."
            ) from None
        self.num_classes = num_classes

    def scores(self, images: Tensor) -> Tensor:
        out = self.model(pixel_values=self.normalise(images))
        return semantic_scores(out.class_queries_logits, out.masks_queries_logits, images.shape[-2:])

    def loss(self, images: Tensor, labels: Tensor) -> Tensor:
        mask_labels, class_labels = instance_targets(labels, self.num_classes)
        return self.model(
            pixel_values=self.normalise(images), mask_labels=mask_labels, class_labels=class_labels
        ).loss


def semantic_scores(class_logits: Tensor, mask_logits: Tensor, size) -> Tensor:
    """[B, Q, K+1] class logits (last = no object), [B, Q, h, w] mask logits -> [B, K, H, W]."""
    masks = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)
    return torch.einsum("bqk,bqhw->bkhw", class_logits.softmax(-1)[..., :-1], masks.sigmoid())


def instance_targets(labels: Tensor, num_classes: int) -> tuple[list[Tensor], list[Tensor]]:
    """Label maps [B, H, W] -> per image, one binary mask per class present (ignore pixels
    belong to none) and the class ids: the mask-classification targets of (Mask)MaskFormer."""
    one_hot = F.one_hot(labels.long().clamp(max=num_classes), num_classes + 1)[
        ..., :num_classes
    ]  # 255 -> dropped
    present = one_hot.flatten(1, 2).any(1)  # [B, K]
    masks = one_hot.permute(0, 3, 1, 2).float()
    return [m[p] for m, p in zip(masks, present)], [p.nonzero()[:, 0] for p in present]


def build_segmenter(
    architecture: str,
    num_classes: int,
    backbone: str | None = None,
    pretrained_backbone: bool = False,
    num_queries: int = 100,
) -> Segmenter:
    """The segmenter of ``architecture`` (see ``SemanticSegmentationModule`` for the arguments)."""
    if architecture == "deeplabv3":
        return DeepLabV3(
            num_classes, backbone or "mobilenet_v3_large", "DEFAULT" if pretrained_backbone else None
        )
    if architecture == "lraspp":
        if pretrained_backbone:
            raise ConfigError(
                "architecture lraspp trains from scratch: set model.init_args.pretrained_backbone: false"
            )
        return LRASPP(num_classes, backbone or "mobilenet_v3_small")
    if architecture in ("maskformer", "mask2former"):
        return MaskFormer(num_classes, architecture, backbone, pretrained_backbone, num_queries)
    raise ConfigError(f"architecture '{architecture}' is not one of {ARCHITECTURES}")


def save_segmenter(segmenter: Segmenter, folder: str | Path, **config) -> None:
    """``config.json`` (what ``build_segmenter`` takes, plus anything given) and the weights as
    ``model.safetensors`` in float16 (half the size; ``load_segmenter`` casts back)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in segmenter.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_segmenter(folder: str | Path) -> tuple[Segmenter, dict]:
    """A segmenter saved by ``save_segmenter`` (no pickle: JSON and safetensors) and its config."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    segmenter = build_segmenter(
        config["architecture"],
        config["num_classes"],
        config.get("backbone"),
        False,
        config.get("num_queries", 100),
    )
    reference = segmenter.state_dict()
    state = {k: v.to(reference[k].dtype) for k, v in load_file(folder / "model.safetensors").items()}
    segmenter.load_state_dict(state)
    return segmenter.eval(), config
