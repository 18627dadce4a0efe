"""W&B that works with or without a server: online when one is reachable and you are logged in,
offline otherwise (``wandb sync <save_dir>/wandb/offline-run-*`` uploads such a run later)."""

from __future__ import annotations

import netrc
import os
import socket
from typing import Literal
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

from grounded_diffusion.errors import check_choice

WandbMode = Literal["auto", "online", "offline"]


def wandb_server_reachable(timeout: float = 2.0) -> bool:
    """Credentials for the W&B server exist and it accepts a connection within ``timeout`` s."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return False
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    try:
        has_key = bool(os.environ.get("WANDB_API_KEY")) or netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class AutoWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` whose ``mode`` is ``auto`` (default), ``online`` or ``offline``
    (``offline: true``, WandbLogger's own switch, forces offline too).

    Other arguments go to ``WandbLogger`` (``project``, ``name``, ``save_dir``, ``tags``, ...).
    """

    def __init__(self, mode: WandbMode = "auto", offline: bool = False, **kwargs) -> None:
        check_choice("W&B mode", mode, WandbMode)
        offline = offline or mode == "offline" or (mode == "auto" and not wandb_server_reachable())
        kwargs.setdefault("save_dir", ".")
        os.makedirs(kwargs["save_dir"], exist_ok=True)
        # Processes started by ddp_spawn attach to the run without our save_dir: the environment
        # is what reaches them, so their media and files land in the run's folder, not ./wandb.
        os.environ["WANDB_DIR"] = os.path.abspath(kwargs["save_dir"])
        super().__init__(offline=offline, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # wandb warns that the setting does nothing
            self._wandb_init.pop("anonymous", None)
        self.mode = "offline" if offline else "online"

    def finalize(self, status: str) -> None:
        # End the W&B run with the Lightning run, so that the next run in this process (a sweep
        # launcher, a notebook, fit then test) starts its own instead of appending to this one.
        super().finalize(status)
        if self._experiment is not None and status != "failed":
            self._experiment.finish()
        elif self._experiment is not None:
            self._experiment.finish(exit_code=1)
