"""The shipped weights without copies of the CLIP tokenizer: every world model carries the same
BPE vocabulary (open_clip's), kept once in ``weights/clip-tokenizer/``; the models' tokenizer
folders are relative symbolic links to it, which ``from_pretrained`` reads as files. The world's
Makefile targets run this after copying a retrained model in:

    python -m grounded_diffusion.shapes_world.packaging

Only the tokenizer is shared: a model's weights stay its own even where they are equal today (the
MM-DiT's VAE is a copy of the shapes SD's, and ``make world`` retrains that one).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHARED = "clip-tokenizer"


def content_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenizer_copies(root: Path = WEIGHTS_DIR) -> list[Path]:
    """Model folders' tokenizer folders that are real folders holding the shared tokenizer's files."""
    shared = {p.name: content_digest(p) for p in (root / SHARED).iterdir()}
    copies = []
    for folder in sorted(root.glob("*/tokenizer*")):
        if folder.is_dir() and not folder.is_symlink():
            files = {p.name: content_digest(p) for p in folder.iterdir() if p.is_file()}
            if files == shared:
                copies.append(folder)
    return copies


def link_tokenizers(root: Path = WEIGHTS_DIR) -> list[Path]:
    """Replace each copy of the shared tokenizer by a link to it; returns the folders replaced."""
    copies = tokenizer_copies(root)
    for folder in copies:
        link = folder.with_name(f".{folder.name}.link")
        link.symlink_to(os.path.relpath(root / SHARED, folder.parent))
        shutil.rmtree(folder)
        os.replace(link, folder)
    return copies


if __name__ == "__main__":
    for folder in link_tokenizers():
        print(f"{folder.relative_to(WEIGHTS_DIR)} -> {SHARED} (the shared CLIP tokenizer)")
