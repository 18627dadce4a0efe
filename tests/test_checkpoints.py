"""``last.ckpt`` is always the newest state: after fit, after a kill -9, and for ``test``."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, scenes_args
from grounded_diffusion.cli import main


def saved_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


def fresh_run(scene_cache: Path, root: Path, steps: int) -> list[str]:
    """Arguments for a fit in an empty ``root`` on the session's scene cache."""
    cache = next(scene_cache.glob("cache-*"))
    return [*scenes_args(root, steps=steps), "--data.init_args.cache_dir", str(cache)]


def newest_last(root: Path) -> Path:
    """The newest ``last*.ckpt`` (a fresh fit in a used folder writes last-v1.ckpt, and so on,
    never overwriting an earlier run's)."""
    return max((root / "checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)


def test_last_checkpoint_is_written_at_the_end_of_fit_after_the_last_validation(tmp_path, scene_cache):
    # Validations at steps 2 and 4 and the end at 5: a monitored ModelCheckpoint(save_last=True)
    # leaves last.ckpt at step 2 or 4.
    main(["fit", *fresh_run(scene_cache, tmp_path, 5), "--trainer.val_check_interval", "2", "--trainer.logger", "false"])
    assert saved_step(tmp_path / "checkpoints" / "last.ckpt") == 5
    best = list((tmp_path / "checkpoints").glob("best-step=*.ckpt"))
    assert len(best) == 1 and saved_step(best[0]) in (2, 4)


def test_test_with_ckpt_path_last_scores_the_newest_weights(scene_cache, caplog):
    root = scene_cache
    main(["fit", *scenes_args(root, steps=3), "--trainer.logger", "false"])
    newest = newest_last(root)
    assert saved_step(newest) == 3
    with caplog.at_level("INFO"):
        main(["test", *scenes_args(root), "--ckpt_path", "last", "--verbose", "false", "--trainer.logger", "false"])
    assert f"Restoring states from the checkpoint path at {newest}" in caplog.text


def test_test_with_ckpt_path_last_and_no_checkpoint_stops(tmp_path, scene_cache):
    args = scenes_args(scene_cache)
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *args, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"])
    assert "--ckpt_path last: no last checkpoint in" in str(exit_info.value.code) and "Run `fit`" in str(exit_info.value.code)


def test_validating_more_often_trains_the_same_weights(scene_cache, tmp_path):
    """Validation draws nothing from the training's random stream, and the training order depends
    on the seed and the epoch only (12 steps of batch 4 cross an epoch boundary here)."""
    weights = []
    for interval in (12, 3):
        root = tmp_path / f"every_{interval}"
        main(["fit", *fresh_run(scene_cache, root, 12), "--trainer.val_check_interval", str(interval), "--trainer.logger", "false"])
        weights.append(torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def logged_steps(log_dir: Path) -> list[int]:
    """The training steps the newest CSVLogger version logged (a killed run may never flush its
    log, so only the resumed one is read)."""
    version = max((log_dir / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(version / "metrics.csv") as handle:
        return sorted({int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")})


def test_fit_killed_with_sigkill_resumes_from_the_last_saved_step(scene_cache, tmp_path):
    root = tmp_path / "run"
    config = tmp_path / "resume.yaml"
    # The scenes experiment's callbacks, with last.ckpt every 10 steps and a CSV log every step.
    config.write_text(
        "trainer:\n  log_every_n_steps: 1\n  logger:\n"
        f"    - class_path: lightning.pytorch.loggers.CSVLogger\n      init_args: {{save_dir: {tmp_path}}}\n"
        "  callbacks:\n    - class_path: callbacks.last_checkpoint.LastCheckpoint\n"
        f"      init_args: {{dirpath: {root}/checkpoints, every_n_train_steps: 10}}\n"
    )
    args = [*fresh_run(scene_cache, root, 100000), "--config", str(config), "--trainer.val_check_interval", "100000"]
    last = root / "checkpoints" / "last.ckpt"
    # The repo first, then whatever the caller put there (a GPU machine set up from wheels).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-m", "grounded_diffusion", "fit", *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (last.exists() and saved_step(last) >= 20):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the fit saved no checkpoint at step 20 in 240 s"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = saved_step(last)
    assert killed_at % 10 == 0 and killed_at >= 20

    main(["fit", *fresh_run(scene_cache, root, killed_at + 3), "--config", str(config), "--ckpt_path", "last"])
    assert saved_step(last) == killed_at + 3
    assert logged_steps(tmp_path) == [killed_at, killed_at + 1, killed_at + 2]


def test_every_allowed_torch_loads_checkpoints_weights_only():
    """torch.load (which Lightning calls for --ckpt_path) is weights-only by default from torch
    2.6: no pickle code runs from a checkpoint on any version pyproject.toml allows."""
    import re

    from packaging.version import Version

    floor = re.search(r'"torch>=([\d.]+)"', (REPO / "pyproject.toml").read_text())[1]
    assert Version(floor) >= Version("2.6")


def test_a_failed_background_write_stops_predict_and_keeps_what_was_written(tmp_path, monkeypatch):
    """The cache writer writes in a background thread: its error still ends the run, and the
    samples written before it stay in the cache for the rerun."""
    from grounded_diffusion.data.cache import TripletCache

    original, calls = TripletCache.write, []

    def write(self, record, tensors, metadata):
        calls.append(record["id"])
        if len(calls) == 6:
            raise OSError("No space left on device")
        original(self, record, tensors, metadata)

    monkeypatch.setattr(TripletCache, "write", write)
    with pytest.raises(OSError, match="No space left on device"):
        main(["predict", *scenes_args(tmp_path, counts="{train: 12}")])
    cache = TripletCache(next(tmp_path.glob("cache-*")))
    assert sorted(r["id"] for r in cache.manifest()) == sorted(calls[:5] + calls[6:])  # all but the failed one
    monkeypatch.setattr(TripletCache, "write", original)
    main(["predict", *scenes_args(tmp_path, counts="{train: 12}")])  # the rerun finishes the rest
    assert len(cache.manifest()) == 12


def test_a_checkpoint_of_another_head_version_stops_with_what_to_do(tmp_path, scene_cache):
    main(["fit", *fresh_run(scene_cache, tmp_path, 1), "--trainer.logger", "false"])
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key in ("head.token_norm.weight", "head.token_norm.bias"):  # a head from before that layer
        del checkpoint["state_dict"][key]
    torch.save(checkpoint, tmp_path / "old_head.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *fresh_run(scene_cache, tmp_path, 1), "--ckpt_path", str(tmp_path / "old_head.ckpt"), "--trainer.logger", "false"])
    message = str(exit_info.value.code)
    assert "head.token_norm.bias, head.token_norm.weight" in message and "Train it again with `fit`" in message
