"""Category vocabularies and their seen/unseen splits (docs/design.md §3)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from grounded_diffusion.errors import ConfigError, UserError, did_you_mean
from grounded_diffusion.files import read_text_file
from grounded_diffusion.shapes_world.render import (
    SHAPES_WIDE,
    SHAPES_WIDE_UNSEEN,
    SHAPES_WORLD,
    SHAPES_WORLD_UNSEEN,
)

PASCAL_VOC = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

# PASCAL-sim splits of the authors' code: the 5 unseen categories of each split.
PASCAL_UNSEEN = {
    1: ("tvmonitor", "car", "dog", "sofa", "train"),
    2: ("horse", "motorbike", "person", "pottedplant", "sheep"),
    3: ("bus", "cat", "chair", "cow", "diningtable"),
}

# COCO's 80 thing classes, in COCO's label order.
COCO = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# COCO-sim splits, 65 seen / 15 unseen. Split 1 is the standard zero-shot split; splits 2 and 3
# are our fixed rotations: disjoint from split 1 and from each other, one or two classes per
# COCO super-category, like split 1.
COCO_UNSEEN = {
    1: ("airplane", "train", "parking meter", "cat", "bear", "suitcase", "frisbee", "snowboard",
        "fork", "sandwich", "hot dog", "toilet", "mouse", "toaster", "hair drier"),
    2: ("bus", "boat", "fire hydrant", "dog", "giraffe", "umbrella", "skis", "kite", "knife",
        "pizza", "banana", "bed", "keyboard", "microwave", "scissors"),
    3: ("truck", "bicycle", "stop sign", "horse", "zebra", "backpack", "surfboard",
        "tennis racket", "cup", "donut", "broccoli", "couch", "laptop", "refrigerator", "clock"),
}  # fmt: skip

# Seen-count ablation (paper Tab. 4): seen/unseen = 5/75, 20/60, 35/45, 50/30, 65/15 on COCO-sim.
SEEN_COUNTS = (5, 20, 35, 50, 65)


def _spread_order(n: int) -> list[int]:
    """0..n-1 in bit-reversed order: every prefix is spread evenly over the range, and a shorter
    prefix is part of every longer one."""
    bits = max(1, (n - 1).bit_length())
    reverse = lambda i: int(format(i, f"0{bits}b")[::-1], 2)  # noqa: E731
    return sorted(range(n), key=reverse)


def coco_seen_count_split(num_seen: int) -> tuple[str, ...]:
    """The unseen classes of the ablation set with ``num_seen`` seen classes.

    The seen classes are taken from split 1's 65 seen classes (in COCO order, which groups the
    super-categories) in a spread-out order, so the sets are nested: seen-5 ⊂ seen-20 ⊂ … ⊂ seen-65.
    """
    seen65 = [c for c in COCO if c not in COCO_UNSEEN[1]]
    seen = {seen65[i] for i in _spread_order(len(seen65))[:num_seen]}
    return tuple(c for c in COCO if c not in seen)


COCO_UNSEEN.update({f"seen{n}": coco_seen_count_split(n) for n in SEEN_COUNTS})

# PASCAL VOC names of the classes that COCO (and so a COCO-trained oracle) names differently.
VOC_TO_COCO = {
    "aeroplane": "airplane",
    "motorbike": "motorcycle",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "tvmonitor": "tv",
}

# The procedural scene set of the offline default: one shape per class (data/procedural_scenes.py).
SCENES = ("disc", "square", "triangle", "ring", "cross", "star", "diamond", "bar")
SCENES_UNSEEN = {1: ("ring", "star", "bar")}

# The shapes world of the trained embedded models: colour x shape (shapes_world/render.py).
VOCABULARIES = {
    "pascal": PASCAL_VOC,
    "coco": COCO,
    "scenes": SCENES,
    "shapes": SHAPES_WORLD,
    "shapes_wide": SHAPES_WIDE,
}
# Zero-shot semantic segmentation of real images (ZS3, Protocol II): the standard splits.
PASCAL_UNSEEN["zs3"] = ("pottedplant", "sheep", "sofa", "train", "tvmonitor")
COCO_UNSEEN["zs3"] = COCO_UNSEEN[1]  # the standard 65/15

UNSEEN_SPLITS = {
    "pascal": PASCAL_UNSEEN,
    "coco": COCO_UNSEEN,
    "scenes": SCENES_UNSEEN,
    "shapes": SHAPES_WORLD_UNSEEN,
    "shapes_wide": SHAPES_WIDE_UNSEEN,
}


class UnknownCategoryError(UserError, ValueError):
    pass


def check_categories(names: Iterable[str], vocabulary: Sequence[str], what: str = "category") -> None:
    """Raise naming every unknown name with its nearest valid names."""
    problems = []
    for name in names:
        if name not in vocabulary:
            hint = did_you_mean(name, vocabulary, n=3) or "no close match"
            problems.append(f"'{name}' ({hint})")
    if problems:
        raise UnknownCategoryError(
            f"Unknown {what} {'; '.join(problems)}. Valid names: {', '.join(vocabulary)}"
        )


@dataclass(frozen=True)
class CategorySplit:
    """An ordered vocabulary with its unseen categories (everything else is seen)."""

    categories: tuple[str, ...]
    unseen: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_categories(self.unseen, self.categories, "unseen category")

    @property
    def seen(self) -> tuple[str, ...]:
        return tuple(c for c in self.categories if c not in self.unseen)

    def index(self, name: str) -> int:
        check_categories([name], self.categories)
        return self.categories.index(name)

    @classmethod
    def named(
        cls,
        vocabulary: Vocabulary,
        split: int | str | None = None,
        unseen: Sequence[str] | None = None,
        seen: Sequence[str] | None = None,
    ) -> CategorySplit:
        """``vocabulary`` (see ``resolve_vocabulary``) with unseen categories from ``split``
        (built-in vocabularies: 1, 2, 3; on COCO also the seen-count sets ``seen5`` … ``seen65``),
        listed in ``unseen``, or everything but ``seen``; none of them: every category is seen."""
        categories = resolve_vocabulary(vocabulary)
        given = [
            name
            for name, value in (("split", split), ("unseen", unseen), ("seen", seen))
            if value is not None
        ]
        both = sorted(set(seen or ()) & set(unseen or ()))
        if both:
            raise ConfigError(
                f"{', '.join(both)} listed as both seen and unseen; give only one list (the other categories are the rest)"
            )
        for name, names in (("unseen", unseen), ("seen", seen)):
            twice = sorted({n for n in names or () if list(names).count(n) > 1})
            if twice:
                raise ConfigError(f"{name} lists {', '.join(twice)} more than once; list each category once")
        if len(given) > 1:
            raise ConfigError(
                f"Give one of split, unseen or seen (the others null), not {' and '.join(given)}"
            )
        if split is not None:
            splits = UNSEEN_SPLITS.get(vocabulary, {}) if isinstance(vocabulary, str) else {}
            if split not in splits:
                names = (
                    ", ".join(repr(k) for k in splits)
                    or "none (list the unseen categories in `unseen` or the seen ones in `seen`)"
                )
                raise ConfigError(f"Vocabulary {vocabulary!r} has splits {names}, not {split!r}")
            unseen = splits[split]
        if seen is not None:
            check_categories(seen, categories, "seen category")
            unseen = [c for c in categories if c not in seen]
        return cls(categories, tuple(unseen or ()))


# A vocabulary: a built-in name, a classes file, or the class names themselves.
Vocabulary = str | Sequence[str]
# First lines of a VOC tool's class list that name the background, not a class.
BACKGROUND_NAMES = ("background", "__background__", "_background_")


def read_classes_file(path: str | Path) -> tuple[str, ...]:
    """Class names from a text file, one per line in label order (label k = line k, 1-based).
    Blank lines and surrounding spaces are ignored and names keep their inner spaces
    ("traffic light"). A first line ``background`` (as many VOC tools write; also
    ``__background__``) is label 0, not a class, and is skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Classes file '{path}' does not exist (one class name per line, in label order)")
    names = [line.strip() for line in read_text_file(path, "Classes file").splitlines() if line.strip()]
    if names and names[0].lower() in BACKGROUND_NAMES:
        names = names[1:]
    if not names:
        raise ConfigError(f"Classes file '{path}' names no class (one class name per line, in label order)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"Classes file '{path}' names {duplicates} more than once")
    return tuple(names)


def resolve_vocabulary(vocabulary: Vocabulary) -> tuple[str, ...]:
    """The category names of ``vocabulary``: a built-in name (``pascal``, ``coco``, ``scenes``),
    the path of a classes file (``read_classes_file``), or a list of names."""
    if isinstance(vocabulary, str):
        if vocabulary in VOCABULARIES:
            return VOCABULARIES[vocabulary]
        if Path(vocabulary).suffix or "/" in vocabulary:
            return read_classes_file(vocabulary)
        hint = f"{did_you_mean(vocabulary, list(VOCABULARIES))} ".lstrip()
        raise ConfigError(
            f"Unknown vocabulary '{vocabulary}' ({hint}built-in: {', '.join(VOCABULARIES)}); give a built-in "
            "name, a classes file (data/my/classes.txt, one name per line) or a list of names"
        )
    names = tuple(str(n).strip() for n in vocabulary)
    if not names or not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"A vocabulary list needs distinct, non-empty names; got {list(vocabulary)}")
    return names


def vocabulary_label(vocabulary: Vocabulary) -> str:
    """A short name for reports and folders: the built-in name, the classes file's folder
    (``data/flowers/classes.txt`` -> ``flowers``), or ``custom`` for a list."""
    if not isinstance(vocabulary, str):
        return "custom"
    return vocabulary if vocabulary in VOCABULARIES else Path(vocabulary).resolve().parent.name
