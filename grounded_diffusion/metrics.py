"""Segmentation metrics over object slots.

The paper's mIoU is class-averaged over the whole set: for each category, the intersection and
union are summed over every (image, object) of that category, then IoU = sum(I) / sum(U), then the
mean over categories. (torchmetrics' ``segmentation.MeanIoU`` averages per-image IoUs instead,
which is a different number.) States are integer sums, so DDP reduction is exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from grounded_diffusion.data.vocabulary import CategorySplit


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

    def update(self, preds: Tensor, target: Tensor, categories: Tensor) -> None:
        valid = categories >= 0
        preds, target = preds.bool()[valid].flatten(1), target.bool()[valid].flatten(1)
        index = categories[valid]
        self.intersection.index_add_(0, index, (preds & target).sum(1))
        self.union.index_add_(0, index, (preds | target).sum(1))

    def compute(self) -> Tensor:
        union = self.union.double()
        return torch.where(union > 0, self.intersection.double() / union.clamp(min=1), math.nan)


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
