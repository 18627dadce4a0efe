"""Small real-format datasets the Protocol II tests create: a PASCAL VOC tree in torchvision's
layout and a COCO folder with instance annotations (polygons and a crowd RLE)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from grounded_diffusion.data.voc import write_voc_folder
from grounded_diffusion.data.vocabulary import COCO, PASCAL_VOC

SIZE = 48


def rectangle_image(seed: int, boxes: list[tuple[int, int, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """An image with coloured rectangles and its label map: boxes (label, x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for label, x0, y0, x1, y1 in boxes:
        image[y0:y1, x0:x1] = (37 * label % 256, 91 * label % 256, 53 * label % 256)
        labels[y0:y1, x0:x1] = label
    return image, labels


# (label (VOC index from 1), box) per image; sheep (17) and tvmonitor (20) are ZS3-unseen.
VOC_IMAGES = {
    "train": [
        [(12, 4, 4, 30, 30)],
        [(15, 10, 10, 40, 44)],
        [(17, 0, 0, 20, 20), (8, 24, 24, 46, 46)],
        [(3, 6, 6, 26, 40)],
    ],
    "val": [[(12, 4, 4, 30, 30)], [(20, 8, 8, 40, 40)], [(17, 2, 2, 30, 22)]],
}


def make_voc(root: Path) -> Path:
    """root/VOCdevkit/VOC2012 with train (one image holds an unseen class) and val."""
    samples = {}
    for split, images in VOC_IMAGES.items():
        items = []
        for number, boxes in enumerate(images):
            image, labels = rectangle_image(number + 100 * (split == "val"), boxes)
            labels[0, :] = 255  # VOC's ignore border
            items.append((f"2012_{split}_{number:03d}", image, labels))
        samples[split] = items
    write_voc_folder(root / "VOCdevkit" / "VOC2012", PASCAL_VOC, samples)
    return root


def make_coco(root: Path) -> tuple[Path, Path]:
    """root/val2017/*.jpg and root/annotations/instances_val2017.json (official category ids)."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    official = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    images_dir, annotations_path = root / "val2017", root / "annotations" / "instances_val2017.json"
    images_dir.mkdir(parents=True)
    annotations_path.parent.mkdir(parents=True)
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": official.index(c), "name": c} for c in COCO],
    }
    layout = [
        [("dog", 4, 4, 30, 30)],
        [("cat", 8, 8, 40, 40), ("bear", 20, 20, 30, 30)],
        [("dog", 2, 2, 44, 44)],
    ]
    for number, boxes in enumerate(layout, 1):
        image, _ = rectangle_image(number, [(COCO.index(n) + 1, *box) for n, *box in boxes])
        Image.fromarray(image).save(images_dir / f"{number:012d}.jpg", quality=95)
        coco["images"].append(
            {"id": number, "file_name": f"{number:012d}.jpg", "height": SIZE, "width": SIZE}
        )
        for name, x0, y0, x1, y1 in boxes:
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": number,
                    "category_id": official.index(name),
                    "iscrowd": 0,
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                    "area": (x1 - x0) * (y1 - y0),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                }
            )
    crowd = np.zeros((SIZE, SIZE), dtype=np.uint8)
    crowd[40:46, 0:10] = 1
    rle = coco_mask.encode(np.asfortranarray(crowd))
    coco["annotations"].append(
        {
            "id": len(coco["annotations"]) + 1,
            "image_id": 3,
            "category_id": official.index("person"),
            "iscrowd": 1,
            "segmentation": {"size": [SIZE, SIZE], "counts": rle["counts"].decode()},
            "area": 60,
            "bbox": [0, 40, 10, 6],
        }
    )
    annotations_path.write_text(json.dumps(coco))
    return images_dir, annotations_path
