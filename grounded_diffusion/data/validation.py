"""Up-front checks of image + label-map datasets: a bad file stops the run before its first
training step, not at its first validation thousands of steps later."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from grounded_diffusion.errors import UserError

IGNORE_LABEL = 255
# Label PNGs hold one class index per pixel; VOC writes palette ("P") PNGs, many tools grayscale.
LABEL_MODES = ("P", "L", "I", "I;16")


class DataError(UserError, ValueError):
    """A dataset file is missing or does not fit its image or class list."""


def _problem(image: Path, labels: Path, num_classes: int, need_object: bool) -> str | None:
    """What is wrong with one image + label-map pair, or None."""
    for path in (image, labels):
        if not path.is_file():
            return f"{path} does not exist"
    try:
        with Image.open(image) as picture:
            image_size = picture.size
        with Image.open(labels) as label_png:
            if label_png.mode not in LABEL_MODES:
                return (f"{labels} is a {label_png.mode} image; a label map holds one class index per pixel "
                        "(a palette or grayscale PNG, value k = class k)")  # fmt: skip
            if label_png.size != image_size:
                return (f"{labels} is {label_png.size[0]}x{label_png.size[1]} but its image {image.name} is "
                        f"{image_size[0]}x{image_size[1]}; label maps must match their images pixel for pixel "
                        "(resize the label map with nearest-neighbour interpolation)")  # fmt: skip
            values = np.unique(np.asarray(label_png))
    except OSError as error:
        return f"cannot read {image} or {labels} ({error})"
    bad = [int(v) for v in values if num_classes < v < IGNORE_LABEL]
    if bad:
        return (f"{labels} holds label {bad[0]} but only {num_classes} classes are listed (1..{num_classes}; 0 background, "
                "255 ignore); add the missing class names to the class list")  # fmt: skip
    if need_object and not any(0 < v < IGNORE_LABEL for v in values):
        return f"{labels} has no labelled object (only background / ignore); remove '{image.stem}' from the image set"
    return None


def check_image_label_pairs(
    pairs: Sequence[tuple[Path, Path]], num_classes: int, what: str, need_object: bool = False
) -> None:
    """Every image and label map exists, is readable, has the same size, and holds only labels
    0..num_classes or 255; with ``need_object`` each also holds at least one class. Raise one
    ``DataError`` naming the first bad file, what is wrong and the fix, and how many more are bad."""
    workers = min(16, (os.cpu_count() or 1) * 2)
    check = lambda pair: _problem(*pair, num_classes, need_object)  # noqa: E731
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes outside the GIL
        results = pool.map(check, pairs)
        problems = [p for p in tqdm(results, total=len(pairs), desc=f"checking {what}", disable=len(pairs) < 500, leave=False) if p]
    if problems:
        more = f" (and {len(problems) - 1} more bad pairs of {len(pairs)})" if len(problems) > 1 else ""
        raise DataError(f"{what}: {problems[0]}{more}")
