"""benchmarks/gpu_session.sh, the script a lent GPU machine runs: its stages, its table, its errors.
Here without CUDA; the GPU figures themselves come from running it on one."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_session.sh"


def session(*stages: str, wheels: Path, out: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python, "WHEELS_DIR": str(wheels), "OUT": str(out)}
    return subprocess.run(["bash", str(SCRIPT), *stages], env=env, capture_output=True, text=True, timeout=300)


def test_check_stage_imports_every_module_and_ends_with_the_table(tmp_path):
    run = session("check", wheels=tmp_path / "no_wheels", out=tmp_path / "out")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "project modules import" in (tmp_path / "out" / "check.log").read_text()
    table = run.stdout.strip().splitlines()[-3:]
    assert table[0] == "| stage | exit code | seconds |" and table[2].startswith("| check | 0 | ")


def test_unknown_stage_is_refused_before_anything_runs(tmp_path):
    run = session("check", "thruput", wheels=tmp_path, out=tmp_path / "out")
    assert run.returncode == 2
    assert "unknown stage 'thruput' (stages: check tests smoke storage throughput compile" in run.stdout
    assert not (tmp_path / "out").exists()


def test_missing_libraries_without_wheels_name_the_wheels_command(tmp_path):
    bare = tmp_path / "python"  # this interpreter without its site-packages: no diffusers
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    run = session("check", python=str(bare), wheels=tmp_path / "no_wheels", out=tmp_path / "out")
    assert run.returncode == 2
    assert "lacks the project's libraries" in run.stdout and "gpu_session.sh wheels' where pip reaches a registry" in run.stdout
