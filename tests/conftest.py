"""Shared fixtures: one tiny Stable Diffusion and one small procedural triplet cache per session."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# Before anything imports the project: the tiny model is built into a throw-away folder, and
# processes spawned by DDP tests inherit the setting.
os.environ.setdefault("GROUNDED_DIFFUSION_CACHE", tempfile.mkdtemp(prefix="gd-test-models-"))
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# `make test` runs two pytest-xdist workers on two cores: one thread each (and in the processes
# they start), since two torch processes of two threads slow each other many-fold (OpenMP
# spin-waiting).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SCENES = str(REPO / "experiments" / "scenes.yaml")


def scenes_args(root: Path, counts: str = "{train: 24, val: 7, test: 9}", steps: int = 4) -> list[str]:
    """CLI arguments that run experiments/scenes.yaml small and inside ``root``."""
    return [
        "--config",
        SCENES,
        "--data.init_args.source.init_args.counts",
        counts,
        "--data.init_args.batch_size",
        "4",
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(steps),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
    ]


def last_weights(root: Path) -> dict:
    """The weights in ``<root>/checkpoints/last.ckpt``."""
    import torch

    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def doc_blocks(heading: str, language: str, page: str = "README.md") -> list[str]:
    """The ``language`` code blocks of the section under ``heading`` of a documentation page
    (the README, or a guide in docs/), up to the next section of level 2."""
    text = (REPO / page).read_text()
    section = text[text.index(heading) + len(heading) :].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


@pytest.fixture(scope="session")
def backbone():
    from grounded_diffusion.models.backbones import StableDiffusionBackbone

    return StableDiffusionBackbone()


def run_cli(args: list[str]) -> None:
    """``main(args)`` with a plain sys.argv, for fixtures wider than a test (``plain_argv`` below
    only covers tests)."""
    from grounded_diffusion.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["grounded-diffusion"])
        main(args)


def print_config(configs: list[str], subcommand: str = "fit") -> str:
    """What ``SUBCOMMAND --config A --config B ... --print_config`` prints, run from the repository
    root (the configs merged, interpolated, every default filled in), without the version line."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        run_cli([subcommand, *(a for c in configs for a in ("--config", str(c))), "--print_config"])
    return "\n".join(line for line in out.getvalue().splitlines() if not line.startswith("# lightning"))


@pytest.fixture(scope="session")
def scene_cache(tmp_path_factory) -> Path:
    """A small cache built by the real predict run; returns the run folder (trainer.default_root_dir)."""
    root = tmp_path_factory.mktemp("offline")
    run_cli(["predict", *scenes_args(root)])
    return root


# -- a small scenes cache to break, and disks to fill (the fault tests) -------------------------------

SMALL = "{train: 6, val: 2, test: 2}"


def small_scenes_args(root: Path, steps: int = 2) -> list[str]:
    """``scenes_args`` for 10 scenes (6 train, 2 val, 2 test), no logger."""
    return [*scenes_args(root, counts=SMALL, steps=steps), "--trainer.logger", "false"]


def cache_of(root: Path):
    """The triplet cache in a run folder."""
    from grounded_diffusion.data.cache import TripletCache

    return TripletCache(next(root.glob("cache-*")))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A small scenes run folder with its cache built (copy it before changing it)."""
    root = tmp_path_factory.mktemp("built")
    run_cli(["predict", *small_scenes_args(root)])
    return root


@pytest.fixture
def run(built, tmp_path) -> Path:
    """A copy of ``built`` to break (copy2: the files keep their times)."""
    shutil.copytree(built, tmp_path / "run")
    return tmp_path / "run"


class Tmpfs:
    """A small tmpfs, to fill or make read-only."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        path.mkdir(parents=True)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
        )
        if (
            mounted.returncode != 0
        ):  # (a container without CAP_SYS_ADMIN): said as a skip, with mount's reason
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True)


@pytest.fixture
def tmpfs(tmp_path):
    """``make(size)``: a tmpfs of ``size`` bytes, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mounts = []

    def make(size: int, name: str = "disk") -> Tmpfs:
        mounts.append(Tmpfs(tmp_path / name, size))
        return mounts[-1]

    yield make
    for mount in mounts:
        subprocess.run(["umount", "-l", str(mount.path)], check=False)


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """LightningCLI(args=...) warns when sys.argv holds pytest's own arguments."""
    monkeypatch.setattr("sys.argv", ["grounded-diffusion"])


# The longest modules, longest first. `make test`'s two pytest-xdist workers take whole modules
# (`--dist loadfile`: a module's fixtures are built once) in collection order
# (`--no-loadscope-reorder`), the first two modules one each, so these start at once and the short
# modules fill in around them.
LONG_MODULES = (
    "test_world_protocol1",
    "test_world_held_out_word",
    "test_world_mmdit",
    "test_gpu_session",
    "test_ablations",
    "test_synthesis_runs",
    "test_world_models",
    "test_faults",
    "test_ddp",
    "test_protocol2",
    "test_cli",
    "test_dit_backbone",
)


def pytest_collection_modifyitems(config, items):
    """The long modules first (above). ``gpu`` tests need CUDA: reported as skipped where there
    is none (CI)."""
    import torch

    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # (stable: else as collected)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
