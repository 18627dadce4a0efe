"""How the datamodules' loaders order samples and draw random numbers.

Two rules keep a run reproducible:

- **Training order is a function of the seed and the epoch only** (``EpochShuffle``), as Lightning's
  ``DistributedSampler`` makes it under DDP. A plain ``shuffle=True`` draws each epoch's order from
  the global torch RNG, which validation also draws from, so the same fit with another
  ``val_check_interval`` trained on another order (and scored up to 2 points apart).
- **No loader draws from the global RNG** (``loader_generator``): every DataLoader iterator draws
  its workers' base seed from the loader's ``generator``, or from the global RNG when it has none.
  With one, iterating the validation set leaves the random stream of training alone.

Evaluation under DDP sees each sample exactly once (``evaluation_sampler``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, RandomSampler


def run_seed() -> int:
    """The run's seed (``seed_everything``; 0 without one), the one Lightning's DistributedSampler uses."""
    return int(os.getenv("PL_GLOBAL_SEED", 0))


def loader_generator() -> torch.Generator:
    """A DataLoader's own generator, seeded with the run's seed."""
    return torch.Generator().manual_seed(run_seed())


class EpochShuffle(RandomSampler):
    """A fresh permutation each epoch, seeded with ``seed + epoch`` as in ``DistributedSampler``, so
    a single-process run shuffles as a 1-process DDP run would. Lightning calls ``set_epoch`` at the
    start of each epoch; under DDP it replaces this sampler (a ``RandomSampler``) by its own."""

    def __init__(self, data_source: Sized, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = run_seed() if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())


def evaluation_sampler(trainer, dataset: Dataset) -> UnrepeatedDistributedSampler | None:
    """Exact evaluation under DDP: each sample on one rank, none repeated (Lightning's default
    DistributedSampler pads with duplicates); ``None`` (plain order) on a single process."""
    world = trainer.world_size if trainer is not None else 1
    if world == 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False)
