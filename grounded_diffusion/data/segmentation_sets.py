"""Semantic segmentation sets for Protocol II: real PASCAL VOC (torchvision's VOCSegmentation
layout), COCO (instance annotations through pycocotools), and the VOC-style folders that grounded
generation writes. Each gives ``(image uint8 [3, H, W], labels uint8 [H, W])`` with labels in its
own class list (``classes``, 1-based; 0 background, 255 ignore) and knows which classes each
image holds (to keep "real images of seen classes only")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from grounded_diffusion.data.manifest import JsonlManifest
from grounded_diffusion.data.vocabulary import COCO, PASCAL_VOC
from grounded_diffusion.errors import ConfigError

IGNORE_LABEL = 255
# How a segmenter treats background: ``ignore`` (255, the ZS3 convention on VOC) or ``class`` (0).
BACKGROUND_MODES = ("ignore", "class")


def _pil_to_tensors(image: Image.Image, labels: Image.Image) -> tuple[Tensor, Tensor]:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1), torch.from_numpy(np.array(labels, dtype=np.uint8))


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

    def label_file(self, index: int) -> Path:
        """The label PNG of image ``index`` (sets stored as label PNGs)."""
        raise NotImplementedError

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

    def __init__(self, root: str, image_set: str = "train", year: str = "2012", seen_only: bool = False) -> None:
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

    def label_file(self, index: int) -> Path:
        return Path(self.dataset.masks[index])


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
            labels[mask] = IGNORE_LABEL if annotation.get("iscrowd") else self.label_of[annotation["category_id"]]
        return _pil_to_tensors(image, Image.fromarray(labels))

    def labels_present(self, index: int) -> set[int]:
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=self.ids[index]))
        return {self.label_of[a["category_id"]] for a in annotations if not a.get("iscrowd")}


class FolderSegmentationSet(SegmentationSet):
    """A VOC-style folder with ``classes.txt``, as grounded generation writes it
    (``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/Segmentation/<split>.txt``).

    Args:
        root: the folder.
        split: the image-set list to read (a synthetic build writes ``train``).
    """

    kind = "synthetic"

    def __init__(self, root: str, split: str = "train", seen_only: bool = False) -> None:
        self.root, self.seen_only = Path(root), seen_only
        listing = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file() or not (self.root / "classes.txt").is_file():
            raise ConfigError(
                f"'{root}' is not a finished VOC-style folder with classes.txt (missing {listing.name} or classes.txt). "
                "Build it with `predict` (experiments/protocol2/*_build.yaml); rerunning finishes an interrupted build."
            )
        self.ids = listing.read_text().split()
        self.classes = (self.root / "classes.txt").read_text().split("\n")[:-1]

    def describe(self) -> str:
        """``synthetic (one|two|mixture)``: objects per prompt, from the build's manifest."""
        counts = {len(r["categories"]) for r in JsonlManifest(self.root / "manifest.jsonl").records()}
        objects = {frozenset({1}): "one", frozenset({2}): "two"}.get(frozenset(counts), "mixture")
        return f"synthetic ({objects})"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = Image.open(self.root / "JPEGImages" / f"{self.ids[index]}.jpg")
        return _pil_to_tensors(image, Image.open(self.label_file(index)))

    def label_file(self, index: int) -> Path:
        return self.root / "SegmentationClass" / f"{self.ids[index]}.png"
