"""What a ``predict`` run turns into triplets: a sample source.

A source (``VOCFolder``, ``ProceduralScenes``, ``PromptSet``) has

- ``prepare()``: make the data available (called once per node);
- ``check(category_split)``: fail at config time on categories or groups the split cannot serve;
- ``dataset(category_split, exclude, max_per_group)``: the samples whose ids are not in
  ``exclude`` (already cached), at most ``max_per_group`` of each (split, group), in a fixed order.

Image sources yield ``{id, split, prompt, categories, image, masks}``; prompt sources yield
``{id, split, group, prompt, categories, seed}`` and the model generates the rest.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence

import torch


def sample_seed(sample_id: str) -> int:
    """A stable 63-bit seed from a sample id: same id, same noise, whatever the batch or rank."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "little") >> 1


def select_items(items: Iterable[tuple], exclude: set[str], max_per_group: int | None) -> list[tuple]:
    """Items ``(id, *group_key)`` minus the excluded ids, capped per group key. The cap counts
    excluded items too, so a resumed build asks for the same ids as the first one."""
    taken: Counter = Counter()
    selected = []
    for item in items:
        key = item[1:]
        taken[key] += 1
        if max_per_group is not None and taken[key] > max_per_group:
            continue
        if item[0] not in exclude:
            selected.append(item)
    return selected


def pad_objects(masks: torch.Tensor, max_objects: int) -> torch.Tensor:
    """[O, ...] -> [max_objects, ...], zero-padded."""
    if masks.shape[0] > max_objects:
        raise ValueError(f"{masks.shape[0]} objects in one sample but max_objects={max_objects}")
    return torch.cat([masks, masks.new_zeros(max_objects - masks.shape[0], *masks.shape[1:])])


def collate_samples(samples: Sequence[dict], max_objects: int = 2) -> dict:
    """Batch source samples: tensors stacked (masks padded to ``max_objects``), the rest as lists."""
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key == "masks":
            values = [pad_objects(v, max_objects) for v in values]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
