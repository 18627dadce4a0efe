"""Faults a run meets, and what is guaranteed: one line that names the file or value and the fix,
before any work where it can be known before; nothing finished lost; a rerun goes on.

Full and read-only disks are real: small tmpfs mounts (root, as CI runs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_errors import cli_error

from conftest import REPO, SCENES, cache_of
from conftest import small_scenes_args as small
from grounded_diffusion.cli import main
from grounded_diffusion.data.cache import TripletCache
from grounded_diffusion.data.grounded_folder import GroundedImageFolder
from grounded_diffusion.errors import UserError
from grounded_diffusion.files import FolderLock

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`

IDS = sorted(
    [
        *(f"scene-train-{i:06d}" for i in range(6)),
        *(f"scene-{s}-{i:06d}" for s in ("val", "test") for i in range(2)),
    ]
)


def trained_on(cache: TripletCache) -> list[str]:
    """The ids a fit trains on: the train split's samples of seen categories only."""
    unseen = {"ring", "star", "bar"}  # scenes split 1
    return [r["id"] for r in cache.manifest() if r["split"] == "train" and not set(r["categories"]) & unseen]


def manifest_ids(cache: TripletCache) -> list[str]:
    return [json.loads(line)["id"] for line in cache.manifest_path.read_text().splitlines()]


# -- 1. sample ids cannot leave their folder -------------------------------------------------------


def test_a_manifest_id_that_leaves_the_cache_is_refused_on_every_read(run, capsys):
    cache = cache_of(run)
    record = json.loads(cache.manifest_path.read_text().splitlines()[0])
    escape = {**record, "id": "../../../../escaped"}
    with open(cache.manifest_path, "a") as manifest:
        manifest.write(json.dumps(escape) + "\n")
    for subcommand in ("fit", "test"):
        message = cli_error([subcommand, *small(run)], capsys)
        assert (
            "sample id '../../../../escaped' is not a plain name" in message
            and "manifest.jsonl:11" in message
        )
    for folder in (cache.samples_dir, run / "report" / "overlays"):  # where a read or an overlay would land
        assert not list((folder / "../../../..").resolve().glob("escaped*"))
    with pytest.warns(UserWarning, match=r"dropped 1 damaged lines \(line 11\)"):
        main(["predict", *small(run)])  # the build drops the line
    assert sorted(manifest_ids(cache)) == IDS
    with pytest.raises(UserError, match="is not a plain name"):
        GroundedImageFolder(run / "grounded").write({"id": "../x"}, None, None, None)


# -- 2. a lost cache.json is written again --------------------------------------------------------


def test_predict_writes_a_lost_cache_json_again_after_checking_the_samples(run, capsys):
    cache = cache_of(run)
    original = cache.metadata()
    cache.metadata_path.write_text(cache.metadata_path.read_text()[:50])  # truncated
    message = cli_error(["fit", *small(run)], capsys)
    assert "is not valid JSON" in message and "Delete it and rerun the cache's predict command" in message
    cache.metadata_path.unlink()
    other = cli_error(
        [
            "predict",
            *small(run),
            "--model.init_args.backbone.branches",
            "uncond+cond",
            "--data.init_args.cache_dir",
            str(cache.root),
        ],
        capsys,
    )
    assert "has no cache.json and its samples were built with other settings" in other
    assert not cache.metadata_path.exists()
    main(["predict", *small(run)])  # every sample is done: nothing to build, and cache.json is back
    assert cache.metadata() == original
    main(["fit", *small(run)])


# -- 3. two builds of one folder --------------------------------------------------------------------


