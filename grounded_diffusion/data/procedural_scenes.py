"""A procedural scene set with exact masks: the embedded data of the offline default.

Each image holds one or two shapes of named classes (``SCENES`` in vocabulary.py) on a textured
background. Every class has its own shape and hue family, so a model that sees the images can
tell them apart. Images depend only on (seed, sample index): the set is the same everywhere.
The set is written as a PASCAL VOC-format folder, so it goes through the real-image path.
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
from PIL import Image

from grounded_diffusion.data.sources import check_counts
from grounded_diffusion.data.validation import DataError
from grounded_diffusion.data.voc import VOCFolder, write_voc_folder
from grounded_diffusion.data.vocabulary import SCENES
from grounded_diffusion.shapes_world.render import shape_mask

HUES = {name: i / len(SCENES) for i, name in enumerate(SCENES)}


def render_scene(index: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Image [H, W, 3] uint8, label map [H, W] (0 = background, k+1 = SCENES[k]), class names."""
    rng = np.random.default_rng([seed, index])
    num_objects = int(rng.integers(1, 3))
    names = list(rng.choice(SCENES, size=num_objects, replace=False))
    # Textured background: low-frequency colour noise, dim and unsaturated.
    coarse = rng.uniform(0.15, 0.55, size=(4, 4, 3)).astype(np.float32)
    background = np.array(
        Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    )
    image = background.astype(np.float32) + rng.normal(0, 6, size=(size, size, 3))
    labels = np.zeros((size, size), dtype=np.uint8)
    for k, name in enumerate(names):
        r = size * rng.uniform(0.16, 0.26)
        # Two objects sit in opposite halves so that each stays mostly visible.
        lo, hi = (r, size - r) if num_objects == 1 else ((r, size / 2) if k == 0 else (size / 2, size - r))
        cx, cy = rng.uniform(lo, hi), rng.uniform(r, size - r)
        mask = shape_mask(name, size, cx, cy, r, rng.uniform(0, 2 * np.pi))
        hue = (HUES[name] + rng.uniform(-0.03, 0.03)) % 1.0
        colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 0.95), rng.uniform(0.75, 1.0))) * 255
        shading = 1 + 0.15 * (np.mgrid[0:size, 0:size][0] - cy) / size  # a little vertical light
        image[mask] = colour[None] * shading[mask][:, None]
        labels[mask] = SCENES.index(name) + 1
    image = np.clip(image + rng.normal(0, 3, size=image.shape), 0, 255).astype(np.uint8)
    present = [n for n in names if (labels == SCENES.index(n) + 1).any()]
    return image, labels, present


def write_scene_folder(root: str | Path, counts: dict[str, int], size: int = 128, seed: int = 0) -> Path:
    """Write ``counts[split]`` scenes per split as a VOC folder (ids ``scene-{split}-{i:06d}``)."""
    samples = {}
    offset = 0
    for split, count in counts.items():
        samples[split] = [
            (f"scene-{split}-{i:06d}", *render_scene(offset + i, size, seed)[:2]) for i in range(count)
        ]
        offset += 1_000_000  # disjoint random streams per split
    return write_voc_folder(root, SCENES, samples)


class ProceduralScenes(VOCFolder):
    """The procedural scene set as a data source, generated into ``root`` on first use.

    Args:
        root: where the VOC-format folder goes.
        counts: images per split.
        image_size: image side in pixels.
        seed: the set's seed (same seed, same images).
    """

    def __init__(
        self,
        root: str = "outputs/scenes",
        counts: dict[str, int] | None = None,
        image_size: int = 128,
        seed: int = 0,
    ) -> None:
        default = {"train": 800, "val": 100, "test": 200}
        self.counts = check_counts(dict(default if counts is None else counts), "counts")
        self.seed = seed
        super().__init__(root, classes=list(SCENES), image_size=image_size, splits=list(self.counts))

    def changed(self, record: dict, category_split=None, trust_stat: bool = True) -> str | None:
        """As a VOC folder's, and the scenes on disk must be of this seed and size: a ``fit``
        after the seed changed, before ``predict`` wrote the new scenes, is refused too."""
        try:
            written = json.loads((self.root / "scenes.json").read_text())
        except (OSError, ValueError):
            written = None
        if isinstance(written, dict) and (written.get("seed"), written.get("size")) != (
            self.seed,
            self.image_size,
        ):
            return (
                f"the scenes were written with seed {written.get('seed')}, size {written.get('size')}; "
                f"data.source asks for seed {self.seed}, size {self.image_size}"
            )
        return super().changed(record, category_split, trust_stat)

    def prepare(self) -> None:
        marker = self.root / "scenes.json"
        wanted = json.dumps({"counts": self.counts, "size": self.image_size, "seed": self.seed})
        if not (marker.exists() and marker.read_text() == wanted):
            write_scene_folder(self.root, self.counts, self.image_size, self.seed)
            marker.write_text(wanted)
        try:  # a folder written earlier may have lost or damaged files since
            super().prepare()
        except DataError as error:
            raise DataError(
                f"{error}. The folder is generated: delete {self.root} and rerun to write it again"
            ) from None
