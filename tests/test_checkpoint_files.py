"""Checkpoints and head folders on disk, through every entry point.

- One checkpoint reader for the CLI verbs, ``export``, ``demo --checkpoint`` and
  ``GroundedGenerator.from_checkpoint``: a file that is not a Lightning checkpoint is one line.
- A resume that cannot go on says why: another head width (the setting named), a checkpoint past
  ``max_steps``; a negative ``max_steps`` is one line; ``test`` keeps the fit's ``config.yaml``.
- ``export`` never replaces a folder of other files, replaces a head only with ``--overwrite``,
  and replaces it whole (a re-export cut short leaves the old head); a full or read-only disk is
  one line; the files are readable by others (0644 under the usual umask)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_errors import cli_error

from conftest import small_scenes_args
from grounded_diffusion import GroundedGenerator, PretrainedHead
from grounded_diffusion.checkpoint_io import CheckpointError
from grounded_diffusion.cli import main
from grounded_diffusion.errors import UserError
from grounded_diffusion.files import atomic_write
from grounded_diffusion.models.pretrained_head import CONFIG_NAME, WEIGHTS_NAME, HeadFolderError

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`


def small(root: Path, *more: str) -> list[str]:
    return [*small_scenes_args(root), *more]


@pytest.fixture(scope="module")
def fitted(built, tmp_path_factory) -> Path:
    """conftest's ``built`` run folder with a 2-step fit in it (copy it before changing it)."""
    root = tmp_path_factory.mktemp("fitted") / "run"
    shutil.copytree(built, root)
    main(["fit", *small(root)])
    return root


@pytest.fixture
def run(fitted, tmp_path) -> Path:
    """A copy of ``fitted`` to break (in this module, conftest's ``run`` with a fit)."""
    shutil.copytree(fitted, tmp_path / "run")
    return tmp_path / "run"


# -- files that are not Lightning checkpoints --------------------------------------------------------


@pytest.fixture
def not_checkpoints(tmp_path) -> dict[str, tuple[Path, str]]:
    """(file, what the one line says of it)."""
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes\n")
    torch.save({"foo": 1}, folder / "dict.ckpt")
    torch.save([1, 2], folder / "list.ckpt")
    torch.save({"state_dict": {"w": 1}, "pytorch-lightning_version": "2.6"}, folder / "odd.ckpt")
    return {
        "text": (
            folder / "notes.txt",
            "is not a PyTorch checkpoint (it starts with b'my n', as no torch.save file does)",
        ),
        "dict": (
            folder / "dict.ckpt",
            "is not a Lightning checkpoint (it holds a dict of 'foo', without 'state_dict'",
        ),
        "list": (folder / "list.ckpt", "is not a Lightning checkpoint (it holds a list)"),
        "state": (folder / "odd.ckpt", "(it holds a state_dict that is not a dict of tensors)"),
    }


def test_a_file_that_is_not_a_checkpoint_is_one_line_in_every_entry_point(
    run, not_checkpoints, capsys, tmp_path
):
    for path, says in not_checkpoints.values():
        expected = f"error: checkpoint {path} {says}" if not says.startswith("(") else says
        for verb in ("fit", "test"):
            assert expected in cli_error([verb, *small(run, "--ckpt_path", str(path))], capsys)
        assert expected in cli_error(
            ["export", "--ckpt_path", str(path), "--out", str(tmp_path / "h")], capsys
        )
        assert expected in cli_error(["demo", "--checkpoint", str(path)], capsys)
        with pytest.raises(CheckpointError) as error:
            GroundedGenerator.from_checkpoint(path)
        assert expected.removeprefix("error: ") in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "h").exists()


# -- resuming --------------------------------------------------------------------------------------


def test_resuming_with_another_head_width_names_the_setting(run, capsys):
    message = cli_error(
        [
            "fit",
            *small(
                run,
                "--ckpt_path",
                "last",
                "--trainer.max_steps",
                "4",
                "--model.init_args.head.embed_dim",
                "64",
            ),
        ],
        capsys,
    )
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert message.startswith(f"error: checkpoint {checkpoint} does not fit this model (")
    assert "layers differ in shape, e.g. head." in message
    assert (
        "the model settings differ (model.init_args.head.embed_dim: checkpoint 128, this run 64)" in message
    )


def test_resuming_past_max_steps_is_refused_and_at_it_is_said(run, capsys):
    checkpoint = run / "checkpoints" / "last.ckpt"
    before = checkpoint.read_bytes()
    assert cli_error(["fit", *small(run, "--ckpt_path", "last", "--trainer.max_steps", "1")], capsys) == (
        f"error: checkpoint {checkpoint} is at step 2, past --trainer.max_steps 1: resuming would train nothing. "
        f"Give --trainer.max_steps above 2 to train on, or evaluate it with `test --ckpt_path {checkpoint}`"
    )
    assert checkpoint.read_bytes() == before


