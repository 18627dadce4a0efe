"""Category vocabularies and their seen/unseen splits (DESIGN.md §3)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from grounded_diffusion.errors import ConfigError, UserError

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

# The procedural scene set of the offline default: one shape per class (data/scenes.py).
SCENES = ("disc", "square", "triangle", "ring", "cross", "star", "diamond", "bar")
SCENES_UNSEEN = {1: ("ring", "star", "bar")}

VOCABULARIES = {"pascal": PASCAL_VOC, "scenes": SCENES}
UNSEEN_SPLITS = {"pascal": PASCAL_UNSEEN, "scenes": SCENES_UNSEEN}


class UnknownCategoryError(UserError, ValueError):
    pass


def check_categories(names: Iterable[str], vocabulary: Sequence[str], what: str = "category") -> None:
    """Raise naming every unknown name with its nearest valid names."""
    problems = []
    for name in names:
        if name not in vocabulary:
            near = difflib.get_close_matches(name, vocabulary, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(repr(n) for n in near)}?" if near else "no close match"
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
    def named(cls, vocabulary: str, split: int | None = None, unseen: Sequence[str] | None = None) -> CategorySplit:
        """``vocabulary`` by name; unseen categories from ``split`` or listed in ``unseen``."""
        if vocabulary not in VOCABULARIES:
            check_categories([vocabulary], list(VOCABULARIES), "vocabulary")
        if split is not None and unseen is not None:
            raise ConfigError("Give either split or unseen, not both")
        if split is not None:
            splits = UNSEEN_SPLITS[vocabulary]
            if split not in splits:
                raise ConfigError(f"Vocabulary '{vocabulary}' has splits {sorted(splits)}, not {split}")
            unseen = splits[split]
        return cls(VOCABULARIES[vocabulary], tuple(unseen or ()))
