"""Counting host syncs without a GPU.

On a GPU, an op whose result Python must read (``.item()``, ``int(t)``, ``if tensor:``) or whose
output size depends on the values (``nonzero``, a boolean mask as an index) makes the host wait
for the device, and a sampling or training loop that does so every step runs with the GPU idle
between steps. These ops reach PyTorch's dispatcher alike on every device, so a dispatch mode can
count them on the CPU: the count of a CPU run is what the same code does to a GPU's tensors.
Not seen on the CPU: ``.tolist()``, ``.numpy()`` and ``.cpu()``, which there skip the dispatcher
(``CudaSyncWarnings`` sees them on a GPU)."""

from __future__ import annotations

import collections
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# item(), int(), float() and bool() of a tensor all end in _local_scalar_dense.
READS_A_VALUE = {aten._local_scalar_dense.default, aten.equal.default}
SIZE_FROM_VALUES = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
}


class SyncCount:
    """``where``: the Python lines the syncs came from, with how many each; ``count``: all."""

    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter[str] = collections.Counter()

    @property
    def count(self) -> int:
        return sum(self.where.values())


class HostSyncs(SyncCount, TorchDispatchMode):
    """Counts the ops that sync a GPU with its host, on tensors of ``device_type`` (``cpu``:
    a CPU run standing in for a GPU one; ``cuda``: a real GPU run, where the CPU tensors of an
    optimiser's step counts cost nothing)."""

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type

    def syncs(self, func, args) -> bool:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func is aten.index.Tensor:  # a boolean mask as an index: nonzero inside
            tensors = [args[0]] if any(i is not None and i.dtype == torch.bool for i in args[1]) else []
        elif func not in READS_A_VALUE | SIZE_FROM_VALUES:
            return False
        return any(t.device.type == self.device_type for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.syncs(func, args):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename][-2:]
            self.where[
                " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(frames))
            ] += 1
        return func(*args, **(kwargs or {}))


class CudaSyncWarnings(SyncCount):
    """The same count on a real GPU, by PyTorch itself: ``torch.cuda.set_sync_debug_mode('warn')``
    warns at every synchronizing CUDA call, copies to the host included. ``device_type``: for the
    same call as ``HostSyncs``; only CUDA has the mode."""

    def __init__(self, device_type: str = "cuda") -> None:
        super().__init__()

    def __enter__(self) -> CudaSyncWarnings:
        self.caught = warnings.catch_warnings(record=True)
        self.records = self.caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self.caught.__exit__(*exc)
        for record in self.records:
            if "synchronizing CUDA operation" in str(record.message):
                self.where[f"{record.filename.rsplit('/', 1)[-1]}:{record.lineno}"] += 1
