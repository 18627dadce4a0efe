"""What a ``predict`` run turns into triplets: a sample source.

A source (``VOCFolder``, ``ProceduralScenes``, ``PromptSet``) has

- ``prepare()``: make the data available (called once per node);
- ``check(category_split)``: fail at config time on categories or groups the split cannot serve;
- ``items()``: ``(id, split, *group)`` of every sample it can give, in a fixed order;
- ``dataset(category_split, exclude, max_per_group)``: the samples whose ids are not in
  ``exclude`` (already cached), at most ``max_per_group`` of each (split, group), in a fixed order;
- ``changed(record, category_split, trust_stat)``: why a cached sample no longer matches the source
  (its files or its prompt changed since it was built), or None.

Each sample carries ``source``, a fingerprint of what it was made from (``fingerprint_files`` of
its image and label map, or ``fingerprint_values`` of its prompt, categories and seed), which the
cache keeps in the sample's manifest line: a rerun of ``predict`` rebuilds the samples whose
source changed, and ``fit`` / ``test`` refuse a cache whose source changed under it.

Image sources yield ``{id, split, prompt, categories, image, masks}``; prompt sources yield
``{id, split, group, prompt, categories, seed}`` and the model generates the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch


def sample_seed(sample_id: str) -> int:
    """A stable 63-bit seed from a sample id: same id, same noise, whatever the batch or rank."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "little") >> 1


def digest(*parts: bytes) -> str:
    """A short content hash (SHA-256, 32 hex digits) of ``parts``, each length-prefixed."""
    sha = hashlib.sha256()
    for part in parts:
        sha.update(len(part).to_bytes(8, "little") + part)
    return sha.hexdigest()[:32]


def file_stat(path: Path) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def read_with_fingerprint(paths: Sequence[Path]) -> tuple[list[bytes], dict]:
    """The bytes of ``paths`` and their fingerprint: sizes and modification times (stat first, so
    that a file changed while read is hashed anew next time), and a hash of the bytes read."""
    stats = [file_stat(p) for p in paths]
    data = [Path(p).read_bytes() for p in paths]
    return data, {"stat": stats, "sha256": digest(*data)}


def files_changed(paths: Sequence[Path], recorded: dict, root: Path, trust_stat: bool = True) -> str | None:
    """Why ``paths`` no longer hold what ``recorded`` (``read_with_fingerprint``) says, or None.
    With ``trust_stat`` (``fit`` / ``test``: a stat per file), the same sizes and modification
    times count as unchanged, as make and rsync take them; otherwise (``predict``, which reads
    every file anyway) and whenever they differ, the contents are hashed and compared, so a copy
    with new times but the same bytes is unchanged."""
    for path in paths:
        if not Path(path).is_file():
            return f"{Path(path).relative_to(root)} is gone"
    if trust_stat and [file_stat(p) for p in paths] == recorded.get("stat"):
        return None
    if digest(*(Path(p).read_bytes() for p in paths)) == recorded.get("sha256"):
        return None
    return f"{' or '.join(str(Path(p).relative_to(root)) for p in paths)} changed"


def fingerprint_values(**values) -> dict:
    """The fingerprint of a sample made from values alone (a prompt, its categories, its seed)."""
    return {"sha256": digest(json.dumps(values, sort_keys=True).encode())}


def check_counts(counts: dict, key: str) -> dict:
    """``{name: count}`` with every count a whole number of at least 1 (an empty split or group
    is left out, not asked for with 0), or one line naming the entry."""
    from grounded_diffusion.errors import ConfigError, whole_number

    if not counts:
        raise ConfigError(f"{key} is empty: give at least one entry, e.g. {{train: 100}}")
    for name, count in counts.items():
        counts[name] = whole_number(f"{key}.{name}", count, 1)
    return counts


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
