"""The triplet cache: {UNet features, masks, prompt} per sample, on disk without pickle.

Layout::

    <cache>/cache.json          what made it: format version, storage mode, vocabulary, backbone,
                                capture step, feature groups, oracle and guidance (synthesis)
    <cache>/manifest.jsonl      one JSON object per finished sample: id, prompt, categories,
                                split, group (one_seen, two_seen_unseen, ...), source (a
                                fingerprint of what it was made from: its files' sizes, times
                                and hash, or its prompt, categories and seed)
    <cache>/planned.json        the ids each split's latest ``predict`` set out to build, which
                                ``fit`` / ``test`` compare with the manifest (an unfinished build)
    <cache>/samples/<id>.safetensors
        features.<g>   fp16 [C_g, h_g, w_g], resolution groups coarse first   (storage: features)
        latents        [C, h, w], the UNet's input at the capture step, in the  (storage: latents)
                       UNet's dtype (what replay feeds it)
        timestep       int, the capture timestep                              (storage: latents)
        masks          uint8, bit-packed [O, H, W] (shape in the file's metadata)
        image.jpeg     uint8 bytes of the RGB image, JPEG (lossy, quality 90 by default),
        or image.png   or PNG (lossless); format 2 caches hold it raw: image uint8 [3, H, W]
        daam           fp16 [O, h, w], DAAM heat maps of the category words (latent resolution)
        oracle_scores  fp32 [O], the oracle's best score per category (synthesis; 0 = not found)

A sample file is written to a temporary name and renamed into place; only then is its manifest
line appended, with one ``write`` on an O_APPEND file (several ranks may append at once). The
manifest is the list of finished samples: a build that is interrupted and rerun skips them, and
one that finds a listed sample unreadable (a damaged disk, a file cut short) builds it again.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from grounded_diffusion.data.manifest import JsonlManifest, check_sample_id
from grounded_diffusion.errors import UserError
from grounded_diffusion.files import atomic_write

FORMAT_VERSION = 3  # 3: image compressed (JPEG or PNG), latents in the UNet's dtype
IMAGE_KEYS = ("image.jpeg", "image.png")
KEPT = "every sample already written is kept, and the rerun goes on from them"


class CacheError(UserError, RuntimeError):
    pass


def record_problem(record: dict) -> str | None:
    """What is wrong with the values of a manifest line (which parses), or None."""
    categories = record.get("categories")
    if (
        not isinstance(categories, list)
        or not categories
        or not all(isinstance(c, str) and c for c in categories)
    ):
        return f"categories is {categories!r}, not a list of category names"
    if not isinstance(record.get("prompt"), str):
        return f"prompt is {record.get('prompt')!r}, not text"
    if not isinstance(record.get("split"), str) or not record["split"]:
        return f"split is {record.get('split')!r}, not a split's name"
    if not isinstance(record.get("group", ""), str):
        return f"group is {record['group']!r}, not text"
    return None


def encode_image(
    image: torch.Tensor, image_format: str = "jpeg", quality: int = 90
) -> tuple[str, torch.Tensor]:
    """uint8 [3, H, W] -> (its cache key, the encoded bytes as a uint8 tensor)."""
    from torchvision.io import encode_jpeg, encode_png

    image = image.cpu().contiguous()
    if image_format == "jpeg":
        return "image.jpeg", encode_jpeg(image, quality=quality)
    return "image.png", encode_png(image)


def decode_image(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """A sample's image, uint8 [3, H, W], from any cache format."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as decode

    for key in IMAGE_KEYS:
        if key in tensors:
            return decode(tensors[key], mode=ImageReadMode.RGB)
    return tensors["image"]  # format 2: raw


def pack_masks(masks: torch.Tensor) -> tuple[torch.Tensor, str]:
    """bool [O, H, W] -> (uint8 bits, "O,H,W")."""
    bits = np.packbits(masks.cpu().numpy().astype(bool).reshape(-1))
    return torch.from_numpy(bits), ",".join(map(str, masks.shape))


def unpack_masks(bits: torch.Tensor, shape: str) -> torch.Tensor:
    dims = tuple(int(d) for d in shape.split(","))
    flat = np.unpackbits(bits.numpy(), count=int(np.prod(dims)))
    return torch.from_numpy(flat.reshape(dims).astype(bool))


class TripletCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.jsonl"
        self.manifest_file = JsonlManifest(self.manifest_path, check=record_problem)
        self.plan_path = self.root / "planned.json"
        self.metadata_path = self.root / "cache.json"
        self.samples_dir = self.root / "samples"

    # -- metadata ------------------------------------------------------------------------------

    def metadata(self) -> dict:
        if not self.metadata_path.exists():
            raise CacheError(
                f"No cache at '{self.root}' (missing cache.json). Build it first with "
                "`grounded-diffusion predict --config <the same experiment configs>`."
            )
        try:
            metadata = json.loads(self.metadata_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CacheError(
                f"{self.metadata_path} is not valid JSON ({error}): the file is truncated or edited. Delete it and "
                "rerun the cache's predict command: it writes it again (its samples are kept)."
            ) from error
        if not isinstance(metadata, dict):
            raise CacheError(
                f"{self.metadata_path} holds no settings object: delete it and rerun the cache's predict command"
            )
        return metadata

    def initialise(self, metadata: Mapping) -> None:
        """Create the cache, or check that an existing one was made the same way. A cache whose
        ``cache.json`` is gone but whose samples are there (a damaged or deleted file) gets it
        back, once its samples are found to fit these settings."""
        metadata = {"format_version": FORMAT_VERSION, **metadata}
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        if self.metadata_path.exists():
            existing = self.metadata()
            diff = {k: (existing.get(k), v) for k, v in metadata.items() if existing.get(k) != v}
            if diff:
                details = "; ".join(f"{k}: cache has {a!r}, this run {b!r}" for k, (a, b) in diff.items())
                raise CacheError(
                    f"The cache at '{self.root}' was built with other settings ({details}). "
                    "Use another cache_dir, or delete this one to rebuild it."
                )
            return
        self.check_samples_fit(metadata)
        text = json.dumps(metadata, indent=2)
        atomic_write(self.metadata_path, lambda tmp: tmp.write_text(text), KEPT)

    def check_samples_fit(self, metadata: Mapping) -> None:
        """The samples already listed hold what ``metadata`` says a sample holds: the storage
        mode's tensors, and feature groups of its channel counts (the first sample is read)."""
        records = self.manifest()
        if not records or not self.sample_path(records[0]["id"]).exists():
            return
        tensors, _ = self.load(records[0]["id"])
        if metadata["storage"] == "latents":
            found, wanted = "latents" in tensors, True
        else:
            groups = sum(1 for k in tensors if k.startswith("features."))
            found = [int(tensors[f"features.{g}"].shape[0]) for g in range(groups)]
            wanted = list(metadata["feature_groups"])
        if found != wanted:
            raise CacheError(
                f"The cache at '{self.root}' has no cache.json and its samples were built with other settings than "
                f"this run's (storage {metadata['storage']}, feature groups {metadata['feature_groups']}); "
                "use another cache_dir, or delete this one to rebuild it."
            )

    # -- samples -------------------------------------------------------------------------------

    def sample_path(self, sample_id: str) -> Path:
        return self.samples_dir / f"{check_sample_id(sample_id, str(self.manifest_path))}.safetensors"

    def write(
        self, record: Mapping, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
    ) -> None:
        """Atomically write one sample, then record it in the manifest."""
        data = save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata=dict(metadata))
        atomic_write(self.sample_path(record["id"]), lambda tmp: tmp.write_bytes(data), KEPT)
        self.manifest_file.append(record)

    def repair(self, vocabulary: list[str] | None = None) -> None:
        """Clear what an interrupted build left: temporary sample files, damaged manifest lines
        (a torn last one, so that appends start on a fresh line; values of the wrong kind;
        categories outside the cache's vocabulary, else ``vocabulary``), and listed samples
        whose file is gone or unreadable (cut short, overwritten), which the build then makes
        again. Call it from one process before a build."""
        for leftover in self.samples_dir.glob(".*.tmp*"):
            leftover.unlink(missing_ok=True)
        self.manifest_file.repair()
        if self.metadata_path.exists():
            vocabulary = self.metadata().get("vocabulary", vocabulary)
        if vocabulary is not None:
            known = set(vocabulary)
            foreign = [r for r in self.manifest() if not set(r["categories"]) <= known]
            if foreign:
                first = foreign[0]
                self.drop(
                    [r["id"] for r in foreign],
                    f"{len(foreign)} listed samples name categories outside the cache's vocabulary (first: "
                    f"{first['id']} names {sorted(set(first['categories']) - known)}): damaged lines; rebuilding them",
                )
        records = self.manifest()
        missing = self.missing_files(records)
        self.drop(missing, f"{len(missing)} listed samples have no file; rebuilding them")
        unreadable = [r["id"] for r in records if r["id"] not in set(missing) and not self.readable(r["id"])]
        if unreadable:
            first = self.sample_path(unreadable[0])
            self.drop(
                unreadable,
                f"{len(unreadable)} listed sample files are unreadable (first: {first}); rebuilding them",
            )

    def drop(self, sample_ids: list[str], why: str) -> None:
        """Take samples out of the manifest and delete their files (the build makes them again),
        saying ``why`` as a warning."""
        gone = set(sample_ids)
        if not gone:
            return
        warnings.warn(f"{self.manifest_path}: {why}")
        self.manifest_file.rewrite([r for r in self.manifest() if r["id"] not in gone])
        for sample_id in gone:
            self.sample_path(sample_id).unlink(missing_ok=True)

    # -- what a build set out to make ------------------------------------------------------------

    def record_plan(self, planned: Mapping[str, list[str]]) -> None:
        """Record the ids a ``predict`` run is to build, per split (the splits of other builds
        into the same cache, e.g. a test set's, are kept)."""
        before = self.plan()
        plan = {**(before or {}), **{split: list(ids) for split, ids in planned.items()}}
        if plan != before:  # (a rerun that plans the same leaves the file as it is)
            text = json.dumps(plan, separators=(",", ":"))
            atomic_write(self.plan_path, lambda tmp: tmp.write_text(text), KEPT)

    def plan(self) -> dict[str, list[str]] | None:
        """The planned ids per split, or None (a cache built before plans were recorded, or a
        damaged file: nothing to compare)."""
        if not self.plan_path.exists():
            return None
        try:
            plan = json.loads(self.plan_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            plan = None
        if not isinstance(plan, dict) or not all(isinstance(v, list) for v in plan.values()):
            warnings.warn(
                f"{self.plan_path} is damaged: whether the cache is complete cannot be checked; rerun its predict "
                "command to write it again"
            )
            return None
        return plan

    def readable(self, sample_id: str) -> bool:
        """Whether a sample file's header is whole and covers the file (a cheap read)."""
        try:
            with safe_open(self.sample_path(sample_id), "pt"):
                return True
        except (SafetensorError, OSError):
            return False

    def missing_files(self, records: list[dict]) -> list[str]:
        """Ids of listed samples whose file is gone (a cheap stat each)."""
        return [r["id"] for r in records if not self.sample_path(r["id"]).exists()]

    def check_files(self, records: list[dict]) -> None:
        """Every listed sample has its file, before any training step."""
        missing = self.missing_files(records)
        if missing:
            raise CacheError(
                f"The cache at '{self.root}' lists {len(missing)} samples without a file (first: "
                f"{self.sample_path(missing[0])}). Rerun its predict command: it rebuilds them."
            )

    def manifest(self) -> list[dict]:
        """Finished samples in order of completion, one per id (a rewrite replaces the earlier)."""
        return self.manifest_file.records()

    def done_ids(self) -> set[str]:
        return self.manifest_file.done_ids()

    def load(self, sample_id: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        path = self.sample_path(sample_id)
        try:
            with safe_open(path, "pt") as handle:
                metadata = handle.metadata() or {}
            return load_file(path), metadata
        except (SafetensorError, OSError) as err:
            raise CacheError(
                f"Cannot read sample '{sample_id}' ({path}): {err}. The file is missing or damaged: rerun the cache's "
                "predict command (it finds such samples and builds them again), or delete the file and rerun it."
            ) from err