def test_resuming_a_finished_fit_says_so(run, caplog):
    checkpoint = run / "checkpoints" / "last.ckpt"
    with caplog.at_level("INFO"):
        main(["fit", *small(run, "--ckpt_path", "last", "--trainer.max_steps", "2")])
    notice = f"checkpoint {checkpoint} is at step 2, which is trainer.max_steps: the fit is finished, nothing to train"
    assert notice in [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("value", ["-5", "-2"])
def test_a_negative_run_length_is_one_line(run, capsys, value):
    for verb in ("fit", "test"):
        assert cli_error([verb, *small(run, "--trainer.max_steps", value)], capsys) == (
            f"error: trainer.max_steps is {value}: give a positive number (nearest valid value 1), or -1 / null to "
            "leave the length to the other limit"
        )


def test_test_and_predict_keep_the_fits_config_record(run):
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 2
    main(["test", *small(run, "--ckpt_path", "last", "--trainer.max_steps", "30")])
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 2
    assert yaml.safe_load((run / "config-test.yaml").read_text())["trainer"]["max_steps"] == 30


# -- export and head folders ---------------------------------------------------------------------


def test_export_replaces_only_a_head_and_only_when_asked(run, tmp_path, capsys, monkeypatch):
    checkpoint = str(run / "checkpoints" / "last.ckpt")
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("my project\n")
    (project / "config.json").write_text("{}")
    for out in (str(project), "."):
        monkeypatch.chdir(project)
        message = cli_error(["export", "--ckpt_path", checkpoint, "--out", out, "--overwrite"], capsys)
        assert "is not empty and not a head folder (it holds README.md, config.json)" in message
    assert (project / "README.md").read_text() == "my project\n" and (
        project / "config.json"
    ).read_text() == "{}"

    head = tmp_path / "head"
    main(["export", "--ckpt_path", checkpoint, "--out", str(head)])
    assert cli_error(["export", "--ckpt_path", checkpoint, "--out", str(head)], capsys) == (
        f"error: {head} already holds a head; replace it with --overwrite (Python: save_pretrained(..., "
        "overwrite=True)), or give another folder"
    )
    (head / "notes.md").write_text("mine")  # a head folder with a file of the user's is not replaced
    assert "is not empty and not a head folder" in cli_error(
        ["export", "--ckpt_path", checkpoint, "--out", str(head), "--overwrite"], capsys
    )
    (head / "notes.md").unlink()
    main(["export", "--ckpt_path", checkpoint, "--out", str(head), "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "head",
        "project",
        "run",
    ]  # no temporary folder left
    assert oct((head / WEIGHTS_NAME).stat().st_mode & 0o777) == oct(0o666 & ~umask())
    assert oct(head.stat().st_mode & 0o777) == oct(0o777 & ~umask())


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_reexport_cut_short_leaves_the_previous_head_whole(run, tmp_path, monkeypatch):
    checkpoint = run / "checkpoints" / "last.ckpt"
    head = PretrainedHead.from_checkpoint(checkpoint)
    folder = head.save_pretrained(tmp_path / "head")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with torch.no_grad():
        next(head.head.parameters()).add_(1.0)  # a new head: other weights

    def killed(*args, **kwargs):  # the process dies after model.safetensors is written
        raise KeyboardInterrupt

    monkeypatch.setattr(PretrainedHead, "_card", killed)
    with pytest.raises(KeyboardInterrupt):
        head.save_pretrained(folder, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head", "run"]
    monkeypatch.undo()
    head.save_pretrained(folder, overwrite=True)
    again = PretrainedHead.from_pretrained(folder)
    assert torch.equal(next(again.head.parameters()), next(head.head.parameters()))


def test_a_full_or_read_only_disk_is_one_line_when_a_head_is_saved(run, tmpfs):
    head = PretrainedHead.from_checkpoint(run / "checkpoints" / "last.ckpt")
    disk = tmpfs(1_000_000)  # less than the head's 7.6 MB of weights
    with pytest.raises(UserError) as error:
        head.save_pretrained(disk.path / "head")
    assert str(error.value).startswith(f"disk full at {disk.path / 'head'}") and "\n" not in str(error.value)
    assert list(disk.path.iterdir()) == []  # the partial folder is gone: the space is back
    disk.remount("ro")
    with pytest.raises(UserError) as error:
        head.save_pretrained(disk.path / "head")
    assert "is not writable" in str(error.value) and "read-only" in str(error.value)
    with pytest.raises(UserError) as error:  # a write that meets it (no check before): its own error
        atomic_write(disk.path / "x.json", lambda tmp: tmp.write_text("{}"))
    assert str(error.value).startswith(f"cannot write {disk.path / 'x.json'}: read-only file system")


def test_head_folders_and_checkpoints_pass_one_validator(run, tmp_path):
    """A checkpoint whose recorded settings are out of range is named as a head folder's would be."""
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["mask_threshold"] = 2.0
    torch.save(checkpoint, tmp_path / "odd.ckpt")
    with pytest.raises(HeadFolderError, match=r"odd.ckpt: mask_threshold is 2.0, outside \[0.0, 1.0\]"):
        PretrainedHead.from_checkpoint(tmp_path / "odd.ckpt")
    folder = PretrainedHead.from_checkpoint(run / "checkpoints" / "last.ckpt").save_pretrained(tmp_path / "h")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "mask_threshold": 2.0}))
    with pytest.raises(HeadFolderError, match=r"config.json: mask_threshold is 2.0, outside \[0.0, 1.0\]"):
        GroundedGenerator.from_pretrained(folder)
