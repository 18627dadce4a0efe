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
