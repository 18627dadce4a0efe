"""Semantic segmentation sets for Protocol II: real PASCAL VOC (torchvision's VOCSegmentation
layout), COCO (instance annotations through pycocotools), and the VOC-style folders that grounded
generation writes. Each gives ``(image uint8 [3, H, W], labels uint8 [H, W])`` with labels in its
own class list (``classes``, 1-based; 0 background, 255 ignore) and knows which classes each
image holds (to keep "real images of seen classes only")."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from grounded_diffusion.data.manifest import JsonlManifest
from grounded_diffusion.data.validation import (
    IGNORE_LABEL,
    DataError,
    check_image_label_pairs,
    decoded_image,
    find_problems,
    ignore_label_of,
)
from grounded_diffusion.data.vocabulary import COCO, PASCAL_VOC, read_classes_file
from grounded_diffusion.errors import ConfigError
from grounded_diffusion.files import read_text_file
from grounded_diffusion.shapes_world.render import ShapesWorld, render_shapes_scene, world_categories

# How a segmenter treats background: ``ignore`` (255, the ZS3 convention on VOC) or ``class`` (0).
BackgroundMode = Literal["ignore", "class"]


def _pil_to_tensors(image: Image.Image, labels: Image.Image) -> tuple[Tensor, Tensor]:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1), torch.from_numpy(
        np.array(labels, dtype=np.uint8)
    )


class SegmentationSet:
    """``seen_only``: keep only images without unseen classes (the real half of a mixture, the
    ZS3 convention); ``kind``: ``real`` or ``synthetic``, for the report."""

    classes: list[str]
    seen_only: bool = False
    kind: str = "real"

    def describe(self) -> str:
        return self.kind

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def files(self, index: int) -> tuple[Path, Path]:
        """The image and label PNG of image ``index`` (sets stored as label PNGs)."""
        raise NotImplementedError

    def label_file(self, index: int) -> Path:
        return self.files(index)[1]

    def validate(self) -> None:
        """Raise ``DataError`` on the first missing or unfit file, before any training step."""
        pairs = [self.files(i) for i in range(len(self))]
        check_image_label_pairs(pairs, len(self.classes), self.describe_source())

    def describe_source(self) -> str:
        return type(self).__name__

    def labels_present(self, index: int) -> set[int]:
        """Labels of the classes in image ``index`` (1-based; background and ignore left out),
        read from the label PNG alone."""
        labels = np.array(Image.open(self.label_file(index)))
        return {int(v) for v in np.unique(labels) if 0 < v < IGNORE_LABEL}


class VOCSegmentationSet(SegmentationSet):
    """Real PASCAL VOC through ``torchvision.datasets.VOCSegmentation``.

    Args:
        root: the folder holding ``VOCdevkit/VOC2012`` (torchvision's layout; the official tar
            unpacks to it).
        image_set: ``train``, ``val`` or ``trainval``.
        year: ``2012`` (``2007`` too).
    """

    def __init__(
        self, root: str, image_set: str = "train", year: str = "2012", seen_only: bool = False
    ) -> None:
        from torchvision.datasets import VOCSegmentation

        self.seen_only = seen_only
        folder = Path(root) / "VOCdevkit" / f"VOC{year}"
        if not folder.is_dir():
            raise ConfigError(
                f"No PASCAL VOC at '{root}': expected {folder} (JPEGImages/, SegmentationClass/, ImageSets/). "
                "Unpack VOCtrainval_11-May-2012.tar there (torchvision's layout)."
            )
        self.dataset = VOCSegmentation(root, year=year, image_set=image_set, download=False)
        self.classes = list(PASCAL_VOC)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return _pil_to_tensors(*self.dataset[index])

    def files(self, index: int) -> tuple[Path, Path]:
        return Path(self.dataset.images[index]), Path(self.dataset.masks[index])

    def describe_source(self) -> str:
        return f"PASCAL VOC at {self.dataset.root}"


class COCOSegmentationSet(SegmentationSet):
    """COCO's 80 thing classes as semantic labels, from instance annotations (pycocotools).

    Labels follow ``grounded_diffusion.data.vocabulary.COCO`` (1..80, by name, not COCO's ids).
    Larger instances are painted first so that small ones stay visible; crowd regions are 255.

    Args:
        images: the image folder (e.g. ``coco/val2017``).
        annotations: its ``instances_*.json``.
    """

    def __init__(self, images: str, annotations: str, seen_only: bool = False) -> None:
        from pycocotools.coco import COCO as COCOApi

        self.seen_only = seen_only
        if not Path(annotations).is_file():
            raise ConfigError(f"COCO annotation file '{annotations}' does not exist")
        self.images = Path(images)
        self.coco = COCOApi(annotations)
        self.classes = list(COCO)
        names = {c["id"]: c["name"] for c in self.coco.loadCats(self.coco.getCatIds())}
        unknown = sorted(set(names.values()) - set(COCO))
        if unknown:
            raise ConfigError(f"{annotations} has categories outside COCO's 80 thing classes: {unknown}")
        self.label_of = {cat_id: COCO.index(name) + 1 for cat_id, name in names.items()}
        self.ids = sorted(self.coco.getImgIds())

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        info = self.coco.loadImgs(self.ids[index])[0]
        image = Image.open(self.images / info["file_name"])
        labels = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"]))
        for annotation in sorted(annotations, key=lambda a: -a["area"]):
            mask = self.coco.annToMask(annotation).astype(bool)
            labels[mask] = (
                IGNORE_LABEL if annotation.get("iscrowd") else self.label_of[annotation["category_id"]]
            )
        return _pil_to_tensors(image, Image.fromarray(labels))

    def labels_present(self, index: int) -> set[int]:
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=self.ids[index]))
        return {self.label_of[a["category_id"]] for a in annotations if not a.get("iscrowd")}

    def validate(self) -> None:
        """Every image exists, decodes, and has the size its annotations give (labels are drawn
        from them); one ``DataError`` naming the first bad image."""
        infos = self.coco.loadImgs(self.ids)
        problems = find_problems(infos, self._image_problem, f"COCO images in {self.images}")
        if problems:
            more = f" (and {len(problems) - 1} more of {len(infos)})" if len(problems) > 1 else ""
            raise DataError(f"COCO image {problems[0]}{more}")

    def _image_problem(self, info: dict) -> str | None:
        path = self.images / info["file_name"]
        if not path.is_file():
            return f"{path} (listed in the annotation file) does not exist; point `images` at its folder"
        image = decoded_image(path)
        if isinstance(image, str):
            return image
        if image.size != (info["width"], info["height"]):
            return (
                f"{path} is {image.size[0]}x{image.size[1]} but its annotations say {info['width']}x{info['height']}; "
                "use the annotation file of these images"
            )
        return None


class FolderSegmentationSet(SegmentationSet):
    """A VOC-style folder with ``classes.txt``, as grounded generation writes it
    (``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/Segmentation/<split>.txt``), or
    your own (``classes.txt`` one name per line in label order; a first line ``background`` is
    label 0 and skipped).

    Args:
        root: the folder.
        split: the image-set list to read (a synthetic build writes ``train``).

    A folder with a build's ``manifest.jsonl`` is synthetic, any other real.
    """

    def __init__(self, root: str, split: str = "train", seen_only: bool = False) -> None:
        self.root, self.seen_only = Path(root), seen_only
        listing = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        missing = [
            str(p.relative_to(self.root)) for p in (listing, self.root / "classes.txt") if not p.is_file()
        ]
        if missing:
            raise ConfigError(
                f"'{root}' is not a finished VOC-style folder: missing {' and '.join(missing)}. A synthetic set is built "
                "by `predict` (experiments/protocol2/*_build.yaml; rerunning finishes an interrupted build); your own "
                "needs JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt and classes.txt."
            )
        self.ids = read_text_file(listing, "Image set").split()
        self.classes = list(read_classes_file(self.root / "classes.txt"))
        self.kind = "synthetic" if (self.root / "manifest.jsonl").is_file() else "real"
        if ignore_label_of(self.root) != IGNORE_LABEL or len(self.classes) > IGNORE_LABEL - 1:
            raise ConfigError(
                f"'{root}' has {len(self.classes)} classes in 16-bit label maps; the Protocol II segmenters read VOC's "
                f"8-bit maps (up to {IGNORE_LABEL - 1} classes, {IGNORE_LABEL} ignore): build the set over fewer names"
            )

    def describe(self) -> str:
        """``synthetic (one|two|mixture)`` (objects per prompt, from the build's manifest) or ``real``."""
        if self.kind == "real":
            return "real"
        counts = {len(r["categories"]) for r in JsonlManifest(self.root / "manifest.jsonl").records()}
        objects = {frozenset({1}): "one", frozenset({2}): "two"}.get(frozenset(counts), "mixture")
        return f"synthetic ({objects})"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, labels = self.files(index)
        return _pil_to_tensors(Image.open(image), Image.open(labels))

    def files(self, index: int) -> tuple[Path, Path]:
        sample_id = self.ids[index]
        return (
            self.root / "JPEGImages" / f"{sample_id}.jpg",
            self.root / "SegmentationClass" / f"{sample_id}.png",
        )

    def describe_source(self) -> str:
        return f"segmentation folder {self.root}"


class RenderedShapes(SegmentationSet):
    """Shapes-world scenes with exact label maps, rendered in memory (shapes_world/render.py): the
    oracle's training set, and the "real" images of the world's Protocol II.

    Args:
        count: scenes.
        image_size: side in pixels (the world's models: 64).
        seed: which scenes. The world's Stable Diffusion trained on seed 0; the oracle on 1
            (validated on 2); Protocol II scores on 3. Keep sets that must not meet apart.
        seen_only: keep only scenes without unseen classes.
        world: ``shapes`` (20 categories) or ``shapes_wide`` (48).
    """

    kind = "rendered"

    def __init__(
        self,
        count: int,
        image_size: int = 64,
        seed: int = 3,
        seen_only: bool = False,
        world: ShapesWorld = "shapes",
    ) -> None:
        self.count, self.image_size, self.seed, self.seen_only = count, image_size, seed, seen_only
        self.world, self.classes = world, list(world_categories(world))

    def describe(self) -> str:
        return f"rendered (seed {self.seed})"

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, labels, _ = render_shapes_scene(index, self.image_size, self.seed, world=self.world)
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(labels)

    def labels_present(self, index: int) -> set[int]:
        names = render_shapes_scene(index, self.image_size, self.seed, world=self.world)[2]
        return {self.classes.index(name) + 1 for name in names}

    def validate(self) -> None:
        """Nothing to check: rendered exactly, no files."""
