"""TripletDataModule: the cache for fit / validate / test, its source images for predict.

``predict`` fills the cache: it yields the source's samples that the cache does not hold yet, so
an interrupted build resumes where it stopped. ``fit`` / ``validate`` / ``test`` stream the cached
triplets. Training sees seen categories only (images with any unseen category are left out);
validation and test see every sample of their split exactly once, also under DDP.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import BaseDataModule
from grounded_diffusion.data.cache import CacheError, TripletCache, decode_image, unpack_masks
from grounded_diffusion.data.prompts import PromptSet, group_of
from grounded_diffusion.data.sources import collate_samples, pad_objects, select_items
from grounded_diffusion.data.voc import VOCFolder
from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.errors import ConfigError, UserError, check_in_range
from grounded_diffusion.files import FolderLock
from grounded_diffusion.reports import TRAINING_FREE


class TripletSamples(Dataset):
    """Cached triplets: features (fp16 groups) or replay latents, masks, category indices
    (-1 = empty slot), the image, and DAAM heat maps and oracle scores where the cache has them."""

    def __init__(
        self, cache: TripletCache, records: list[dict], split: CategorySplit, max_objects: int
    ) -> None:
        self.cache, self.records, self.split, self.max_objects = cache, records, split, max_objects

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        tensors, metadata = self.cache.load(record["id"])
        categories = [self.split.index(c) for c in record["categories"]]
        categories += [-1] * (self.max_objects - len(categories))
        sample = {
            "id": record["id"],
            "prompt": record["prompt"],
            "group": record.get("group") or group_of(record["categories"], self.split.unseen),
            "masks": pad_objects(unpack_masks(tensors["masks"], metadata["mask_shape"]), self.max_objects),
            "categories": torch.tensor(categories),
            "image": decode_image(tensors),
        }
        if "latents" in tensors:  # replay storage: the module's UNet recomputes the features
            sample.update(latents=tensors["latents"], timestep=tensors["timestep"])
        else:
            num_groups = sum(1 for k in tensors if k.startswith("features."))
            sample["features"] = [tensors[f"features.{g}"] for g in range(num_groups)]
        for method in TRAINING_FREE:  # the training-free baseline's word maps (older caches: "daam")
            if method in tensors:
                sample[method] = pad_objects(tensors[method], self.max_objects)
        if "oracle_scores" in tensors:  # synthesis: how sure the oracle was of each mask
            sample["oracle_scores"] = pad_objects(tensors["oracle_scores"], self.max_objects)
        return sample


class TripletDataModule(BaseDataModule):
    """
    Args:
        cache_dir: the triplet cache (built by ``predict`` with a ``source``).
        vocabulary: a built-in name (``pascal``, ``coco``, ``scenes``), a classes file (one
            name per line; a first line ``background`` is skipped) or a list of names.
        split: numbered seen/unseen split of a built-in vocabulary, or
        unseen / seen: the unseen (or seen) categories listed; none of the three: all seen.
        source: what the ``predict`` run turns into triplets: images + masks (a VOC-format folder,
            the procedural scenes) or prompts to synthesise (``PromptSet``); not needed once the
            cache is built.
        batch_size / num_workers: per process.
        train_split / val_split / test_split: which image sets of the cache each stage reads
            (``test_split: null``: ``test`` if the cache has it, else the validation split).
        max_objects: object slots per sample (the paper uses one or two objects).
        max_per_group: ``predict`` builds at most this many samples of each split and group
            (a smoke run of a large config; ``experiments/offline.yaml`` sets it).
        allow_incomplete: ``fit`` / ``test`` on a cache whose ``predict`` has not finished the
            splits they read (a build that stopped early), with a warning; by default they refuse
            and say how to finish it.
    """

    def __init__(
        self,
        cache_dir: str,
        vocabulary: str | list[str] = "pascal",
        split: int | str | None = None,
        unseen: list[str] | None = None,
        seen: list[str] | None = None,
        source: VOCFolder | PromptSet | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        max_objects: int = 2,
        max_per_group: int | None = None,
        allow_incomplete: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, default_batch_size=8, default_workers=0)
        check_in_range("data.init_args.max_objects", max_objects, 1, None, 2)
        check_in_range("data.init_args.max_per_group", max_per_group, 1, None)
        # One process in the whole job prepares the source and repairs the cache (both live on a
        # filesystem every node sees); the others wait at Lightning's pre-setup barrier.
        self.prepare_data_per_node = False
        self.category_split = CategorySplit.named(vocabulary, split, unseen, seen)
        self.cache = TripletCache(cache_dir)
        # One build at a time: a second predict on the same cache would build every sample twice.
        self.lock = FolderLock(cache_dir, "The triplet cache", "data.init_args.cache_dir")
        self.source = source
        self.max_objects = max_objects
        self.max_per_group, self.allow_incomplete = max_per_group, allow_incomplete
        self.stage_splits = {"fit": train_split, "validate": val_split, "test": test_split}
        if source is not None:
            source.check(self.category_split)

    @property
    def categories(self) -> tuple[str, ...]:
        return self.category_split.categories

    @property
    def unseen(self) -> tuple[str, ...]:
        return self.category_split.unseen

    def prepare_data(self) -> None:
        # The place to generate or check the source folder.
        if self.trainer is not None and self.trainer.state.fn == "predict":
            if self.source is None:
                raise ConfigError("predict builds the cache from data.source, which is not set")
            self.source.prepare()  # (checks every file: a bad one stops the run before anything is written)
            self.lock.acquire()  # before repair(), which clears the temporary files of a build
            self.cache.repair(list(self.categories))
            stale = self._stale_samples(self.cache.manifest(), trust_stat=False)
            if stale:
                (first, why), count = stale[0], len(stale)
                self.cache.drop(
                    [sample_id for sample_id, _ in stale],
                    f"{count} samples were built from source data that has changed since (first: {first}: {why}); "
                    "rebuilding them",
                )
            planned = select_items(self.source.items(), set(), self.max_per_group)
            self.cache.record_plan(
                {split: [i for i, s, *_ in planned if s == split] for split in {s for _, s, *_ in planned}}
            )

    def setup(self, stage: str) -> None:
        if stage == "predict":
            if self.source is None:
                raise ConfigError("predict builds the cache from data.source, which is not set")
            done = self.cache.done_ids()
            self.predict_set = self.source.dataset(self.category_split, done, self.max_per_group)
            return
        if not self.cache.metadata_path.exists():
            raise CacheError(self._missing_cache_message())
        metadata = self.cache.metadata()  # (a clear error if it is unreadable)
        records = self.cache.manifest()
        self.cache.check_files(records)
        self._check_categories(records, metadata)
        self._check_source(records)
        fit_split, val_split = self.stage_splits["fit"], self.stage_splits["validate"]
        test_split = self.stage_splits["test"]
        if test_split is None:  # a VOC folder often has train and val image sets only
            has_test = "test" in (self.cache.plan() or {}) or any(r["split"] == "test" for r in records)
            test_split = "test" if has_test else val_split
        self._check_complete(
            records, {"fit": [fit_split, val_split], "test": [test_split]}.get(stage, [val_split])
        )
        if stage == "fit":
            seen = set(self.category_split.seen)
            train = [r for r in records if r["split"] == fit_split and set(r["categories"]) <= seen]
            self.train_set = self._samples(train, fit_split + " (seen categories only)")
        if stage in ("fit", "validate"):
            self.val_set = self._split_samples(records, val_split)
        if stage == "test":
            self.test_set = self._split_samples(records, test_split)

    def _check_categories(self, records: list[dict], metadata: dict) -> None:
        """Every sample's categories are in this run's vocabulary: one line that says whether the
        cache was built over another vocabulary or a manifest line is damaged."""
        known = set(self.categories)
        bad = next((r for r in records if not set(r["categories"]) <= known), None)
        if bad is None:
            return
        names = sorted(set(bad["categories"]) - known)
        built = metadata.get("vocabulary")
        if built is not None and set(names) <= set(built):
            raise ConfigError(
                f"The cache at '{self.cache.root}' was built over another vocabulary ({len(built)} categories, "
                f"{', '.join(built[:4])}, ...) than this run's ({len(known)}): sample {bad['id']} names {names}. "
                "Give the cache's vocabulary (data.init_args.vocabulary), or another cache_dir"
            )
        raise CacheError(
            f"{self.cache.manifest_path}: sample {bad['id']} names {names}, which the cache was not built over: the "
            "line is damaged. Rerun the cache's predict command: it drops the line and builds that sample again"
        )

    def _stale_samples(self, records: list[dict], trust_stat: bool = True) -> list[tuple[str, str]]:
        """(id, why) of the cached samples of this source whose source changed since they were
        built (samples of other sources into the same cache are not this source's to judge).
        ``trust_stat``: files of unchanged size and time count as unchanged (``fit`` / ``test``);
        ``predict`` compares their contents."""
        ours = {item[0] for item in self.source.items()}
        found = []
        for record in records:
            if record["id"] in ours:
                why = self.source.changed(record, self.category_split, trust_stat)
                if why:
                    found.append((record["id"], why))
        return found

    def _check_source(self, records: list[dict]) -> None:
        """``fit`` / ``test`` with a source: refuse a cache whose source changed under it."""
        if self.source is None:
            return
        try:
            stale = self._stale_samples(records)
        except UserError as error:  # (the source is gone: the cache stands alone)
            warnings.warn(f"the cache at '{self.cache.root}' is not checked against data.source: {error}")
            return
        if stale:
            (first, why), count = stale[0], len(stale)
            raise CacheError(
                f"{count} samples of the cache at '{self.cache.root}' were built from source data that has changed "
                f"since (first: {first}: {why}). Rerun predict with the same configs: it rebuilds them"
            )

    def _check_complete(self, records: list[dict], splits: list[str]) -> None:
        """The splits this stage reads hold every sample their latest ``predict`` set out to
        build; else one line naming what is missing and how to finish it."""
        plan = self.cache.plan()
        if plan is None:
            return  # (a cache built before plans were recorded)
        done = {r["id"] for r in records}
        short = {
            s: (len(plan[s]) - len(set(plan[s]) - done), len(plan[s]))
            for s in dict.fromkeys(splits)
            if s in plan
        }
        short = {s: (have, want) for s, (have, want) in short.items() if have < want}
        if not short:
            return
        counts = ", ".join(f"split {s} has {have} of {want}" for s, (have, want) in short.items())
        message = (
            f"The cache at '{self.cache.root}' is incomplete: {counts} planned samples (its predict run stopped "
            "early). Finish it: rerun that predict command (it goes on from what is there)"
        )
        if not self.allow_incomplete:
            raise CacheError(f"{message}, or use what is there: --data.init_args.allow_incomplete true")
        warnings.warn(f"{message}; going on with what is there (data.init_args.allow_incomplete)")

    def _missing_cache_message(self) -> str:
        where = f"No triplet cache at '{self.cache.root}' (no cache.json). "
        if self.source is not None:
            return where + "Build it first: `lightning predict` with these same --config files and overrides."
        return where + (
            "This config reads a cache that other configs build (it has no data.init_args.source): for "
            "experiments/<name>.yaml run `lightning predict --config experiments/synth/<name>_train.yaml` and "
            "`..._test.yaml`, with the same overlays (e.g. --config experiments/offline.yaml)."
        )

    def _split_samples(self, records: list[dict], split: str) -> TripletSamples:
        return self._samples([r for r in records if r["split"] == split], split)

    def _samples(self, records: list[dict], what: str) -> TripletSamples:
        if not records:
            have = sorted({r["split"] for r in self.cache.manifest()})
            raise ConfigError(
                f"The cache at '{self.cache.root}' has no samples for split {what}; it has splits {have}."
            )
        return TripletSamples(self.cache, records, self.category_split, self.max_objects)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, "train")

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, "evaluate")

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.test_set, "evaluate")

    def predict_dataloader(self) -> DataLoader:
        return self.loader(
            self.predict_set, "predict", partial(collate_samples, max_objects=self.max_objects)
        )
