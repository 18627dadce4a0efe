"""benchmarks/gpu_session.sh, the script a lent GPU machine runs: its stages, its table, its errors.
Here without CUDA; the GPU figures themselves come from running it on one."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`

SCRIPT = REPO / "benchmarks" / "gpu_session.sh"


def session(
    *stages: str,
    wheels: Path,
    out: Path,
    python: str = sys.executable,
    budget: int | None = None,
    **settings: str,
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHON": python,
        "WHEELS_DIR": str(wheels),
        "OUT": str(out),
        **({"BUDGET": str(budget)} if budget else {}),
        **settings,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *stages], env=env, capture_output=True, text=True, timeout=300
    )


def test_check_stage_imports_every_module_and_ends_with_the_table(tmp_path):
    run = session("check", wheels=tmp_path / "no_wheels", out=tmp_path / "out")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "project modules import" in (tmp_path / "out" / "check.log").read_text()
    table = run.stdout.strip().splitlines()[-3:]
    assert table[0] == "| stage | exit code | seconds |" and table[2].startswith("| check | 0 | ")


def test_throughput_stage_runs_the_benchmark_on_the_tiny_model_without_cuda(tmp_path):
    """The stage a lease wants most, run for real: a crash here would cost the lease its figures."""
    run = session("throughput", wheels=tmp_path / "no_wheels", out=tmp_path / "out")
    assert run.returncode == 0, run.stdout + run.stderr
    log = (tmp_path / "out" / "throughput.log").read_text()
    assert "CPU: matmul " in log and " TFLOP per forward -> FLOP bound " in log
    rows = [line for line in log.splitlines() if line.startswith("| float32 | ")]
    assert [row.split(" | ")[1] for row in rows] == ["1", "2"]  # batches 1 and 2, every column filled
    assert all(float(cell) > 0 for row in rows for cell in row.strip("| ").split(" | ")[2:])


def test_dit_stage_compares_the_tiny_transformers_with_the_plain_pipeline_without_cuda(tmp_path):
    run = session("dit", wheels=tmp_path / "no_wheels", out=tmp_path / "out")
    assert run.returncode == 0, run.stdout + run.stderr
    log = (tmp_path / "out" / "dit.log").read_text()
    assert all(f"embedded/{m} (float32)" in log for m in ("tiny-sd3", "tiny-flux", "tiny-flux2"))
    for run_name in ("| ours: + joint-attention word maps | ", "| ours: + ConceptAttention maps | "):
        rows = [line for line in log.splitlines() if line.startswith(run_name)]
        assert len(rows) == 3 and all(float(row.split(" | ")[1]) > 0 for row in rows)  # samples/s


def test_memory_stage_plans_the_tiny_model_without_cuda(tmp_path):
    run = session("memory", wheels=tmp_path / "no_wheels", out=tmp_path / "out")
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [
        line
        for line in (tmp_path / "out" / "memory.log").read_text().splitlines()
        if line.startswith("| tiny-sd |")
    ]
    assert len(rows) == 1 and float(rows[0].split(" | ")[3]) > 0 and rows[0].endswith("| n/a (no CUDA) |")


def test_unknown_stage_is_refused_before_anything_runs(tmp_path):
    run = session("check", "thruput", wheels=tmp_path, out=tmp_path / "out")
    assert run.returncode == 2
    assert (
        "unknown stage 'thruput' (stages: check tests throughput smoke storage compile dit memory"
        in run.stdout
    )
    assert not (tmp_path / "out").exists()


def test_missing_libraries_without_wheels_name_the_wheels_command(tmp_path):
    bare = tmp_path / "python"  # this interpreter without its site-packages: no diffusers
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    run = session("check", python=str(bare), wheels=tmp_path / "no_wheels", out=tmp_path / "out")
    assert run.returncode == 2
    assert (
        "lacks the project's libraries" in run.stdout
        and "gpu_session.sh wheels' where pip reaches a registry" in run.stdout
    )


def test_the_wheels_and_the_gpu_image_hold_every_requirement_of_the_project():
    """What the GPU machine lacks fails at its first import there, costing a lease: every
    requirement of the project, and of each wheel in turn, must be carried or in the image.
    Read from this .venv, whose versions the wheels take (gpu_session.sh wheels)."""
    import re
    from importlib.metadata import requires

    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wheels = {
        canonicalize_name(n) for n in re.search(r"WHEELS=\(([^)]*)\)", SCRIPT.read_text()).group(1).split()
    }
    listed = (REPO / "benchmarks" / "gpu_image_packages.txt").read_text().splitlines()
    image = {canonicalize_name(line.split("==")[0]) for line in listed if line and not line.startswith("#")}
    image_python = {
        "python_version": "3.12",
        "python_full_version": "3.12.3",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }

    def needed(texts, extras=()):
        for req in map(Requirement, texts):
            if req.marker is None or any(
                req.marker.evaluate({**image_python, "extra": e}) for e in ("", *extras)
            ):
                yield req

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [r for r in needed(project) if r.name != "wandb"]  # W&B stays behind: runs there log nothing
    missing, seen = set(), set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in image or (name, tuple(sorted(req.extras))) in seen:
            continue
        seen.add((name, tuple(sorted(req.extras))))
        if name not in wheels:
            missing.add(name)
            continue
        todo.extend(needed(requires(req.name) or [], req.extras))
    assert not missing, (
        f"add to WHEELS in benchmarks/gpu_session.sh (or to the image's list, if it has them): {sorted(missing)}"
    )


def stand_in_python(tmp_path: Path, script: str, action: str) -> str:
    """An interpreter that has the libraries and no GPU, and runs ``action`` (shell) where its
    arguments name ``script`` (benchmarks/environment.py is the check stage's, pytest the tests')."""
    python = tmp_path / "python"
    python.write_text(
        f'#!/bin/sh\ncase "$*" in\n  *{script}*) {action} ;;\n  *"import torch"*) echo 0 ;;\n  *) exit 0 ;;\nesac\n'
    )
    python.chmod(0o755)
    return str(python)


def test_a_failing_check_stops_the_run_before_the_stages_that_need_it(tmp_path):
    run = session(
        "check",
        "tests",
        python=stand_in_python(tmp_path, "environment.py", "exit 3"),
        wheels=tmp_path / "none",
        out=tmp_path / "out",
    )
    assert "error: check failed, so no other stage can work" in run.stdout and "=== tests" not in run.stdout
    assert run.stdout.strip().splitlines()[-1].startswith("| check | 3 | ")


def test_the_budget_stops_a_stage_that_outruns_it_and_skips_what_no_longer_fits(tmp_path):
    """BUDGET=13 with 2 s kept for the table and stages started with 3 s or more (the script's
    20 and 30, scaled down): the tests get what is left after the check, are stopped, and the
    next stage is skipped; the table still prints, inside the budget."""
    start = time.monotonic()
    run = session(
        "check",
        "tests",
        "throughput",
        python=stand_in_python(tmp_path, "pytest", "sleep 100"),
        wheels=tmp_path / "none",
        out=tmp_path / "out",
        budget=13,
        TABLE_SECONDS="2",
        MIN_STAGE_SECONDS="3",
    )
    assert time.monotonic() - start < 13
    check, tests, throughput = run.stdout.strip().splitlines()[-3:]
    assert check.startswith("| check | 0 | ") and tests.startswith("| tests | 124: stopped after ")
    assert throughput == "| throughput | skipped: under 3 s of BUDGET left | 0 |"
