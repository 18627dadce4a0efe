"""The CI-sized Protocol I run on the shapes world's shipped models that several test modules
share (experiments/shapes.yaml, fewer samples and steps), and how far a rerun elsewhere may fall
below a documented figure."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO, run_cli

FOUND_TOLERANCE = 0.15  # found rate (fraction of 40 images) below the documented one

CI_STEPS = 800
CI_COUNTS = (
    "{train: {one_seen: 80, two_seen: 80}, val: {one_seen: 8, two_seen: 8}, "
    "test: {one_seen: 16, one_unseen: 16, two_seen: 16, two_seen_unseen: 16, two_unseen: 16}}"
)


def run_protocol1_ci(root: Path, *extra: str) -> Path:
    """predict, fit and test of experiments/shapes.yaml (then the ``extra`` arguments) at CI size
    in ``root``: checkpoints/last.ckpt (the head) and report/metrics.json."""
    args = [
        "--config",
        str(REPO / "experiments" / "shapes.yaml"),
        *extra,
        "--data.init_args.source.init_args.counts",
        CI_COUNTS,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_steps",
        str(CI_STEPS),
        "--trainer.val_check_interval",
        str(CI_STEPS // 2),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
    ]
    run_cli(["predict", *args])
    run_cli(["fit", *args])
    run_cli(["test", *args, "--ckpt_path", "last", "--verbose", "false"])
    return root