def test_two_predict_runs_on_one_cache_one_refuses_and_every_id_is_written_once(tmp_path, capsys):
    args = [
        *small(tmp_path),
        "--data.init_args.source.init_args.counts",
        "{train: 40, val: 2, test: 2}",
        "--data.init_args.batch_size",
        "2",
    ]
    lock = tmp_path / "cache-cond-t5" / ".lock"
    first = subprocess.Popen(
        [sys.executable, "-m", "grounded_diffusion", "predict", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not (lock.exists() and f"pid {first.pid}" in lock.read_text()):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # paused mid-build, so that it is surely still building
    try:
        message = cli_error(["predict", *args], capsys)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert (
        f"The triplet cache at '{lock.parent}' is being written by another run (pid {first.pid} on" in message
    )
    assert "or give this run another data.init_args.cache_dir" in message
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]
    ids = manifest_ids(TripletCache(lock.parent))
    assert len(ids) == len(set(ids)) == 44
    main(["predict", *args])  # the lock went with its process


def test_a_grounded_image_build_refuses_a_folder_another_run_writes(tmp_path, capsys):
    out = tmp_path / "generated"
    holder = FolderLock(out, "The grounded image folder", "data.init_args.out_dir")
    holder.acquire()  # (as another process would: a second open file of the same lock)
    try:
        message = cli_error(
            [
                "predict",
                "--config",
                str(REPO / "experiments/generate.yaml"),
                "--config",
                str(REPO / "experiments/offline.yaml"),
                "--trainer.default_root_dir",
                str(out),
            ],
            capsys,
        )
    finally:
        holder.release()
    assert (
        f"The grounded image folder at '{out}' is being written by another run (pid {os.getpid()} on"
        in message
    )
    assert not (out / "JPEGImages").exists()


# -- 4. a full disk -------------------------------------------------------------------------------


def test_a_full_disk_during_a_cache_build_keeps_every_sample_and_a_rerun_completes(
    built, tmp_path, tmpfs, capsys
):
    disk = tmpfs(900_000)  # room for about five of the ten samples (167 kB each)
    cache_dir = disk.path / "cache"
    args = [*small(tmp_path), "--data.init_args.cache_dir", str(cache_dir)]
    message = cli_error(["predict", *args], capsys)
    assert f"disk full at {cache_dir}/samples/" in message and " bytes free: free some space" in message
    assert "every sample already written is kept, and the rerun goes on from them" in message
    cache = TripletCache(cache_dir)
    done = manifest_ids(cache)
    assert 0 < len(done) < 10 and all(cache.readable(i) for i in done)
    assert not list(cache.samples_dir.glob(".*.tmp*"))  # the cut-short file is gone: its space is free again
    disk.remount("size=4m")
    main(["predict", *args])
    assert sorted(manifest_ids(cache)) == IDS
    reference = cache_of(built)  # the same build never interrupted
    for sample_id in IDS:
        resumed, whole = cache.load(sample_id)[0], reference.load(sample_id)[0]
        assert resumed.keys() == whole.keys()
        for key in resumed:  # features: within fp16 rounding (CPU kernels differ with the batch's size)
            tolerance = (
                {"rtol": 2e-3, "atol": 2e-3} if key.startswith("features.") else {"rtol": 0, "atol": 0}
            )
            torch.testing.assert_close(resumed[key], whole[key], **tolerance, msg=f"{sample_id} {key}")


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(built, tmp_path, tmpfs, capsys):
    disk = tmpfs(200_000_000)
    args = [*small(disk.path / "run"), "--data.init_args.cache_dir", str(cache_of(built).root)]
    main(["fit", *args])  # steps 1-2: last.ckpt and best-step=2.ckpt
    checkpoints = disk.path / "run" / "checkpoints"
    before = (checkpoints / "last.ckpt").read_bytes()
    used = sum(f.stat().st_size for f in disk.path.rglob("*") if f.is_file())
    disk.remount(f"size={used + len(before) // 2}")  # half a checkpoint left
    resume = [*args, "--ckpt_path", "last", "--trainer.max_steps", "4", "--trainer.val_check_interval", "4"]
    message = cli_error(["fit", *resume], capsys)
    assert (
        f"disk full at {checkpoints}/" in message
        and "the checkpoints written before it are intact" in message
    )
    assert (checkpoints / "last.ckpt").read_bytes() == before
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-step=2.ckpt", "last.ckpt"]  # no torn file
    disk.remount("size=200m")
    main(["fit", *resume])
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 4


def test_a_full_disk_during_grounded_generation_keeps_every_image_and_a_rerun_completes(
    built, tmp_path, tmpfs, capsys
):
    main(["fit", *small(tmp_path / "head", steps=1), "--data.init_args.cache_dir", str(cache_of(built).root)])
    disk = tmpfs(100_000)  # room for some of the six images (with their label maps and overlays)
    out = disk.path / "generated"
    prompts = (
        "{class_path: PromptList, init_args: {file: null, prompts: ["
        + ", ".join(
            f'{{prompt: "a photograph of a {c}", categories: [{c}]}}'
            for c in ("disc", "ring", "star", "square", "bar", "cross")
        )
        + "]}}"
    )
    args = [
        "--config",
        str(REPO / "experiments/generate.yaml"),
        "--config",
        str(REPO / "experiments/offline.yaml"),
        "--config",
        SCENES,
        "--data",
        "datamodules.grounded_images.GroundedImageDataModule",
        "--data.init_args.out_dir",
        str(out),
        "--data.init_args.prompts",
        prompts,
        "--data.init_args.batch_size",
        "2",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks",
        "callbacks.grounded_writer.GroundedImageWriter",
        "--ckpt_path",
        str(tmp_path / "head" / "checkpoints" / "last.ckpt"),
    ]
    message = cli_error(["predict", *args], capsys)
    assert f"disk full at {out}/" in message and "every image already written is kept" in message
    folder = GroundedImageFolder(out)
    written = folder.manifest.records()
    assert 0 < len(written) < 6 and all(p.is_file() for r in written for p in folder.files(r["id"]))
    disk.remount("size=4m")
    folder.files(written[0]["id"])[0].unlink()  # and an image lost since: made again
    with pytest.warns(UserWarning, match="1 listed samples lack a file; rebuilding them"):
        main(["predict", *args])
    assert len(folder.manifest.records()) == 6 and (out / "annotations.json").is_file()


def test_a_full_disk_met_by_a_report_writer_is_one_line_too(built, head, tmpfs, capsys):
    disk = tmpfs(48_000)  # the reports of a test run (plots, overlays) need more
    args = [*small(disk.path / "run"), "--data.init_args.cache_dir", str(cache_of(built).root)]
    message = cli_error(["test", *args, "--ckpt_path", str(head / "last.ckpt"), "--verbose", "false"], capsys)
    assert f"disk full at {disk.path}/run" in message and "bytes free: free some space" in message


# -- 5. output folders that cannot be written ------------------------------------------------------


def test_a_read_only_output_folder_is_named_before_any_work(built, tmp_path, tmpfs, capsys):
    disk = tmpfs(4_000_000)
    main(["predict", *small(disk.path / "run")])  # a complete cache ...
    disk.remount("ro")  # ... then read-only
    message = cli_error(["predict", *small(disk.path / "run")], capsys)
    assert f"trainer.default_root_dir '{disk.path / 'run'}' is not writable: read-only" in message
    message = cli_error(["fit", *small(disk.path / "new")], capsys)
    assert (
        f"trainer.default_root_dir '{disk.path / 'new'}' is not writable (its parent {disk.path}, where it would be created)"
        in message
    )
    cache = cache_of(built).root
    message = cli_error(
        [
            "predict",
            *small(tmp_path / "run"),
            "--data.init_args.cache_dir",
            str(disk.path / "run" / cache.name),
        ],
        capsys,
    )
    assert "data.init_args.cache_dir" in message and "is not writable: read-only" in message
    assert not (tmp_path / "run").exists()


def test_an_output_path_that_is_a_file_is_named_before_any_work(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    message = cli_error(["fit", *small(tmp_path / "taken" / "run")], capsys)
    assert (
        f"trainer.default_root_dir '{tmp_path / 'taken' / 'run'}': {tmp_path / 'taken'} is a file, not a folder"
        in message
    )


# -- 6. checkpoints: damaged, or of another model ---------------------------------------------------


@pytest.fixture(scope="module")
def head(built, tmp_path_factory) -> Path:
    """A fit's checkpoint folder (2 steps)."""
    root = tmp_path_factory.mktemp("head")
    main(["fit", *small(root), "--data.init_args.cache_dir", str(cache_of(built).root)])
    return root / "checkpoints"


def test_a_truncated_checkpoint_is_named_with_what_to_do(built, head, tmp_path, capsys):
    data = (head / "last.ckpt").read_bytes()
    half = tmp_path / "checkpoints" / "half.ckpt"
    half.parent.mkdir()
    half.write_bytes(data[: len(data) // 2])
    (tmp_path / "checkpoints" / "best-step=2.ckpt").write_bytes(data)
    args = [*small(tmp_path), "--data.init_args.cache_dir", str(cache_of(built).root)]
    for subcommand in ("fit", "test"):
        message = cli_error([subcommand, *args, "--ckpt_path", str(half)], capsys)
        assert f"checkpoint {half} cannot be read (" in message and "it is truncated or damaged" in message
        assert f"Resume from another checkpoint (best-step=2.ckpt in {half.parent})" in message
    half.rename(half.with_name("last.ckpt"))  # the same through --ckpt_path last (Lightning's own load)
    message = cli_error(["fit", *args, "--ckpt_path", "last"], capsys)
    assert f"checkpoint {half.with_name('last.ckpt')} cannot be read" in message


def test_a_checkpoint_of_another_model_is_named(built, head, tmp_path, capsys):
    recorded = torch.load(head / "last.ckpt", weights_only=True)["hyper_parameters"]["_class_path"]
    assert (
        recorded == "lightning_modules.grounding.GroundingModule"
    )  # what LightningCLI records, and the check reads
    segmenter = tmp_path / "segmenter.ckpt"
    hparams = {
        "_class_path": "lightning_modules.segmentation.SemanticSegmentationModule",
        "vocabulary": "pascal",
    }
    torch.save(
        {"state_dict": {}, "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.0"}, segmenter
    )
    message = cli_error(
        [
            "fit",
            *small(tmp_path),
            "--data.init_args.cache_dir",
            str(cache_of(built).root),
            "--ckpt_path",
            str(segmenter),
        ],
        capsys,
    )
    assert message == (
        f"error: checkpoint {segmenter} is of a Protocol II segmenter (SemanticSegmentationModule), but this run's model "
        "is a grounding head (GroundingModule): give a checkpoint written by a fit of the same model config"
    )


# -- 7. a diverged loss, and a learning rate given when resuming -------------------------------------


def test_a_learning_rate_that_diverges_says_so_and_where_to_go_on(built, tmp_path, capsys):
    args = [
        *small(tmp_path, steps=6),
        "--data.init_args.cache_dir",
        str(cache_of(built).root),
        "--model.init_args.lr",
        "1e30",
    ]
    message = cli_error(["fit", *args], capsys)
    assert "The learning rate is too high for it (now 1e+30): lower model.init_args.lr" in message
    assert (
        "start the fit again (no checkpoint was written before this step)" in message
        and "--ckpt_path" not in message
    )


def test_nan_in_a_cached_sample_names_the_sample_not_the_learning_rate(run, capsys):
    cache = cache_of(run)
    record = {"id": trained_on(cache)[0]}
    tensors, metadata = cache.load(record["id"])
    tensors["features.1"] = torch.full_like(tensors["features.1"], float("nan"))
    from safetensors.torch import save_file

    save_file(tensors, cache.sample_path(record["id"]), metadata=metadata)
    message = cli_error(["fit", *small(run, steps=4)], capsys)
    assert f"sample {record['id']} of the triplet cache {cache.root} holds NaN or infinite values" in message
    assert (
        "Delete its file and rerun the predict command" in message
        and "lower model.init_args.lr" not in message
    )


def test_a_learning_rate_given_when_resuming_is_the_one_that_trains(built, tmp_path, caplog):
    args = [*small(tmp_path), "--data.init_args.cache_dir", str(cache_of(built).root)]
    main(["fit", *args])  # lr 1e-3 (experiments/scenes.yaml)
    for ckpt_path in (
        "last",
        str(tmp_path / "checkpoints" / "last.ckpt"),
    ):  # by name, and as a file (whose hparams LightningCLI reads)
        steps = 4 if ckpt_path == "last" else 6
        with caplog.at_level("INFO"):
            main(
                [
                    "fit",
                    *args,
                    "--ckpt_path",
                    ckpt_path,
                    "--model.init_args.lr",
                    "1e-5",
                    "--trainer.max_steps",
                    str(steps),
                ]
            )
        checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == steps and checkpoint["hyper_parameters"]["lr"] == 1e-5
        assert {g["lr"] for s in checkpoint["optimizer_states"] for g in s["param_groups"]} == {1e-5}
    assert "Resuming at model.init_args.lr 1e-05 (the checkpoint trained at 0.001)" in caplog.text


# -- 8. values refused at config time, with the nearest valid one ---------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            ["--model.init_args.mask_threshold", "1.5"],
            "model.init_args.mask_threshold is 1.5, outside [0.0, 1.0]: the nearest valid value is 1.0, default 0.5",
        ),
        (
            ["--model.init_args.daam_threshold", "-0.2"],
            "model.init_args.daam_threshold is -0.2, outside [0.0, 1.0]: the nearest valid value is 0.0",
        ),
        (
            ["--model.init_args.test_min_oracle_score", "7"],
            "model.init_args.test_min_oracle_score is 7.0, outside [0.0, 1.0]",
        ),
        (
            ["--model.init_args.backbone.capture_step", "60"],
            "model.init_args.backbone.capture_step is 60, outside [1, 50]: the nearest valid value is 50, default 5",
        ),
        (
            ["--model.init_args.backbone.capture_step", "0"],
            "capture_step is 0, outside [1, 50]: the nearest valid value is 1",
        ),
        (
            ["--data.init_args.batch_size", "-2"],
            "data.init_args.batch_size is -2, outside [1, inf]: the nearest valid value is 1, default 8",
        ),
        (["--data.init_args.batch_size", "0"], "data.init_args.batch_size is 0, outside [1, inf]"),
        (
            ["--trainer.max_steps", "0"],
            "trainer.max_steps is 0: the fit would train nothing and write no checkpoint",
        ),
        (
            [
                "--data.init_args.split",
                "null",
                "--data.init_args.unseen",
                "[ring, star]",
                "--data.init_args.seen",
                "[disc, star]",
            ],
            "star listed as both seen and unseen",
        ),
        (
            ["--data.init_args.split", "null", "--data.init_args.unseen", "[rign]"],
            "Unknown unseen category 'rign' (did you mean 'ring'",
        ),
        (
            ["--trainer.devices", "64"],
            f"trainer.devices is 64 but this machine has {os.cpu_count()} CPU cores (trainer.accelerator 'cpu'): "
            f"the nearest valid value is {os.cpu_count()}",
        ),
    ],
)
def test_bad_values_are_refused_before_any_work(override, expected, tmp_path, capsys):
    assert expected in cli_error(["fit", *small(tmp_path), *override], capsys)
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_more_gpus_than_the_machine_has(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    message = cli_error(
        ["fit", *small(tmp_path), "--trainer.accelerator", "gpu", "--trainer.devices", "2"], capsys
    )
    assert (
        "trainer.devices is 2 but this machine has 1 CUDA GPUs (trainer.accelerator 'gpu'): the nearest valid value is 1"
        in message
    )


# -- 9. class paths: what the key takes, and nothing from the standard library ------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            ["--model", "os.system"],
            "model: 'os.system' is not a subclass of lightning.pytorch.core.module.LightningModule",
        ),
        (
            ["--data", "subprocess.Popen"],
            "data: 'subprocess.Popen' is not a subclass of lightning.pytorch.core.datamodule.LightningDataModule",
        ),
        (
            ["--model.init_args.oracle", "os.system"],
            "model.init_args.oracle: 'os.system' is not a subclass of grounded_diffusion.models.oracle.Oracle",
        ),
        (
            ["--trainer.callbacks+=subprocess.Popen"],
            "trainer.callbacks: 'subprocess.Popen' is not a subclass of lightning.pytorch.callbacks.callback.Callback",
        ),
        (
            ["--trainer.logger", "os.system"],
            "trainer.logger: 'os.system' is not a subclass of lightning.pytorch.loggers.logger.Logger",
        ),
        (
            ["--data.init_args.source", "subprocess.Popen"],
            "data.init_args.source: 'subprocess.Popen' is not a subclass of grounded_diffusion.data.voc.VOCFolder "
            "or grounded_diffusion.data.prompts.PromptSet",
        ),
        (
            ["--model.init_args.oracle", "lightning_modules.grounding.GroundingModule"],
            "model.init_args.oracle: 'lightning_modules.grounding.GroundingModule' is not a subclass of "
            "grounded_diffusion.models.oracle.Oracle: a class_path there must name one",
        ),
    ],
)
def test_a_class_path_of_the_wrong_kind_is_refused_in_one_line(override, expected, tmp_path, capsys):
    message = cli_error(["fit", *small(tmp_path), *override], capsys)
    assert expected in message
    if "'os" in expected or "'subprocess" in expected:
        assert "the standard library holds none, and a config may not name it" in message


