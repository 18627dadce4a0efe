"""TripletDataModule: the cache for fit / validate / test, its source images for predict.

``predict`` fills the cache: it yields the source's samples that the cache does not hold yet, so
an interrupted build resumes where it stopped. ``fit`` / ``validate`` / ``test`` stream the cached
triplets. Training sees seen categories only (images with any unseen category are left out);
validation and test see every sample of their split exactly once, also under DDP.
"""

from __future__ import annotations

from functools import partial

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from grounded_diffusion.data.cache import CacheError, TripletCache, decode_image, unpack_masks
from grounded_diffusion.data.prompts import PromptSet, group_of
from grounded_diffusion.data.samplers import evaluation_sampler, loader_generator, training_sampler
from grounded_diffusion.data.sources import collate_samples, pad_objects
from grounded_diffusion.data.voc import VOCFolder
from grounded_diffusion.data.vocabulary import CategorySplit, check_categories
from grounded_diffusion.errors import ConfigError, check_in_range
from grounded_diffusion.files import FolderLock


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
        if "daam" in tensors:
            sample["daam"] = pad_objects(tensors["daam"], self.max_objects)
        if "oracle_scores" in tensors:  # synthesis: how sure the oracle was of each mask
            sample["oracle_scores"] = pad_objects(tensors["oracle_scores"], self.max_objects)
        return sample


class TripletDataModule(LightningDataModule):
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
    ) -> None:
        super().__init__()
        check_in_range("data.init_args.batch_size", batch_size, 1, None, 8)
        check_in_range("data.init_args.num_workers", num_workers, 0, None, 0)
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
        self.batch_size, self.num_workers, self.max_objects = batch_size, num_workers, max_objects
        self.max_per_group = max_per_group
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
            self.cache.repair()

    def teardown(self, stage: str) -> None:
        self.lock.release()

    def on_exception(self, exception: BaseException) -> None:
        self.lock.release()

    def setup(self, stage: str) -> None:
        if stage == "predict":
            if self.source is None:
                raise ConfigError("predict builds the cache from data.source, which is not set")
            done = self.cache.done_ids()
            self.predict_set = self.source.dataset(self.category_split, done, self.max_per_group)
            return
        if not self.cache.metadata_path.exists():
            raise CacheError(self._missing_cache_message())
        self.cache.metadata()  # a clear error if it is unreadable
        records = self.cache.manifest()
        self.cache.check_files(records)
        for record in records:
            check_categories(record["categories"], self.categories, f"category of sample {record['id']}")
        if stage == "fit":
            seen = set(self.category_split.seen)
            train = [
                r for r in records if r["split"] == self.stage_splits["fit"] and set(r["categories"]) <= seen
            ]
            self.train_set = self._samples(train, self.stage_splits["fit"] + " (seen categories only)")
        if stage in ("fit", "validate"):
            self.val_set = self._split_samples(records, self.stage_splits["validate"])
        if stage == "test":
            test_split = self.stage_splits["test"]
            if test_split is None:  # a VOC folder often has train and val image sets only
                test_split = (
                    "test" if any(r["split"] == "test" for r in records) else self.stage_splits["validate"]
                )
            self.test_set = self._split_samples(records, test_split)

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

    def _loader(self, dataset: Dataset, sampler=None, collate_fn=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            persistent_workers=self.num_workers > 0,
            generator=loader_generator(),
        )

    def _unrepeated_loader(self, dataset: Dataset) -> DataLoader:
        return self._loader(dataset, sampler=evaluation_sampler(self.trainer, dataset))

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            self.train_set, sampler=training_sampler(self.trainer, self.train_set, self.batch_size)
        )

    def val_dataloader(self) -> DataLoader:
        return self._unrepeated_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._unrepeated_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        collate = partial(collate_samples, max_objects=self.max_objects)
        return self._loader(self.predict_set, collate_fn=collate)
