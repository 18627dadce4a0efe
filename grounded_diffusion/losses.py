"""The grounding loss (paper §4.3)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def grounding_loss(
    logits: Tensor, masks: Tensor, categories: Tensor, ignore_zero_masks: bool = True
) -> Tensor:
    """Per-pixel binary cross-entropy over the object slots that carry a label.

    Args:
        logits / masks: [B, O, H, W]; categories: [B, O], -1 for empty slots.
        ignore_zero_masks: "training w/o zero masks": skip objects whose oracle mask is empty
            (mostly the detector's false negatives), the paper's key to unseen categories.
    """
    valid = categories >= 0
    if ignore_zero_masks:
        valid = valid & masks.flatten(2).any(-1)
    # The mean over the valid slots' pixels, as a weighted sum: no host sync, no data-dependent
    # shape, and 0 (with the graph, for DDP's gradient sync) when no slot is valid.
    per_pixel = F.binary_cross_entropy_with_logits(logits, masks.to(logits.dtype), reduction="none")
    weight = valid[..., None, None].to(logits.dtype)
    count = weight.sum() * logits.shape[-1] * logits.shape[-2]
    return (per_pixel * weight).sum() / count.clamp(min=1)