def test_a_standard_library_class_path_is_refused_before_it_is_imported(tmp_path, capfd):
    assert "this" not in sys.modules  # importing it prints the Zen of Python
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *small(tmp_path), "--model", "this.Foo"])
    assert str(exit_info.value.code).startswith(
        "error: model: 'this.Foo' is not a subclass of lightning.pytorch.core.module.LightningModule"
    )
    assert "this" not in sys.modules and "Beautiful is better than ugly" not in "".join(capfd.readouterr())


def test_your_own_subclasses_still_work(built, tmp_path, monkeypatch):
    (tmp_path / "my_callbacks.py").write_text(
        "from lightning import Callback\n\n\n"
        "class StepsWritten(Callback):\n"
        "    def on_train_end(self, trainer, pl_module):\n"
        "        steps = trainer.default_root_dir + '/steps.txt'\n"
        "        open(steps, 'w').write(str(trainer.global_step))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    main(
        [
            "fit",
            *small(tmp_path / "run"),
            "--data.init_args.cache_dir",
            str(cache_of(built).root),
            "--trainer.callbacks+=my_callbacks.StepsWritten",
        ]
    )
    assert (tmp_path / "run" / "steps.txt").read_text() == "2"


# -- corrupt files found later: named, and the build repairs what it can --------------------------------


