"""Segmentation metrics over object slots.

The paper's mIoU (``miou``) is class-averaged over the whole set: for each category, the
intersection and union are summed over every (image, object) of that category, then
IoU = sum(I) / sum(U), then the mean over categories. (torchmetrics' ``segmentation.MeanIoU``
averages per-image IoUs instead, which is a different number.) Its states are integer sums, so
DDP reduction is exact.

DAAM's paper reports another number, here ``image_noun_miou``: the IoU of every (image, noun)
pair, averaged over pairs (``daam.evaluate.MeanEvaluator``).

``on_other_object`` tells whether a method keeps the objects of one image apart: the share of the
pixels it predicts for an object that lie on another object named in the same prompt.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from grounded_diffusion.data.prompts import GROUPS
from grounded_diffusion.data.vocabulary import CategorySplit


def slot_counts(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union pixel counts of each object slot, [B, O] (no boolean indexing:
    no data-dependent shape, no host sync, so an update stays on the device)."""
    preds, target = preds.bool().flatten(2), target.bool().flatten(2)
    return (preds & target).sum(-1), (preds | target).sum(-1)


class CategoryIoU(Metric):
    """Per-category IoU from binary masks of object slots.

    ``update(preds, target, categories)``: preds/target bool [B, O, H, W]; categories long
    [B, O] with -1 for empty slots. ``compute()``: IoU per category [C] (NaN if never seen).
    """

    full_state_update = False

    def __init__(self, num_categories: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_categories = num_categories
        self.add_state("intersection", torch.zeros(num_categories, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros(num_categories, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor | None, target: Tensor | None, categories: Tensor, counts=None) -> None:
        """``counts``: ``slot_counts(preds, target)`` when the caller has them already."""
        valid = categories >= 0
        intersection, union = counts or slot_counts(preds, target)
        index = categories.clamp(min=0).flatten()  # empty slots add 0 to category 0
        self.intersection.index_add_(0, index, (intersection * valid).flatten())
        self.union.index_add_(0, index, (union * valid).flatten())

    def compute(self) -> Tensor:
        union = self.union.double()
        return torch.where(union > 0, self.intersection.double() / union.clamp(min=1), math.nan)


class ImageNounIoU(Metric):
    """Mean over (image, object) pairs of the pair's IoU; an empty union counts as 0, as in
    ``daam.evaluate.compute_iou`` (I / (U + 1e-8)). Same ``update`` as ``CategoryIoU``."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor | None, target: Tensor | None, categories: Tensor, counts=None) -> None:
        valid = categories >= 0
        intersection, union = (c.double() for c in counts or slot_counts(preds, target))
        self.total += (intersection / (union + 1e-8) * valid).sum()
        self.count += valid.sum()

    def compute(self) -> Tensor:
        return self.total / self.count if self.count > 0 else torch.tensor(math.nan, dtype=torch.float64)


def other_object_counts(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per object slot, [B, O]: its predicted pixels that lie on another object of its image
    (outside its own truth), and all its predicted pixels; both 0 for an object whose image has
    no other object with a non-empty truth mask, where the share would be 0 by construction."""
    preds, target = preds.bool().flatten(2), target.bool().flatten(2)
    others = (target.sum(1, keepdim=True) > target.long()) & ~target  # [B, O, HW]
    has_other = others.any(-1)
    return (preds & others).sum(-1) * has_other, preds.sum(-1) * has_other


class OtherObjectShare(Metric):
    """Of the pixels predicted for the objects of multi-object images, the share that lies on
    another object named in the same prompt: Σ on-other pixels / Σ predicted pixels.

    A head that ignores its text gives every object of an image the same mask, and about half of
    each lands on the other object. ``update`` as ``CategoryIoU``'s, where ``target`` holds every
    named object's truth (empty slots: empty masks) and ``categories`` marks the objects that
    count (-1: not counted); ``counts``: ``other_object_counts(preds, target)``.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("on_other", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("predicted", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor | None, target: Tensor | None, categories: Tensor, counts=None) -> None:
        on_other, predicted = counts or other_object_counts(preds, target)
        counted = categories >= 0
        self.on_other += (on_other * counted).sum()
        self.predicted += (predicted * counted).sum()

    def compute(self) -> Tensor:
        if self.predicted == 0:
            return torch.tensor(math.nan, dtype=torch.float64)
        return self.on_other.double() / self.predicted


class PairConfusion(Metric):
    """``OtherObjectShare`` per ordered pair of categories: for an object of category a named with
    one of category b, the pixels predicted for a that lie on b (outside a's own truth), and all
    pixels predicted for a. ``update(preds, target, categories, named)``: ``categories`` marks the
    objects that count (-1: not counted), ``named`` every object of the image (-1: empty slot).
    ``compute()``: [2, C, C], on-other pixels and predicted pixels, row a, column b.
    """

    full_state_update = False

    def __init__(self, num_categories: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_categories = num_categories
        cells = num_categories**2
        self.add_state("on_other", torch.zeros(cells, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("predicted", torch.zeros(cells, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, categories: Tensor, named: Tensor) -> None:
        preds, target = preds.bool().flatten(2), target.bool().flatten(2)  # [B, O, HW]
        other = target[:, None] & ~target[:, :, None]  # [B, O (object), O (other), HW]
        on_other = (preds[:, :, None] & other).sum(-1)
        slots = torch.arange(target.shape[1], device=target.device)
        counted = (categories[:, :, None] >= 0) & (named[:, None] >= 0) & other.any(-1)
        counted &= slots[:, None] != slots[None]
        index = (
            categories.clamp(min=0)[:, :, None] * self.num_categories + named.clamp(min=0)[:, None]
        ).flatten()
        self.on_other.index_add_(0, index, (on_other * counted).flatten())
        self.predicted.index_add_(0, index, (preds.sum(-1)[:, :, None] * counted).flatten())

    def compute(self) -> Tensor:
        return torch.stack([self.on_other, self.predicted]).view(2, self.num_categories, self.num_categories)


def confused_pairs(counts: Tensor, names: Sequence[str], top: int = 10) -> list[dict]:
    """The category pairs (both directions together) with the most predicted pixels on the other
    object, from ``PairConfusion.compute()``: [{pair, on_other_object (%), on_other_pixels,
    predicted_pixels}], most first; pairs without a pixel on the other object are left out."""
    on_other, predicted = (c + c.T for c in counts.cpu().long())  # a with b and b with a
    rows = []
    for a, b in zip(*torch.triu_indices(len(names), len(names), offset=1).tolist()):
        if on_other[a, b] > 0:
            pixels, total = int(on_other[a, b]), int(predicted[a, b])
            rows.append(
                {
                    "pair": [names[a], names[b]],
                    "on_other_object": 100 * pixels / total,
                    "on_other_pixels": pixels,
                    "predicted_pixels": total,
                }
            )
    return sorted(rows, key=lambda r: -r["on_other_pixels"])[:top]


class GroupedIoU(nn.Module):
    """The metrics above for several methods (ours, DAAM, trivial predictors), per Table-1 group
    (``one_seen`` ... ``two_unseen``) and over the whole set (``all``)."""

    def __init__(self, num_categories: int, methods: Sequence[str], groups: Sequence[str] = GROUPS) -> None:
        super().__init__()
        self.methods, self.groups = list(methods), [*groups, "all"]
        keys = [self._key(m, g) for m in self.methods for g in self.groups]
        self.category_iou = nn.ModuleDict({k: CategoryIoU(num_categories) for k in keys})
        self.image_noun_iou = nn.ModuleDict({k: ImageNounIoU() for k in keys})
        self.on_other_object = nn.ModuleDict({k: OtherObjectShare() for k in keys})

    @staticmethod
    def _key(method: str, group: str) -> str:
        return f"{method}__{group}".replace(".", "p")  # module names may not hold dots

    def update(
        self, method: str, preds: Tensor, target: Tensor, categories: Tensor, groups: Sequence[str]
    ) -> None:
        counts, other_counts = (
            slot_counts(preds, target),
            other_object_counts(preds, target),
        )  # once for every group
        for group in [*sorted(set(groups)), "all"]:
            rows = torch.tensor([group in (g, "all") for g in groups], device=preds.device)
            in_group = categories.masked_fill(~rows[:, None], -1)  # other groups' slots count as empty
            key = self._key(method, group)
            self.category_iou[key].update(None, None, in_group, counts=counts)
            self.image_noun_iou[key].update(None, None, in_group, counts=counts)
            self.on_other_object[key].update(None, None, in_group, counts=other_counts)

    def compute(self, split: CategorySplit) -> dict[str, dict[str, dict]]:
        """{method: {group: summarize_iou(...) + image_noun_miou + on_other_object (both in %)
        + objects (how many were scored)}}; every rank must call it."""
        results: dict[str, dict[str, dict]] = {}
        with warnings.catch_warnings():  # a group no sample belongs to is expected, and NaN
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            for method in self.methods:
                for group in self.groups:
                    key = self._key(method, group)
                    summary = summarize_iou(self.category_iou[key].compute(), split)
                    summary["image_noun_miou"] = float(self.image_noun_iou[key].compute()) * 100
                    summary["on_other_object"] = float(self.on_other_object[key].compute()) * 100
                    with self.image_noun_iou[key].sync_context():  # summed over ranks, as compute() sees it
                        summary["objects"] = int(self.image_noun_iou[key].count)
                    results.setdefault(method, {})[group] = summary
        return results

    def reset(self) -> None:
        for metric in [
            *self.category_iou.values(),
            *self.image_noun_iou.values(),
            *self.on_other_object.values(),
        ]:
            metric.reset()


def harmonic_mean(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b) or a + b == 0:
        return math.nan if math.isnan(a) or math.isnan(b) else 0.0
    return 2 * a * b / (a + b)


def summarize_iou(iou: Tensor, split: CategorySplit) -> dict:
    """Seen / unseen / harmonic mIoU (in %) and per-category IoU; categories absent from the
    evaluated set (NaN) are left out of the means."""
    # reshape: torchmetrics squeezes a one-element compute() result to a scalar.
    per_category = {c: float(v) * 100 for c, v in zip(split.categories, iou.reshape(-1).tolist())}

    def mean(names) -> float:
        values = [per_category[c] for c in names if not math.isnan(per_category[c])]
        return sum(values) / len(values) if values else math.nan

    seen, unseen = mean(split.seen), mean(split.unseen)
    return {
        "miou": mean(split.categories),
        "seen_miou": seen,
        "unseen_miou": unseen,
        "harmonic_miou": harmonic_mean(seen, unseen),
        "per_category": per_category,
    }


class SemanticIoU(Metric):
    """Per-class IoU of label maps from a confusion matrix summed over the whole set (Σ∩/Σ∪),
    the ZS3 protocol's number; pixels labelled 255 are ignored. ``update(preds, target)``:
    long [B, H, W]. ``compute()``: IoU per class [K] (NaN for a class absent from both)."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state(
            "confusion", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        # Ignored pixels go to one extra bin that is dropped: a fixed-size count, where boolean
        # indexing and bincount would need the data on the host (a sync on a GPU).
        cells = self.num_classes**2
        index = target.long() * self.num_classes + preds.long()
        index = torch.where(target == self.ignore_index, cells, index).flatten()
        counts = torch.zeros(cells + 1, dtype=torch.long, device=index.device).index_add_(
            0, index, torch.ones_like(index)
        )
        self.confusion += counts[:cells].view(self.num_classes, self.num_classes)

    def compute(self) -> Tensor:
        confusion = self.confusion.double()
        intersection = confusion.diagonal()
        union = confusion.sum(0) + confusion.sum(1) - intersection
        return torch.where(union > 0, intersection / union.clamp(min=1), math.nan)


def zs3_summary(iou: Tensor, split: CategorySplit, background: bool = False) -> dict:
    """Seen / unseen / harmonic mIoU (%) of a ``SemanticIoU`` over the split's vocabulary, and
    background first when it is a class (it then counts as a seen class)."""
    categories = ("background", *split.categories) if background else split.categories
    return summarize_iou(iou, CategorySplit(categories, split.unseen))
