"""``grounded-diffusion export``: a ``fit`` checkpoint's head as a portable folder
(``grounded_diffusion.models.pretrained_head``), which ``GroundedGenerator.from_pretrained`` and
``grounded-diffusion demo --head`` load and ``--push_to_hub`` shares.

    grounded-diffusion export --ckpt_path outputs/shapes/checkpoints/last.ckpt --out outputs/shapes/head

``--out`` must be a new or empty folder, or (with ``--overwrite``) a head folder, which is then
replaced whole: the new folder is written beside it and swapped in.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grounded_diffusion.models.pretrained_head import PretrainedHead, check_head_destination


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="grounded-diffusion export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ckpt_path", required=True, help="a checkpoint written by `fit` of a GroundingModule"
    )
    parser.add_argument(
        "--out", required=True, help="the folder to write (config.json, model.safetensors, README.md)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the head already in --out (never other files)"
    )
    parser.add_argument(
        "--push_to_hub", metavar="REPO_ID", help="also upload the folder to this Hub repository"
    )
    args = parser.parse_args(argv)
    check_head_destination(Path(args.out), args.overwrite)  # (before the checkpoint is read)
    head = PretrainedHead.from_checkpoint(args.ckpt_path)
    folder = head.save_pretrained(args.out, overwrite=args.overwrite)
    b = head.backbone
    print(
        f"head of {args.ckpt_path} -> {folder} (backbone {b.model_id}, step {b.capture_step} of {b.num_inference_steps})"
    )
    if args.push_to_hub:
        print(f"uploaded to {head.push_to_hub(args.push_to_hub)}")
