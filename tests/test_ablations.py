"""Ablation grids without a W&B server (the launcher), and the W&B sweep files."""

import csv
import json

import pytest
import torch
import yaml

from conftest import REPO
from grounded_diffusion import launch
from grounded_diffusion.cli import main

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
GRIDS = sorted((REPO / "experiments" / "ablations").glob("*.grid.yaml"))


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_sweeps_drive_lightning_fit_with_every_value(sweep, capsys, monkeypatch):
    spec = yaml.safe_load(sweep.read_text())
    assert spec["program"] == "lightning" and spec["command"][1:3] == ["lightning", "fit"]
    assert spec["metric"]["name"] == "val/harmonic_miou"  # logged by GroundingModule
    ((name, values),) = spec["parameters"].items()
    monkeypatch.chdir(REPO)
    for value in values["values"]:
        # What `wandb agent` runs: ${env} dropped, ${args} -> --name=value.
        args = [a for a in spec["command"][2:] if a != "${args}"] + [f"--{name}={str(value).lower()}"]
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--print_config"])
        assert exit_info.value.code in (None, 0)
        assert f"{name.split('.')[-1]}: {str(value).lower()}" in capsys.readouterr().out


@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: p.stem)
def test_grids_name_real_configs(grid, capsys):
    spec = launch.load_grid(grid)
    launch.main([str(grid), "--dry-run", "--gpus", "0,1", "--out", "/nonexistent/dry-run"])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(spec["values"]) * len(spec.get("seeds") or [None]) * len(spec["stages"])
    assert all("--trainer.devices=1" in line for line in printed)  # one run per GPU
    for stage in spec["stages"]:
        assert (REPO / stage[2]).exists()


def small_run_config(tmp_path):
    """An overlay that makes every stage of a grid run in seconds."""
    small = tmp_path / "small.yaml"
    small.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "init_args": {
                        "source": {"init_args": {"counts": {"train": 16, "val": 4, "test": 6}}},
                        "batch_size": 4,
                    }
                },
                "trainer": {"max_steps": 2, "val_check_interval": 2, "enable_progress_bar": False},
            }
        )
    )
    return small


def test_launcher_runs_a_grid_and_tabulates_it(tmp_path):
    small = small_run_config(tmp_path)
    grid = tmp_path / "zero.grid.yaml"
    # The zero-mask setting leaves the triplets alone: both values share one cache (as the shapes
    # grid does), so the second value's predict finds every sample built.
    scenes, cache = str(REPO / "experiments/scenes.yaml"), f"--data.init_args.cache_dir={tmp_path / 'cache'}"
    grid.write_text(
        yaml.safe_dump(
            {
                "name": "zero_masks_smoke",
                "parameter": "model.init_args.ignore_zero_masks",
                "values": [False, True],
                "stages": [
                    ["predict", "--config", scenes, cache],
                    ["fit", "--config", scenes, cache],
                    ["test", "--config", scenes, cache, "--ckpt_path", "last"],
                ],
            }
        )
    )
    out = tmp_path / "out"
    launch.main([str(grid), "--config", str(small), "--out", str(out)])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["value"] for r in rows] == ["False", "True"] and [r["x"] for r in rows] == ["0.0", "1.0"]
    assert all(
        float(r["seen_miou"]) >= 0 and float(r["daam_two_seen"]) > 0 for r in rows
    )  # DAAM from the cache
    for row in rows:  # the baselines' per-category figures, as the test report gives them
        report = launch.value_dir(out, row["value"]) / "report/metrics.json"
        baselines = json.loads(report.read_text())["baselines"]
        foreground, daam = baselines["all_foreground"], baselines["daam"]
        assert float(row["all_foreground_unseen_miou"]) == pytest.approx(foreground["unseen_miou"])
        assert float(row["daam_seen_miou"]) == pytest.approx(daam["seen_miou"]) and daam["seen_miou"] > 0
    assert "| False | 0.00 |" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0
    launch.main([str(grid), "--config", str(small), "--out", str(out)])  # finished values are kept


def test_launcher_runs_each_value_once_per_seed_on_one_synthesis(tmp_path):
    small = small_run_config(tmp_path)
    scenes, cache = str(REPO / "experiments/scenes.yaml"), "--data.init_args.cache_dir={value_dir}/cache"
    grid = tmp_path / "seeded.grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "name": "seeded_smoke",
                "parameter": "model.init_args.ignore_zero_masks",
                "values": [True],
                "seeds": [0, 1],
                "stages": [
                    ["predict", "--config", scenes, cache],
                    ["fit", "--config", scenes, cache],
                    ["test", "--config", scenes, cache, "--ckpt_path", "last"],
                ],
            }
        )
    )
    out = tmp_path / "out"
    launch.main(
        [str(grid), "--config", str(small), "--out", str(out), "--seeds", "0"]
    )  # the command line's seeds win
    assert not (out / "True" / "seed1").exists()

    def cache_files():
        # (the build's lock file is rewritten by every predict run: it names the run, not the cache)
        return {
            f: f.stat().st_mtime_ns
            for f in (out / "True" / "cache").rglob("*")
            if f.is_file() and f.name != ".lock"
        }

    built = cache_files()
    assert built and (out / "True" / "seed0" / "report" / "metrics.json").exists()

    launch.main([str(grid), "--config", str(small), "--out", str(out)])  # seed 0 kept, seed 1 runs
    assert cache_files() == built  # one synthesis
    heads = [
        torch.load(out / "True" / f"seed{seed}" / "checkpoints" / "last.ckpt", weights_only=True)[
            "state_dict"
        ]
        for seed in (0, 1)
    ]
    name = next(k for k in heads[0] if k.startswith("head.") and k.endswith("weight"))
    assert not torch.equal(heads[0][name], heads[1][name])  # another seed, another initial head
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["value"], r["seed"]) for r in rows] == [("True", "0"), ("True", "1")]
    mean = sum(float(r["seen_miou"]) for r in rows) / 2
    text = (out / "results.md").read_text()
    assert f"| True | 2 | {mean:.2f} ± " in text and "| True | 1 |" in text  # the mean row, then each run


def test_the_shapes_seen_count_grid_runs_nested_splits_of_the_world():
    from grounded_diffusion.data.vocabulary import CategorySplit

    spec = launch.load_grid(REPO / "experiments" / "ablations" / "shapes_seen_counts.grid.yaml")
    assert spec["parameter"] == "data.init_args.split"
    splits = [CategorySplit.named("shapes", value) for value in spec["values"]]
    assert [len(s.seen) for s in splits] == [launch.numeric(v) for v in spec["values"]] == [5, 10, 15]
    assert all(set(a.seen) < set(b.seen) for a, b in zip(splits, splits[1:]))
    assert set(splits[-1].unseen) == set(
        CategorySplit.named("shapes", 1).unseen
    )  # 15 seen: split 1, the quickstart's
