"""Up-front checks of image + label-map datasets: a bad file stops the run before its first
training step, not at its first validation thousands of steps later."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from grounded_diffusion.errors import UserError

IGNORE_LABEL = 255  # VOC's 8-bit label maps; 16-bit maps (over 254 classes) ignore 65535
IGNORE_LABEL_16 = 65535
# Label PNGs hold one class index per pixel; VOC writes palette ("P") PNGs, many tools grayscale.
LABEL_MODES = ("P", "L", "I", "I;16")
# Images the diffusion model sees (resized to its size) must have this many pixels a side: 2 latent
# pixels at SD's 8x downsampling; below it an object's mask is a block covering the image.
MIN_SIDE = 16


class DataError(UserError, ValueError):
    """A dataset file is missing or does not fit its image or class list."""


def decoded_image(path: Path, fix: str = "replace it or remove its id from the image set"):
    """The whole image (a truncated JPEG opens, and fails only when decoded), or the reason it
    cannot be read, ending with ``fix``."""
    try:
        with Image.open(path) as picture:
            picture.load()
            return picture
    except (OSError, SyntaxError, ValueError) as error:  # (PIL raises all three on damaged files)
        return f"cannot read {path} ({error}): the file is damaged or not an image; {fix}"


def _problem(
    image: Path, labels: Path, num_classes: int, need_object: bool, min_side: int, ignore: int = IGNORE_LABEL
) -> str | None:
    """What is wrong with one image + label-map pair, or None."""
    for path in (image, labels):
        if not path.is_file():
            return f"{path} does not exist"
    picture = decoded_image(image)
    if isinstance(picture, str):
        return picture
    if min(picture.size) < min_side:
        return (
            f"{image} is {picture.size[0]}x{picture.size[1]}, under {min_side} pixels a side: too small to segment "
            "(resized to the model's size it would be a few blocks); remove its id from the image set"
        )
    label_png = decoded_image(labels)
    if isinstance(label_png, str):
        return label_png
    if label_png.mode not in LABEL_MODES:
        return (
            f"{labels} is a {label_png.mode} image; a label map holds one class index per pixel "
            "(a palette or grayscale PNG, value k = class k)"
        )
    if label_png.size != picture.size:
        return (
            f"{labels} is {label_png.size[0]}x{label_png.size[1]} but its image {image.name} is "
            f"{picture.size[0]}x{picture.size[1]}; label maps must match their images pixel for pixel "
            "(resize the label map with nearest-neighbour interpolation)"
        )
    values = np.unique(np.asarray(label_png))
    bad = [int(v) for v in values if num_classes < v != ignore]
    if bad:
        return (
            f"{labels} holds label {bad[0]} but only {num_classes} classes are listed (1..{num_classes}; 0 background, "
            f"{ignore} ignore); add the missing class names to the class list"
        )
    if need_object and not any(0 < v < ignore for v in values):
        return f"{labels} has no labelled object (only background / ignore); remove '{image.stem}' from the image set"
    return None


def ignore_label_of(folder: Path) -> int:
    """The ignore label of a VOC-format folder's label maps: 255 (VOC's), or what its
    ``labels.json`` says (65535 in the 16-bit maps of grounded folders over 254 classes)."""
    import json

    path = Path(folder) / "labels.json"
    if not path.is_file():
        return IGNORE_LABEL
    try:
        ignore = json.loads(path.read_text(encoding="utf-8"))["ignore"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"{path} cannot be read ({error}): it names the label maps' ignore label; fix or delete it"
        ) from None
    if ignore not in (IGNORE_LABEL, IGNORE_LABEL_16):
        raise DataError(
            f"{path}: ignore label {ignore!r} is not {IGNORE_LABEL} (8-bit maps) or {IGNORE_LABEL_16} (16-bit)"
        )
    return ignore


def find_problems(items: Sequence, problem: Callable[[object], str | None], what: str) -> list[str]:
    """``problem(item)`` of every item that has one, in order; run in threads (PIL decodes
    outside the GIL), with a progress bar for large sets."""
    with ThreadPoolExecutor(min(16, (os.cpu_count() or 1) * 2)) as pool:
        results = pool.map(problem, items)
        return [
            p
            for p in tqdm(
                results, total=len(items), desc=f"checking {what}", disable=len(items) < 500, leave=False
            )
            if p
        ]


def check_image_label_pairs(
    pairs: Sequence[tuple[Path, Path]],
    num_classes: int,
    what: str,
    need_object: bool = False,
    min_side: int = 1,
    ignore: int = IGNORE_LABEL,
) -> None:
    """Every image and label map exists, decodes in full, has the same size (at least
    ``min_side`` a side), and holds only labels 0..num_classes or ``ignore``; with ``need_object`` each
    also holds at least one class. Raise one ``DataError`` naming the first bad file, what is
    wrong and the fix, and how many more are bad."""
    problems = find_problems(
        pairs, lambda pair: _problem(*pair, num_classes, need_object, min_side, ignore), what
    )
    if problems:
        more = f" (and {len(problems) - 1} more bad pairs of {len(pairs)})" if len(problems) > 1 else ""
        raise DataError(f"{what}: {problems[0]}{more}")
