"""Known, harmless library messages silenced once, each for a stated reason, so that what a run
prints is ours or a real problem. Called by the CLI and by each LightningModule's ``setup`` (DDP
processes started by spawn do not inherit the parent's filters)."""

from __future__ import annotations

import logging
import warnings

IGNORED_WARNINGS = (
    # The frozen Stable Diffusion (and oracle) stay in eval mode while the head trains: intended.
    r"Found \d+ module\(s\) in eval mode",
    # lightning's own pytree helper uses torch's deprecated LeafSpec; nothing for us to change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # A fit resumed mid-epoch: our training samplers start it where the checkpoint stopped
    # (data/samplers.py), which Lightning cannot see in a plain DataLoader.
    r"You're resuming from a checkpoint that ended before the epoch ended",
    # A predict rerun on a finished build has nothing left to do; the cache writer says so.
    r"Total length of `DataLoader` across ranks is zero",
)


# Library loggers' records dropped by the start of their message.
IGNORED_LOG_RECORDS = {
    # diffusers' FLUX.2 [dev] pipeline hands padding and truncation to its Pixtral processor as
    # plain keyword arguments; transformers still applies them (the ids come out padded to
    # max_sequence_length, as tests/test_dit_backbone.py checks) but warns at every encoding.
    "transformers.processing_utils": "Kwargs passed to `processor.__call__` have to be in `processor_kwargs`",
}


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith(self.start) or record.getMessage().startswith(self.start))


class _DropTips(logging.Filter):
    """Lightning's advertisements for its cloud products (litlogger, litmodels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_noise(evaluating: bool = False, resuming: bool = False) -> None:
    """``evaluating``: test / validate / predict, where a checkpoint's callback states are not
    restored, so Lightning's notice that the callbacks differ from the fit's does not apply.
    ``resuming``: a fit with ``--ckpt_path``, which writes on into its own checkpoint folder, so
    Lightning's notice that the folder is not empty does not apply."""
    for message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if evaluating:
        warnings.filterwarnings(
            "ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create"
        )
    if resuming:
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
    quiet_import_noise()
    for name, start in IGNORED_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))


# Printed while diffusers is imported, where torchao (a quantization backend) is installed: set
# before that import (grounded_diffusion/__init__.py calls this).
IMPORT_NOISE = {
    # diffusers 0.42 looks for torchao tensor classes of older torchao releases, for loading
    # torchao-serialized checkpoints, which we never read (we quantize at load).
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
    # torchao registers its enums with torch's pytree, which torch now handles natively.
    "torch.utils._pytree": "<enum ",
}


def quiet_import_noise() -> None:
    for name, start in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))
