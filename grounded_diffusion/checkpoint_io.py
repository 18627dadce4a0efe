"""Checkpoints on disk: whole or absent, and named when they cannot be read.

Lightning writes a checkpoint through an fsspec transaction whose temporary file lives in the
system's temporary folder; on another filesystem its commit is a copy, which a full disk cuts
short, leaving a truncated ``best-step=70.ckpt`` under a valid name that a resume then trusts.
``AtomicCheckpointIO`` writes beside the target and renames, and says a full disk in one line.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from grounded_diffusion.errors import UserError
from grounded_diffusion.files import atomic_write

KEPT = "the checkpoints written before it are intact: resume with --ckpt_path last"
# What each of the project's modules makes, for a checkpoint given to the wrong command.
KINDS = {
    "lightning_modules.grounding.GroundingModule": "a grounding head (GroundingModule)",
    "lightning_modules.segmentation.SemanticSegmentationModule": "a Protocol II segmenter (SemanticSegmentationModule)",
    "lightning_modules.text_to_image.TextToImageModule": "a shapes-world text-to-image model (TextToImageModule)",
}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, damaged, or of another model."""


def _others(path: Path) -> str:
    """`` (a.ckpt, b.ckpt in FOLDER)``: the other checkpoints beside ``path``, if any."""
    others = (
        sorted(p.name for p in path.parent.glob("*.ckpt") if p.name != path.name)
        if path.parent.is_dir()
        else []
    )
    return f" ({', '.join(others[:4])} in {path.parent})" if others else ""


def read_checkpoint(path: str | Path, map_location=None, weights_only: bool | None = True) -> dict:
    """``torch.load`` (weights only: no pickle runs), with one line that names the file when it
    is missing or cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give one that does{_others(path)}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only is not False)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint {path} holds Python objects that a weights-only load refuses (it was not written by this "
            "project, or by an older version); train it again, or give another checkpoint"
        ) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        detail = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({detail}): it is truncated or damaged, e.g. by a save cut short. "
            f"Resume from another checkpoint{_others(path)}, or delete it and start again"
        ) from error


def check_checkpoint_kind(checkpoint: dict, path: str | Path, model_class_path: str) -> None:
    """The checkpoint was made by the model class this run configures (as LightningCLI records it)."""
    saved = checkpoint.get("hyper_parameters", {}).get("_class_path")
    if saved is None or saved == model_class_path:
        return
    raise CheckpointError(
        f"checkpoint {path} is of {KINDS.get(saved, saved)}, but this run's model is "
        f"{KINDS.get(model_class_path, model_class_path)}: give a checkpoint written by a fit of the same model config"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes to a temporary file beside the target and renames it, and
    names the file of a checkpoint it cannot read."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()  # serialised first: a file write then fails with an OSError (errno) of its own
        torch.save(checkpoint, buffer)
        atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()), KEPT)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return read_checkpoint(path, map_location or (lambda storage, loc: storage), weights_only)
