"""What the project's datamodules share (in the way of torchgeo's ``NonGeoDataModule``): the loader
factory, and the lifecycle of the lock on a folder that ``predict`` writes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from grounded_diffusion.data.samplers import evaluation_sampler, loader_generator, training_sampler
from grounded_diffusion.errors import check_in_range
from grounded_diffusion.files import FolderLock

LoaderRole = Literal["train", "evaluate", "predict"]


class BaseDataModule(LightningDataModule):
    """A datamodule with a batch size and workers per process (checked at config time) and one
    loader factory for every stage (``loader``).

    A datamodule whose ``predict`` writes a folder sets ``self.lock`` (a ``FolderLock``) and takes
    it in ``prepare_data``; the base releases it when the run ends, also by an exception, so that
    one build at a time writes a folder.
    """

    def __init__(
        self, batch_size: int, num_workers: int, default_batch_size: int, default_workers: int
    ) -> None:
        super().__init__()
        check_in_range("data.init_args.batch_size", batch_size, 1, None, default_batch_size)
        check_in_range("data.init_args.num_workers", num_workers, 0, None, default_workers)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.lock: FolderLock | None = None

    def loader(
        self,
        dataset: Dataset,
        role: LoaderRole,
        collate_fn: Callable | None = None,
        drop_last: bool = False,
    ) -> DataLoader:
        """``train``: this rank's share of an order drawn from the seed and the epoch, resumable
        mid-epoch (``training_sampler``); ``evaluate``: every sample once, also under DDP
        (``evaluation_sampler``); ``predict``: in order. No loader draws from the global RNG."""
        sampler = {
            "train": lambda: training_sampler(self.trainer, dataset, self.batch_size),
            "evaluate": lambda: evaluation_sampler(self.trainer, dataset),
            "predict": lambda: None,
        }[role]()
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            drop_last=drop_last,
            persistent_workers=self.num_workers > 0,
            generator=loader_generator(),
        )

    def teardown(self, stage: str) -> None:
        if self.lock is not None:
            self.lock.release()

    def on_exception(self, exception: BaseException) -> None:
        if self.lock is not None:
            self.lock.release()
