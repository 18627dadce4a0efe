"""Grounded images on disk: generated images with one mask per named category, in formats that
standard tools read (Protocol II datasets, and the output of grounded generation).

Layout (a PASCAL VOC-style folder, so ``VOCFolder`` and the segmentation datamodules read it too)::

    <root>/JPEGImages/<id>.jpg               the generated image
    <root>/SegmentationClass/<id>.png        palette PNG: 0 background, k = classes.txt line k,
                                             255 = ignore (uncertain pixels, when asked); over
                                             254 classes, 16-bit grayscale PNG, 65535 = ignore
    <root>/labels.json                       the label maps' format: bits (8 or 16), ignore label
    <root>/overlays/<id>.png                 image with its masks drawn over it (optional)
    <root>/classes.txt                       class names in label order
    <root>/manifest.jsonl                    one line per finished sample: id, split, prompt,
                                             categories, and each category's mask as COCO RLE
    <root>/ImageSets/Segmentation/<split>.txt   written when a build finishes
    <root>/annotations.json                  COCO format (RLE masks), written when a build finishes

Files are written to a temporary name and renamed; the manifest line comes last, so a rerun of an
interrupted build skips what is finished and ``finalize`` rebuilds the lists from the manifest.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from torch import Tensor

from grounded_diffusion.data.manifest import JsonlManifest, check_sample_id
from grounded_diffusion.data.validation import IGNORE_LABEL, IGNORE_LABEL_16
from grounded_diffusion.data.voc import PALETTE_RGB, voc_palette
from grounded_diffusion.errors import ConfigError, UserError
from grounded_diffusion.files import atomic_write

KEPT = "every image already written is kept, and the rerun goes on from them"
MAX_8BIT_CLASSES, MAX_CLASSES = IGNORE_LABEL - 1, IGNORE_LABEL_16 - 1


def label_format(num_classes: int) -> dict:
    """How label maps over ``num_classes`` classes are stored: VOC's 8-bit palette PNGs (255 =
    ignore) up to 254 classes, 16-bit grayscale PNGs (65535 = ignore) up to 65534."""
    if num_classes > MAX_CLASSES:
        raise ConfigError(
            f"{num_classes} classes: label maps hold at most {MAX_CLASSES} (16-bit PNGs); use fewer names"
        )
    if num_classes <= MAX_8BIT_CLASSES:
        return {"bits": 8, "png": "palette", "background": 0, "ignore": IGNORE_LABEL}
    return {"bits": 16, "png": "grayscale", "background": 0, "ignore": IGNORE_LABEL_16}


def semantic_labels(
    probs: Tensor,
    labels: Tensor,
    threshold: float = 0.5,
    ignore_band: float = 0.0,
    ignore_label: int = IGNORE_LABEL,
) -> Tensor:
    """One label map per image from per-object probabilities.

    Args:
        probs: [B, O, H, W] mask probabilities of each named object.
        labels: [B, O] class label of each object slot (1-based), 0 for an empty slot.
        threshold: a pixel belongs to its most probable object when that probability reaches it.
        ignore_band: pixels whose winning probability lies within ``ignore_band`` of the
            threshold are uncertain and get ``ignore_label`` (255, "ignore" in VOC's convention;
            65535 in 16-bit maps); 0 disables it.

    Returns: uint8 [B, H, W] when every label and the ignore label fit 8 bits, else int32 (a
    16-bit map's values: ``label_format``).
    """
    probs = probs.masked_fill((labels == 0)[..., None, None], 0)
    best, slot = probs.max(1)
    out = labels.gather(1, slot.flatten(1)).view_as(slot)
    out = torch.where(best >= threshold, out, torch.zeros_like(out))
    if ignore_band > 0:
        out = torch.where((best - threshold).abs() < ignore_band, torch.full_like(out, ignore_label), out)
    wide = ignore_label > IGNORE_LABEL or (labels.numel() and int(labels.max()) > MAX_8BIT_CLASSES)
    return out.to(torch.int32 if wide else torch.uint8)


def rle_annotations(masks: np.ndarray) -> list[dict]:
    """bool [O, H, W] -> one COCO RLE per mask, with its area and bounding box (JSON-ready)."""
    if len(masks) == 0:
        return []
    rles = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    # (pycocotools' area() counts its RLEs in a uint8: more than 255 at once overflow)
    chunks = [rles[i : i + 255] for i in range(0, len(rles), 255)]
    areas = np.concatenate([coco_mask.area(chunk) for chunk in chunks])
    boxes = np.concatenate([coco_mask.toBbox(chunk) for chunk in chunks])
    return [
        {
            "segmentation": {"size": list(r["size"]), "counts": r["counts"].decode("ascii")},
            "area": int(a),
            "bbox": [float(v) for v in b],
        }
        for r, a, b in zip(rles, areas, boxes)
    ]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with each label painted in its VOC palette colour (ignore pixels in the palette's 255 colour)."""
    colours = PALETTE_RGB[labels]
    painted = labels > 0
    out = image.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * colours[painted]
    return out.round().clip(0, 255).astype(np.uint8)


def coco_category_ids(classes: Sequence[str]) -> list[int]:
    """COCO's official ids when every class is a COCO class, else 1..N in label order."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    official = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # index = COCO id
    if all(c in official for c in classes):
        return [official.index(c) for c in classes]
    return list(range(1, len(classes) + 1))


class GroundedImageFolder:
    """Write grounded images resumably and export them as a VOC-style folder and COCO JSON."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest = JsonlManifest(self.root / "manifest.jsonl")
        self.classes_path = self.root / "classes.txt"
        self.labels_path = self.root / "labels.json"
        self.palette = voc_palette()

    def classes(self) -> list[str]:
        if not self.classes_path.exists():
            raise UserError(
                f"No grounded image folder at '{self.root}' (missing classes.txt); build it with predict"
            )
        return self.classes_path.read_text().split("\n")[:-1]

    def initialise(self, classes: Sequence[str]) -> None:
        """Create the folder, or check that an existing one has the same classes (label ids)."""
        for sub in ("JPEGImages", "SegmentationClass", "overlays", "ImageSets/Segmentation"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        labels = json.dumps(label_format(len(classes)), indent=2) + "\n"
        if self.classes_path.exists():
            if self.classes() != list(classes):
                raise ConfigError(
                    f"'{self.root}' holds images labelled with other classes ({self.classes()}) than this run "
                    f"({list(classes)}). Write to another folder, or delete this one."
                )
            if not self.labels_path.exists():  # (folders written before labels.json: 8-bit)
                _atomic_write(self.labels_path, lambda tmp: Path(tmp).write_text(labels))
            return
        _atomic_write(self.labels_path, lambda tmp: Path(tmp).write_text(labels))
        _atomic_write(self.classes_path, lambda tmp: Path(tmp).write_text("".join(f"{c}\n" for c in classes)))

    def repair(self) -> None:
        """Clear what an interrupted build left (temporary files, a torn manifest line)."""
        for sub in ("JPEGImages", "SegmentationClass", "overlays"):
            for leftover in (self.root / sub).glob(".*.tmp*"):
                leftover.unlink(missing_ok=True)
        self.manifest.repair()
        records = self.manifest.records()
        kept = [r for r in records if all(p.is_file() for p in self.files(r["id"]))]
        if len(kept) < len(records):  # listed, but an image or label map is gone: make them again
            warnings.warn(
                f"{self.manifest.path}: {len(records) - len(kept)} listed samples lack a file; rebuilding them"
            )
            self.manifest.rewrite(kept)

    def files(self, sample_id: str) -> tuple[Path, Path]:
        return (
            self.root / "JPEGImages" / f"{sample_id}.jpg",
            self.root / "SegmentationClass" / f"{sample_id}.png",
        )

    def write(
        self, record: dict, image: np.ndarray, labels: np.ndarray, overlay_image: np.ndarray | None
    ) -> None:
        """One sample: image HxWx3 uint8, label map HxW (uint8, or uint16 over 254 classes: a
        16-bit PNG), optional overlay; manifest last."""
        sample_id = check_sample_id(record["id"], str(self.manifest.path))
        image_path, label_path = self.files(sample_id)
        _atomic_write(image_path, lambda t: Image.fromarray(image).save(t, format="JPEG", quality=95))
        if labels.dtype == np.uint8:
            label_png = Image.fromarray(labels, mode="P")
            label_png.putpalette(self.palette)
        else:
            label_png = Image.fromarray(labels.astype(np.uint16))  # (PIL: mode I;16, a 16-bit PNG)
        _atomic_write(label_path, lambda t: label_png.save(t, format="PNG"))
        if overlay_image is not None:
            _atomic_write(
                self.root / "overlays" / f"{sample_id}.png",
                lambda t: Image.fromarray(overlay_image).save(t, format="PNG"),
            )
        self.manifest.append(record)

    def write_batch(
        self,
        batch: dict,
        classes: Sequence[str],
        mask_threshold: float = 0.5,
        ignore_band: float = 0.0,
        overlays: bool = True,
    ) -> None:
        """Write a batch of grounded images: ``batch`` holds ``id``, ``split``, ``prompt`` and
        ``categories`` (lists), ``image`` (uint8 [B, 3, H, W]) and ``probs`` ([B, O, H, W], each
        image's categories in its first slots). A category's mask is where its probability
        reaches ``mask_threshold``; the label map and ``ignore_band``: see ``semantic_labels``."""
        probs = batch["probs"].float()
        labels = torch.tensor(
            [
                [classes.index(c) + 1 for c in cs] + [0] * (probs.shape[1] - len(cs))
                for cs in batch["categories"]
            ],
            device=probs.device,
        )
        stored = label_format(len(classes))
        label_maps = (
            semantic_labels(probs, labels, mask_threshold, ignore_band, stored["ignore"]).cpu().numpy()
        )
        label_maps = label_maps.astype(np.uint8 if stored["bits"] == 8 else np.uint16)
        masks = (probs >= mask_threshold).cpu().numpy()
        images = batch["image"].permute(0, 2, 3, 1).cpu().numpy()
        for i, sample_id in enumerate(batch["id"]):
            categories = batch["categories"][i]
            record = {
                "id": sample_id,
                "split": batch["split"][i],
                "prompt": batch["prompt"][i],
                "categories": categories,
                "size": list(label_maps[i].shape),
                "masks": rle_annotations(masks[i, : len(categories)]),
            }
            drawn = overlay(images[i], label_maps[i]) if overlays else None
            self.write(record, images[i], label_maps[i], drawn)

    def finalize(self) -> dict:
        """Image-set lists per split and the COCO JSON, from the manifest (call from one process)."""
        records = sorted(self.manifest.records(), key=lambda r: r["id"])
        classes = self.classes()
        splits: dict[str, list[str]] = {}
        for record in records:
            splits.setdefault(record["split"], []).append(record["id"])
        for split, ids in splits.items():
            path = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
            _atomic_write(path, lambda t, ids=ids: Path(t).write_text("".join(f"{i}\n" for i in ids)))
        ids = coco_category_ids(classes)
        coco = {
            "info": {"description": "grounded-diffusion synthetic segmentation", "version": "1"},
            "categories": [{"id": i, "name": c, "supercategory": "object"} for i, c in zip(ids, classes)],
            "images": [],
            "annotations": [],
        }
        for number, record in enumerate(records, 1):
            height, width = record["size"]
            coco["images"].append(
                {
                    "id": number,
                    "file_name": f"JPEGImages/{record['id']}.jpg",
                    "height": height,
                    "width": width,
                    "prompt": record["prompt"],
                }
            )
            for category, annotation in zip(record["categories"], record["masks"]):
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": number,
                        "category_id": ids[classes.index(category)],
                        "iscrowd": 0,
                        **annotation,
                    }
                )
        _atomic_write(self.root / "annotations.json", lambda t: Path(t).write_text(json.dumps(coco)))
        return {"images": len(records), "splits": {s: len(v) for s, v in splits.items()}}


def _atomic_write(path: Path, write) -> None:
    atomic_write(path, write, KEPT)
