"""How the datamodules' loaders order samples and draw random numbers.

Three rules keep a run reproducible:

- **Training order is a function of the seed and the epoch only** (``EpochShuffle``), as Lightning's
  ``DistributedSampler`` makes it under DDP. A plain ``shuffle=True`` draws each epoch's order from
  the global torch RNG, which validation also draws from, so the same fit with another
  ``val_check_interval`` trained on another order (and scored up to 2 points apart).
- **A fit resumed mid-epoch trains on the rest of that epoch** (``training_sampler``), not on its
  first batches again: a plain sampler starts the epoch over and Lightning stops it after the
  batches that were left, so the resumed run repeats some samples and never sees others.
- **No loader draws from the global RNG** (``loader_generator``): every DataLoader iterator draws
  its workers' base seed from the loader's ``generator``, or from the global RNG when it has none.
  With one, iterating the validation set leaves the random stream of training alone.

Evaluation under DDP sees each sample exactly once (``evaluation_sampler``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sized

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler


def run_seed() -> int:
    """The run's seed (``seed_everything``; 0 without one), the one Lightning's DistributedSampler uses."""
    return int(os.getenv("PL_GLOBAL_SEED", 0))


def loader_generator() -> torch.Generator:
    """A DataLoader's own generator, seeded with the run's seed."""
    return torch.Generator().manual_seed(run_seed())


class EpochShuffle(DistributedSampler):
    """Each epoch a fresh permutation seeded with ``seed + epoch``, of which this rank takes its
    share. A ``DistributedSampler``, so Lightning keeps it under DDP (and one process shuffles as a
    1-process DDP run does); Lightning calls ``set_epoch`` at the start of each epoch. It can start
    one epoch part-way through (``resume_at``)."""

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int | None = None) -> None:
        seed = run_seed() if seed is None else seed
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.resume_epoch: int | None = None
        self.resume_offset = 0

    def resume_at(self, epoch: int, offset: int) -> None:
        """Start ``epoch``'s order (this rank's part of it) at position ``offset``, once. The length
        stays the whole epoch's, which is what Lightning counts the resumed epoch's batches in."""
        self.resume_epoch, self.resume_offset = epoch, offset

    def __iter__(self) -> Iterator[int]:
        indices = super().__iter__()
        if self.epoch != self.resume_epoch:
            return indices
        self.resume_epoch = None
        return itertools.islice(indices, self.resume_offset, None)


def training_sampler(trainer, dataset: Sized, batch_size: int) -> EpochShuffle:
    """Training's sampler: this rank's part of the epoch's order and, in a fit resumed from a
    checkpoint saved part-way through an epoch, the batches of that epoch it had not trained on yet.

    Lightning restores its loops' progress from the checkpoint before it asks for the training
    loader, so the loops say which epoch was running and how many of its batches were trained."""
    if trainer is None:
        return EpochShuffle(dataset)
    sampler = EpochShuffle(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank)
    fit_loop = trainer.fit_loop
    trained = fit_loop.epoch_loop.batch_progress.current.processed
    if fit_loop.restarting and 0 < trained * batch_size < len(sampler):
        sampler.resume_at(fit_loop.epoch_progress.current.processed, trained * batch_size)
    return sampler


def evaluation_sampler(trainer, dataset: Dataset) -> UnrepeatedDistributedSampler | None:
    """Exact evaluation under DDP: each sample on one rank, none repeated (Lightning's default
    DistributedSampler pads with duplicates); ``None`` (plain order) on a single process."""
    world = trainer.world_size if trainer is not None else 1
    if world == 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False)
