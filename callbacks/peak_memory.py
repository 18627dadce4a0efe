"""Prints a run's peak memory when it ends (smoke runs and benchmarks read the line)."""

from __future__ import annotations

import resource

import torch
from lightning import Callback, LightningModule, Trainer


def peak_memory_line() -> str:
    """``peak memory: rss <GiB> GiB[, cuda <GiB> GiB]`` of this process so far."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    line = f"peak memory: rss {rss:.2f} GiB"
    if torch.cuda.is_available():
        line += f", cuda {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return line


class PeakMemory(Callback):
    """After fit / validate / test / predict, rank 0 prints ``peak_memory_line()``."""

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            print(peak_memory_line(), flush=True)
