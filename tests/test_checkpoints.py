"""``last.ckpt`` is always the newest state (after fit, after a kill -9, and for ``test``), and a fit
resumed from it trains on the batches and random draws of one never stopped."""

import csv
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from lightning import Callback, LightningDataModule, LightningModule, Trainer

from callbacks.last_checkpoint import LastCheckpoint
from conftest import REPO, assert_same_weights, last_weights, scenes_args
from grounded_diffusion.cli import main
from grounded_diffusion.data.samplers import loader_generator, training_sampler

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`


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
    main(
        [
            "fit",
            *fresh_run(scene_cache, tmp_path, 5),
            "--trainer.val_check_interval",
            "2",
            "--trainer.logger",
            "false",
        ]
    )
    assert saved_step(tmp_path / "checkpoints" / "last.ckpt") == 5
    best = list((tmp_path / "checkpoints").glob("best-step=*.ckpt"))
    assert len(best) == 1 and saved_step(best[0]) in (2, 4)


def test_test_with_ckpt_path_last_scores_the_newest_weights(scene_cache, caplog):
    root = scene_cache
    main(["fit", *scenes_args(root, steps=3), "--trainer.logger", "false"])
    newest = newest_last(root)
    assert saved_step(newest) == 3
    with caplog.at_level("INFO"):
        main(
            [
                "test",
                *scenes_args(root),
                "--ckpt_path",
                "last",
                "--verbose",
                "false",
                "--trainer.logger",
                "false",
            ]
        )
    assert f"Restoring states from the checkpoint path at {newest}" in caplog.text


def test_test_with_ckpt_path_last_and_no_checkpoint_stops(tmp_path, scene_cache):
    args = scenes_args(scene_cache)
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *args, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"])
    assert "--ckpt_path last: no last checkpoint in" in str(exit_info.value.code) and "Run `fit`" in str(
        exit_info.value.code
    )


def batches_into_epoch(checkpoint: Path) -> int:
    """How many batches of its epoch the fit had trained when it wrote ``checkpoint``."""
    loops = torch.load(checkpoint, map_location="cpu", weights_only=True)["loops"]["fit_loop"]
    return loops["epoch_loop.batch_progress"]["current"]["processed"]


@pytest.fixture(scope="module")
def twelve_steps(scene_cache, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of a 12-step fit that validates once, at its end, and is never stopped."""
    root = tmp_path_factory.mktemp("twelve_steps")
    main(["fit", *fresh_run(scene_cache, root, 12), "--trainer.logger", "false"])
    return last_weights(root)


def test_validating_more_often_trains_the_same_weights(scene_cache, tmp_path, twelve_steps):
    """Validation draws nothing from the training's random stream, and the training order depends
    on the seed and the epoch only (12 steps of batch 4 cross an epoch boundary here)."""
    main(
        [
            "fit",
            *fresh_run(scene_cache, tmp_path, 12),
            "--trainer.val_check_interval",
            "3",
            "--trainer.logger",
            "false",
        ]
    )
    assert_same_weights(last_weights(tmp_path), twelve_steps)


def test_a_fit_continued_to_more_steps_trains_the_same_weights_as_one_run(
    scene_cache, tmp_path, twelve_steps
):
    """``fit --ckpt_path last`` with a larger max_steps, from a stop part-way through an epoch."""
    main(["fit", *fresh_run(scene_cache, tmp_path, 5), "--trainer.logger", "false"])
    assert (
        batches_into_epoch(tmp_path / "checkpoints" / "last.ckpt") == 2
    )  # of 3: part-way through the 2nd epoch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(
            ["fit", *fresh_run(scene_cache, tmp_path, 12), "--ckpt_path", "last", "--trainer.logger", "false"]
        )
    assert_same_weights(last_weights(tmp_path), twelve_steps)
    # Resuming writes on into the run's own checkpoint folder: no notice that it is not empty.
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]


class Stopped(Exception):
    """Stands for a kill: the run ends here, with what the checkpoint callbacks wrote before."""


class Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 11  # 5 batches of 2 per epoch, the 11th sample dropped (drop_last)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index)])


class RecordBatches(LightningModule):
    """Records the samples of each training batch and a draw from the global random stream, as a
    random augmentation would; ``stop_before_step`` raises ``Stopped``."""

    def __init__(self, stop_before_step: int | None = None) -> None:
        super().__init__()
        self.layer, self.batches, self.stop_before_step = torch.nn.Linear(1, 1), [], stop_before_step

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.stop_before_step:
            raise Stopped
        self.batches.append((batch.flatten().int().tolist(), torch.rand(()).item()))
        return self.layer(batch).sum()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        torch.rand(())  # as transformers 5.17's Mask2Former decoder does in eval too (its layerdrop)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StopAt(Callback):
    """Asks the fit to stop after ``step``, as ``max_time``'s Timer does when time is up."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, *args) -> None:
        trainer.should_stop = trainer.should_stop or trainer.global_step == self.step


class NumbersData(LightningDataModule):
    """Loaders made as our datamodules make them."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        dataset, generator = Numbers(), loader_generator()
        sampler = training_sampler(self.trainer, dataset, 2)
        return torch.utils.data.DataLoader(
            dataset, batch_size=2, sampler=sampler, drop_last=True, generator=generator
        )

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(Numbers(), batch_size=4, generator=loader_generator())


def trained_batches(
    root: Path,
    max_steps: int,
    every_n_train_steps: int = 0,
    val_check_interval: int | None = None,
    stop_before_step: int | None = None,
    stop_at_step: int | None = None,
    ckpt_path: str | None = None,
) -> list[tuple[list[int], float]]:
    torch.manual_seed(0 if ckpt_path is None else 1)  # a resumed fit draws on from the checkpoint's state
    model = RecordBatches(stop_before_step)
    if val_check_interval:
        validation = {"val_check_interval": val_check_interval, "check_val_every_n_epoch": None}
    else:
        validation = {"limit_val_batches": 0}
    trainer = Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[LastCheckpoint(str(root), every_n_train_steps), StopAt(stop_at_step)],
        **validation,
    )
    try:
        trainer.fit(model, NumbersData(), ckpt_path=ckpt_path)
    except Stopped:
        pass
    return model.batches


@pytest.mark.parametrize(
    "saved_at, stop, arguments",
    [
        ("the step interval, mid-epoch", 7, {"every_n_train_steps": 7, "stop_before_step": 9}),
        ("the step interval, end of an epoch", 5, {"every_n_train_steps": 5, "stop_before_step": 6}),
        ("a validation, mid-epoch", 3, {"val_check_interval": 3, "stop_before_step": 4}),
        ("the last step, mid-epoch", 7, {"max_steps": 7}),
        ("the last step, end of an epoch", 10, {"max_steps": 10}),
        ("a validation at the last step, mid-epoch", 7, {"max_steps": 7, "val_check_interval": 7}),
        ("a callback's stop (as max_time's), mid-epoch", 7, {"stop_at_step": 7}),
    ],
)
def test_a_resumed_fit_trains_on_the_batches_and_draws_an_uninterrupted_one_does(
    tmp_path, saved_at, stop, arguments
):
    """The reference is the same fit without a stop. Lightning alone (a plain sampler) starts a
    mid-epoch resume at the epoch's first batch, after a checkpoint written when fit ends it skips
    the rest of the epoch, and it does not restore the global random stream."""
    straight = trained_batches(tmp_path / "straight", max_steps=14)
    before = trained_batches(tmp_path / "run", **{"max_steps": 100, **arguments})
    assert saved_step(tmp_path / "run" / "last.ckpt") == stop, saved_at
    after = trained_batches(tmp_path / "run", max_steps=14, ckpt_path=str(tmp_path / "run" / "last.ckpt"))
    assert before[:stop] + after == straight, saved_at


def test_validation_draws_leave_the_training_draws_alone(tmp_path):
    """A model that draws from the global stream while it validates trains on the same draws
    whether it validates every 2 steps or never."""
    assert trained_batches(tmp_path / "often", max_steps=8, val_check_interval=2) == trained_batches(
        tmp_path / "never", max_steps=8
    )


class SavedSteps(Callback):
    def __init__(self) -> None:
        self.steps = []

    def on_save_checkpoint(self, trainer: Trainer, *args) -> None:
        self.steps.append(trainer.global_step)


def test_a_callbacks_stop_before_min_steps_is_saved_once_when_the_fit_ends(tmp_path):
    """Lightning trains on until ``min_steps``; ``last.ckpt`` is written then, not at every step
    after the stop was asked for."""
    saved = SavedSteps()
    trainer = Trainer(
        max_steps=100,
        min_steps=6,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StopAt(3), LastCheckpoint(str(tmp_path), every_n_train_steps=0), saved],
    )
    trainer.fit(RecordBatches(), NumbersData())
    assert trainer.global_step == 6 and saved.steps == [6]


def logged_steps(log_dir: Path) -> list[int]:
    """The training steps the newest CSVLogger version logged (a killed run may never flush its
    log, so only the resumed one is read)."""
    version = max((log_dir / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(version / "metrics.csv") as handle:
        return sorted({int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")})


def test_fit_killed_with_sigkill_resumes_from_the_last_saved_step_as_if_never_stopped(scene_cache, tmp_path):
    root = tmp_path / "run"
    config = tmp_path / "resume.yaml"
    # The scenes experiment's callbacks, with last.ckpt every 10 steps and a CSV log every step.
    config.write_text(
        "trainer:\n  log_every_n_steps: 1\n  logger:\n"
        f"    - class_path: lightning.pytorch.loggers.CSVLogger\n      init_args: {{save_dir: {tmp_path}}}\n"
        "  callbacks:\n    - class_path: callbacks.last_checkpoint.LastCheckpoint\n"
        f"      init_args: {{dirpath: {root}/checkpoints, every_n_train_steps: 10}}\n"
    )
    args = [
        *fresh_run(scene_cache, root, 100000),
        "--config",
        str(config),
        "--trainer.val_check_interval",
        "100000",
    ]
    last = root / "checkpoints" / "last.ckpt"
    # The repo first, then whatever the caller put there (a GPU machine set up from wheels).
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "grounded_diffusion", "fit", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
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

    main(
        ["fit", *fresh_run(scene_cache, root, killed_at + 3), "--config", str(config), "--ckpt_path", "last"]
    )
    assert saved_step(last) == killed_at + 3
    assert logged_steps(tmp_path) == [killed_at, killed_at + 1, killed_at + 2]
    # The rest of the killed epoch, in its order: the weights of a fit that was never stopped.
    main(
        [
            "fit",
            *fresh_run(scene_cache, tmp_path / "never_stopped", killed_at + 3),
            "--trainer.logger",
            "false",
        ]
    )
    assert_same_weights(last_weights(root), last_weights(tmp_path / "never_stopped"))


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
    assert sorted(r["id"] for r in cache.manifest()) == sorted(
        calls[:5] + calls[6:]
    )  # all but the failed one
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
        main(
            [
                "test",
                *fresh_run(scene_cache, tmp_path, 1),
                "--ckpt_path",
                str(tmp_path / "old_head.ckpt"),
                "--trainer.logger",
                "false",
            ]
        )
    message = str(exit_info.value.code)
    assert (
        "head.token_norm.bias, head.token_norm.weight" in message and "Train it again with `fit`" in message
    )
