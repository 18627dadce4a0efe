"""Segmentation metrics over object slots.

The paper's mIoU (``miou``) is class-averaged over the whole set: for each category, the
intersection and union are summed over every (image, object) of that category, then
IoU = sum(I) / sum(U), then the mean over categories. (torchmetrics' ``segmentation.MeanIoU``
averages per-image IoUs instead, which is a different number.) Its states are integer sums, so
DDP reduction is exact.

DAAM's paper reports another number, here ``image_noun_miou``: the IoU of every (image, noun)
pair, averaged over pairs (``daam.evaluate.MeanEvaluator``).
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


class GroupedIoU(nn.Module):
    """Both metrics for several methods (ours, DAAM, trivial predictors), per Table-1 group
    (``one_seen`` ... ``two_unseen``) and over the whole set (``all``)."""

    def __init__(self, num_categories: int, methods: Sequence[str], groups: Sequence[str] = GROUPS) -> None:
        super().__init__()
        self.methods, self.groups = list(methods), [*groups, "all"]
        keys = [self._key(m, g) for m in self.methods for g in self.groups]
        self.category_iou = nn.ModuleDict({k: CategoryIoU(num_categories) for k in keys})
        self.image_noun_iou = nn.ModuleDict({k: ImageNounIoU() for k in keys})

    @staticmethod
    def _key(method: str, group: str) -> str:
        return f"{method}__{group}".replace(".", "p")  # module names may not hold dots

    def update(self, method: str, preds: Tensor, target: Tensor, categories: Tensor, groups: Sequence[str]) -> None:
        counts = slot_counts(preds, target)  # once for every group
        for group in [*sorted(set(groups)), "all"]:
            rows = torch.tensor([group in (g, "all") for g in groups], device=preds.device)
            in_group = categories.masked_fill(~rows[:, None], -1)  # other groups' slots count as empty
            key = self._key(method, group)
            self.category_iou[key].update(None, None, in_group, counts=counts)
            self.image_noun_iou[key].update(None, None, in_group, counts=counts)

    def compute(self, split: CategorySplit) -> dict[str, dict[str, dict]]:
        """{method: {group: summarize_iou(...) + image_noun_miou + objects (how many were
        scored)}}; every rank must call it."""
        results: dict[str, dict[str, dict]] = {}
        with warnings.catch_warnings():  # a group no sample belongs to is expected, and NaN
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            for method in self.methods:
                for group in self.groups:
                    key = self._key(method, group)
                    summary = summarize_iou(self.category_iou[key].compute(), split)
                    summary["image_noun_miou"] = float(self.image_noun_iou[key].compute()) * 100
                    with self.image_noun_iou[key].sync_context():  # summed over ranks, as compute() sees it
                        summary["objects"] = int(self.image_noun_iou[key].count)
                    results.setdefault(method, {})[group] = summary
        return results

    def reset(self) -> None:
        for metric in [*self.category_iou.values(), *self.image_noun_iou.values()]:
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
        self.add_state("confusion", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        # Ignored pixels go to one extra bin that is dropped: a fixed-size count, where boolean
        # indexing and bincount would need the data on the host (a sync on a GPU).
        cells = self.num_classes**2
        index = target.long() * self.num_classes + preds.long()
        index = torch.where(target == self.ignore_index, cells, index).flatten()
        counts = torch.zeros(cells + 1, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))
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
