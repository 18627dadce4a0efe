"""PASCAL VOC-format segmentation folders: read (the real-image path, paper §4.1) and write.

Layout: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNG, value k = class k,
0 = background, 255 = ignore), ``ImageSets/Segmentation/<split>.txt``. The class list is PASCAL
VOC's 20 classes unless the folder has a ``classes.txt`` (one name per line, in label order; a
first line ``background``, as many VOC tools write, is label 0 and skipped) or the caller names them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from grounded_diffusion.data.prompts import ONE_OBJECT_TEMPLATE, TWO_OBJECT_TEMPLATE
from grounded_diffusion.data.sources import files_changed, read_with_fingerprint, select_items
from grounded_diffusion.data.validation import (
    IGNORE_LABEL,
    MIN_SIDE,
    check_image_label_pairs,
    ignore_label_of,
)
from grounded_diffusion.data.vocabulary import PASCAL_VOC, CategorySplit, check_categories, read_classes_file
from grounded_diffusion.errors import ConfigError
from grounded_diffusion.files import read_text_file, replace_folder


def voc_colours(count: int) -> np.ndarray:
    """The PASCAL VOC colour map's first ``count`` colours, uint8 [count, 3]: label k's colour
    spreads k's bits over the channels, so it extends past 256 labels (16-bit label maps)."""
    code = np.arange(count)
    rgb = np.zeros((count, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            rgb[:, channel] |= ((code >> channel) & 1) << (7 - bit)
        code = code >> 3
    return rgb.astype(np.uint8)


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (256 x RGB, flattened): a palette PNG's."""
    return voc_colours(256).reshape(-1).tolist()


# Colours of every 16-bit label, as floats for painting label maps over images; the 16-bit
# ignore label is drawn in the colour of the 8-bit one (255).
PALETTE_RGB = voc_colours(1 << 16).astype(np.float32)
PALETTE_RGB[-1] = PALETTE_RGB[255]


def write_voc_folder(
    root: str | Path, classes: Sequence[str], samples: dict[str, list[tuple[str, np.ndarray, np.ndarray]]]
) -> Path:
    """Write ``{split: [(id, image HxWx3 uint8, labels HxW uint8)]}`` as a VOC folder, atomically
    (a folder already there is replaced whole: ``files.replace_folder``)."""
    palette = voc_palette()

    def write(tmp: Path) -> None:
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (tmp / sub).mkdir(parents=True)
        for split, items in samples.items():
            for sample_id, image, labels in items:
                Image.fromarray(image).save(tmp / "JPEGImages" / f"{sample_id}.jpg", quality=95)
                label_png = Image.fromarray(labels, mode="P")
                label_png.putpalette(palette)
                label_png.save(tmp / "SegmentationClass" / f"{sample_id}.png")
            ids = "".join(f"{sample_id}\n" for sample_id, _, _ in items)
            (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(ids)
        (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in classes))

    return replace_folder(root, write)


class VOCFolder:
    """A VOC-format folder as a source of {image, masks, prompt} samples.

    Args:
        root: the folder (``VOCdevkit/VOC2012`` for PASCAL VOC itself).
        classes: class names in label order; default: ``classes.txt`` in the folder, else VOC's 20.
        image_size: images are resized to a square of this size (masks with nearest neighbour).
        splits: image sets to read; default: those of ``train``, ``val``, ``test`` the folder has.
        max_objects: at most this many classes per image (the paper never uses more than two);
            images with more keep their largest ones.
    """

    def __init__(
        self,
        root: str,
        classes: list[str] | None = None,
        image_size: int = 512,
        splits: list[str] | None = None,
        max_objects: int = 2,
    ) -> None:
        self.root = Path(root)
        self._classes = classes
        self.image_size = image_size
        self._splits = list(splits) if splits else None
        self.max_objects = max_objects

    def prepare(self) -> None:
        """Check the folder before a build: every listed image and label map exists, they agree
        in size, labels name listed classes, and each image holds an object."""
        if not (self.root / "ImageSets" / "Segmentation").is_dir():
            raise ConfigError(
                f"'{self.root}' is not a VOC-format folder (no ImageSets/Segmentation). Point root at "
                "a folder with JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/<split>.txt."
            )
        if len(self.classes) > IGNORE_LABEL - 1 and self.ignore_label == IGNORE_LABEL:
            raise ConfigError(
                f"{self.root} lists {len(self.classes)} classes, more than 8-bit label maps hold (255 is ignore): "
                'save 16-bit label maps and say so in labels.json: {"bits": 16, "ignore": 65535}'
            )
        pairs = [self.files(i) for s in self.splits for i in self.ids(s)]
        check_image_label_pairs(
            pairs,
            len(self.classes),
            f"VOC folder {self.root}",
            need_object=True,
            min_side=MIN_SIDE,
            ignore=self.ignore_label,
        )

    @property
    def ignore_label(self) -> int:
        """255 (VOC), or 65535 where the folder's labels.json says its maps are 16-bit."""
        return ignore_label_of(self.root)

    def files(self, sample_id: str) -> tuple[Path, Path]:
        return (
            self.root / "JPEGImages" / f"{sample_id}.jpg",
            self.root / "SegmentationClass" / f"{sample_id}.png",
        )

    @property
    def classes(self) -> list[str]:
        if self._classes is not None:
            return list(self._classes)
        listed = self.root / "classes.txt"
        return list(read_classes_file(listed)) if listed.exists() else list(PASCAL_VOC)

    @property
    def splits(self) -> list[str]:
        if self._splits is not None:
            return self._splits
        found = [
            s
            for s in ("train", "val", "test")
            if (self.root / "ImageSets" / "Segmentation" / f"{s}.txt").is_file()
        ]
        if not found:
            raise ConfigError(
                f"{self.root} has no ImageSets/Segmentation/{{train,val,test}}.txt; list its image sets in `splits`"
            )
        return found

    def ids(self, split: str) -> list[str]:
        path = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not path.exists():
            raise ConfigError(f"No image set '{split}' in {self.root} (expected {path})")
        ids = read_text_file(path, "Image set").split()
        if not ids:
            raise ConfigError(
                f"Image set '{path}' lists no image: write the ids of its images, one per line (JPEGImages/<id>.jpg), "
                "or delete the file (or leave the split out of `splits`)"
            )
        return ids

    def check(self, category_split: CategorySplit) -> None:
        check_categories(self.classes, category_split.categories, "source class")

    def items(self) -> list[tuple[str, str]]:
        """(id, split) of every listed image."""
        return [(i, s) for s in self.splits for i in self.ids(s)]

    def dataset(
        self,
        category_split: CategorySplit | None = None,
        exclude: set[str] = frozenset(),
        max_per_group: int | None = None,
    ) -> VOCSamples:
        """The samples of ``self.splits`` whose id is not in ``exclude`` (e.g. already cached),
        at most ``max_per_group`` per split."""
        return VOCSamples(self, select_items(self.items(), exclude, max_per_group))

    def changed(
        self, record: dict, category_split: CategorySplit | None = None, trust_stat: bool = True
    ) -> str | None:
        """Why the image or label map of a cached sample changed since it was built, or None
        (``trust_stat``: see ``sources.files_changed``)."""
        recorded = record.get("source")
        if not isinstance(recorded, dict):
            return None  # (built before caches kept fingerprints: nothing to compare)
        return files_changed(self.files(record["id"]), recorded, self.root, trust_stat)


class VOCSamples(Dataset):
    def __init__(self, folder: VOCFolder, items: list[tuple[str, str]]) -> None:
        self.folder, self.items = folder, items
        self.classes, self.ignore = folder.classes, folder.ignore_label

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        sample_id, split = self.items[index]
        root, size = self.folder.root, self.folder.image_size
        (image_bytes, label_bytes), fingerprint = read_with_fingerprint(self.folder.files(sample_id))
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        labels = np.array(Image.open(io.BytesIO(label_bytes)))
        image = np.array(image.resize((size, size), Image.BICUBIC))
        labels = np.array(Image.fromarray(labels).resize((size, size), Image.NEAREST))
        values, counts = np.unique(labels[(labels > 0) & (labels != self.ignore)], return_counts=True)
        if len(values) == 0:
            raise ConfigError(f"Sample '{sample_id}' in {root} has no labelled object")
        if values.max() > len(self.classes):
            raise ConfigError(
                f"Sample '{sample_id}' has label {values.max()} but only {len(self.classes)} classes "
                f"are known ({self.classes}); give the class list (classes.txt or `classes:`)"
            )
        keep = sorted(values[np.argsort(-counts)][: self.folder.max_objects])  # largest objects
        names = [self.classes[v - 1] for v in keep]
        template = ONE_OBJECT_TEMPLATE if len(names) == 1 else TWO_OBJECT_TEMPLATE
        return {
            "id": sample_id,
            "split": split,
            "prompt": template.format(**{f"c{i + 1}": n for i, n in enumerate(names)}),
            "categories": names,
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),  # uint8 [3, H, W]
            "masks": torch.from_numpy(np.stack([labels == v for v in keep])),  # bool [O, H, W]
            "source": fingerprint,  # (kept in the cache's manifest: what this sample was made from)
        }