def test_damaged_sample_files_are_named_and_predict_builds_them_again(run, capsys):
    cache = cache_of(run)
    training = trained_on(cache)
    cut, random = cache.sample_path(training[0]), cache.sample_path(training[1])
    cut.write_bytes(cut.read_bytes()[:5000])
    random.write_bytes(np.random.default_rng(0).bytes(5000))
    message = cli_error(["fit", *small(run, steps=4)], capsys)
    assert (
        "Cannot read sample '" in message
        and "rerun the cache's predict command (it finds such samples" in message
    )
    assert str(cut) in message or str(random) in message
    with pytest.warns(
        UserWarning, match=rf"2 listed sample files are unreadable \(first: {cut}\); rebuilding them"
    ):
        main(["predict", *small(run)])
    assert sorted(manifest_ids(cache)) == IDS and cache.readable(training[0]) and cache.readable(training[1])
    main(["fit", *small(run)])


def test_a_damaged_manifest_line_is_named_and_predict_builds_its_sample_again(run, capsys):
    cache = cache_of(run)
    lines = cache.manifest_path.read_text().splitlines()
    lost = json.loads(lines[2])["id"]
    lines[2] = lines[2][: len(lines[2]) // 2] + "\x00garbage"
    cache.manifest_path.write_text("\n".join(lines) + "\n")
    message = cli_error(["fit", *small(run)], capsys)
    assert (
        f"{cache.manifest_path}:3: the line is not a sample's record" in message
        and "rerun the build that wrote it" in message
    )
    with pytest.warns(
        UserWarning, match=r"dropped 1 damaged lines \(line 3\); their samples are built again"
    ):
        main(["predict", *small(run)])
    ids = manifest_ids(cache)
    assert sorted(ids) == IDS and ids[-1] == lost
    main(["fit", *small(run)])


# -- every data source checked before the first sample ---------------------------------------------------


def test_a_scenes_folder_with_a_missing_label_map_stops_predict_before_any_sample(tmp_path, capsys):
    from grounded_diffusion.data.procedural_scenes import ProceduralScenes

    counts = {"train": 6, "val": 2, "test": 2}
    ProceduralScenes(str(tmp_path / "scenes"), counts=counts).prepare()
    label = tmp_path / "scenes" / "SegmentationClass" / "scene-val-000001.png"
    label.unlink()
    message = cli_error(["predict", *small(tmp_path)], capsys)
    assert (
        f"{label} does not exist" in message
        and f"The folder is generated: delete {tmp_path / 'scenes'} and rerun" in message
    )
    assert not list(tmp_path.glob("cache-*"))  # nothing written


def test_a_truncated_jpeg_is_named_by_the_up_front_check(tmp_path, capsys):
    from grounded_diffusion.data.procedural_scenes import ProceduralScenes

    ProceduralScenes(str(tmp_path / "scenes"), counts={"train": 6, "val": 2, "test": 2}).prepare()
    image = tmp_path / "scenes" / "JPEGImages" / "scene-train-000003.jpg"
    image.write_bytes(image.read_bytes()[:600])
    message = cli_error(["predict", *small(tmp_path)], capsys)
    assert f"cannot read {image} (" in message and "the file is damaged or not an image" in message
    assert not list(tmp_path.glob("cache-*"))


def test_an_image_too_small_to_segment_is_named(tmp_path):
    from grounded_diffusion.data.validation import DataError
    from grounded_diffusion.data.voc import VOCFolder, write_voc_folder

    normal = (np.zeros((48, 48, 3), np.uint8), np.ones((48, 48), np.uint8))
    tiny = (np.zeros((1, 1, 3), np.uint8), np.ones((1, 1), np.uint8))
    folder = write_voc_folder(tmp_path / "voc", ["cat"], {"train": [("a", *normal), ("dot", *tiny)]})
    with pytest.raises(DataError, match=r"dot.jpg is 1x1, under 16 pixels a side: too small to segment"):
        VOCFolder(str(folder)).prepare()


def test_a_coco_image_that_does_not_decode_is_named(tmp_path):
    from grounded_diffusion.data.segmentation_sets import COCOSegmentationSet
    from grounded_diffusion.data.validation import DataError
    from protocol2_data import make_coco

    images, annotations = make_coco(tmp_path)
    bad = images / "000000000002.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(DataError, match=rf"COCO image cannot read {bad} \("):
        COCOSegmentationSet(str(images), str(annotations)).validate()


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "Prompt file '{path}' does not exist"),
        (b"\xff\xfe\x00binary", "Prompt file '{path}' is not UTF-8 text (byte 0)"),
        (b"a photograph of a dog\n", "{path}:1: expected 'prompt | category, category'"),
    ],
)
def test_a_prompt_file_that_cannot_serve_is_named_at_config_time(content, expected, tmp_path):
    from grounded_diffusion.data.prompts import PromptList, PromptSet
    from grounded_diffusion.errors import ConfigError

    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected.format(path=path).replace("(", r"\(").replace(")", r"\)")):
        PromptList(file=str(path))
    if content is not None and b"|" not in content and b"\xff" in content:
        with pytest.raises(ConfigError, match="templates_file .* is not UTF-8 text"):
            PromptSet({"test": {"one_seen": 1}}, templates_file=str(path)).prepare()
