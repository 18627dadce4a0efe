"""Wall-clock timing shared by the benchmark scripts (CUDA work is waited for)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], repeats: int = 1, warmup: bool = False) -> float:
    """Best of ``repeats`` wall times of ``fn()``, after one untimed call when ``warmup``."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)
