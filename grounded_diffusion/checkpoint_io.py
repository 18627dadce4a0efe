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
    "lightning_modules.world_text_to_image.TextToImageModule": "a shapes-world text-to-image model (TextToImageModule)",
}
# Class paths that moved: a checkpoint written before records the old one.
MOVED = {
    "lightning_modules.text_to_image.TextToImageModule": "lightning_modules.world_text_to_image.TextToImageModule"
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
    """``torch.load`` (weights only: no pickle runs) of a Lightning checkpoint, with one line that
    names the file when it is missing, cannot be read, or is not a Lightning checkpoint (a
    notes file, a bare state dict, a list). Every entry point reads checkpoints through it: the
    CLI verbs (resume and ``--ckpt_path``), ``export``, ``demo --checkpoint`` and
    ``GroundedGenerator.from_checkpoint``."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder; give a checkpoint file in it{_others(path / 'x')}"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give one that does{_others(path)}")
    with open(path, "rb") as handle:
        start = handle.read(4)
    if start and not start.startswith((b"PK", b"\x80")):  # (torch's zip format, or its older pickle)
        raise CheckpointError(
            f"checkpoint {path} is not a PyTorch checkpoint (it starts with {start!r}, as no torch.save file does): "
            f"give a .ckpt file written by `fit`{_others(path)}"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only is not False)
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
    except (KeyError, AttributeError, TypeError, IndexError, UnicodeDecodeError) as error:
        # (torch's legacy reader on a file that is not a torch file at all, e.g. a text file)
        raise CheckpointError(
            f"checkpoint {path} is not a PyTorch checkpoint ({type(error).__name__}: {error}): give a .ckpt file "
            f"written by `fit`{_others(path)}"
        ) from error
    check_lightning_checkpoint(checkpoint, path)
    return checkpoint


def check_lightning_checkpoint(checkpoint, path: str | Path) -> None:
    """What Lightning and the project read of a checkpoint is there: a dict with the Lightning
    version, a ``state_dict`` of tensors, and hyperparameters (if any) as a dict."""
    if not isinstance(checkpoint, dict):
        found = f"a {type(checkpoint).__name__}"
    elif "state_dict" not in checkpoint or "pytorch-lightning_version" not in checkpoint:
        keys = ", ".join(repr(k) for k in list(checkpoint)[:4]) or "nothing"
        lacks = " and ".join(
            repr(k) for k in ("state_dict", "pytorch-lightning_version") if k not in checkpoint
        )
        found = f"a dict of {keys}, without {lacks}"
    elif not isinstance(checkpoint["state_dict"], dict) or not all(
        isinstance(v, torch.Tensor) for v in checkpoint["state_dict"].values()
    ):
        found = "a state_dict that is not a dict of tensors"
    elif not isinstance(checkpoint.get("hyper_parameters", {}), dict):
        found = "hyperparameters that are not a dict"
    else:
        return
    raise CheckpointError(
        f"checkpoint {path} is not a Lightning checkpoint (it holds {found}): give a .ckpt file written by "
        f"`fit`{_others(Path(path))}"
    )


def checkpoint_fits(checkpoint: dict, module, path: str | Path, state: dict | None = None) -> None:
    """The checkpoint's weights fit ``module`` (``state``: its state dict, default the module's
    own): the same layers of the same shapes, or one line that names the first layers that
    differ and the model settings that differ between the checkpoint and this run (e.g. a head
    width given on the command line when resuming), instead of torch's report of every layer."""
    ours = module.state_dict() if state is None else state
    theirs = checkpoint["state_dict"]
    unmatched = sorted(set(ours) ^ set(theirs))
    reshaped = [k for k in ours if k in theirs and tuple(ours[k].shape) != tuple(theirs[k].shape)]
    if not unmatched and not reshaped:
        return
    if unmatched:
        differ = f"{len(unmatched)} layers are in one and not the other, e.g. {', '.join(unmatched[:3])}"
    else:
        k = reshaped[0]
        differ = (
            f"{len(reshaped)} layers differ in shape, e.g. {k}: checkpoint {list(theirs[k].shape)}, "
            f"this model {list(ours[k].shape)}"
        )
    settings = changed_settings(checkpoint.get("hyper_parameters", {}), dict(getattr(module, "hparams", {})))
    if settings:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({differ}): the model settings differ "
            f"({'; '.join(settings[:3])}). Resume with the checkpoint's settings (drop the option that changes "
            "them), or start a new fit in another --trainer.default_root_dir"
        )
    raise CheckpointError(
        f"checkpoint {path} does not fit this model ({differ}): it was trained by another version of the model "
        "(e.g. the head before its visual-token LayerNorm) or another config. Train it again with `fit`"
    )


def checkpoint_name(module) -> str:
    """The checkpoint a module is being restored from, for messages."""
    trainer = getattr(module, "_trainer", None)
    return str(getattr(trainer, "ckpt_path", None) or "the checkpoint")


def changed_settings(saved: dict, ours: dict, prefix: str = "model.init_args.") -> list[str]:
    """``key: checkpoint A, this run B`` for every (nested) hyperparameter that differs."""
    found = []
    for key in sorted(set(saved) | set(ours)):
        if key.startswith("_") or key in ("oracle",):
            continue
        a, b = saved.get(key), ours.get(key)
        if hasattr(b, "__dataclass_fields__"):
            from dataclasses import asdict

            b = asdict(b)
        if isinstance(a, dict) and isinstance(b, dict):
            found += changed_settings(a, b, f"{prefix}{key}.")
        elif a != b and not (
            isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)
        ):
            found.append(f"{prefix}{key}: checkpoint {a!r}, this run {b!r}")
    return found


def check_checkpoint_kind(checkpoint: dict, path: str | Path, model_class_path: str) -> None:
    """The checkpoint was made by the model class this run configures (as LightningCLI records it)."""
    saved = checkpoint.get("hyper_parameters", {}).get("_class_path")
    saved, model_class_path = MOVED.get(saved, saved), MOVED.get(model_class_path, model_class_path)
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
