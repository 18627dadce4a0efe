"""Run an ablation grid without a W&B server, and tabulate it.

Every value of the grid's parameter runs the grid's stages (e.g. synthesise the training set,
synthesise the test set, fit, test) as CLI subprocesses, one value after another, or one value
per GPU with ``--gpus``. The test metrics of every value are collected into ``results.csv``,
``results.md`` and ``results.png`` (seen and unseen mIoU against the parameter).

With ``seeds`` (a grid key, or ``--seeds``) every value runs once per seed (``--seed_everything``),
in ``<out>/<value>/seed<N>``, and the tables give each value's mean ± standard deviation over its
seeds. ``{value_dir}`` in a stage argument is ``<out>/<value>``, shared by the seeds of a value: a
synthesis cache put there is built by the first seed and found complete by the others.

    python -m grounded_diffusion.launch experiments/ablations/coco_seen_counts.grid.yaml
    python -m grounded_diffusion.launch experiments/ablations/coco_seen_counts.grid.yaml --gpus 0,1,2,3
    python -m grounded_diffusion.launch GRID --config experiments/offline.yaml   # CPU smoke run
    python -m grounded_diffusion.launch GRID --seeds 0 1 2                       # 3 fits a value

A value whose ``report/metrics.json`` exists is not run again (``--force`` reruns it); the
stages resume on their own (a synthesis skips finished samples).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from grounded_diffusion.cli import SUBCOMMANDS
from grounded_diffusion.data.prompts import GROUPS
from grounded_diffusion.errors import ConfigError, UserError
from grounded_diffusion.reports import markdown_table, mean_sd, read_metrics, spread

OURS = ["seen_miou", "unseen_miou", "harmonic_miou"]


def metric_names(training_free: list[str]) -> list[str]:
    """Ours per category, the baselines' (each training-free method, by its key, and the
    all-foreground predictor) per category, then ours and each method per test group (Tab. 1)."""
    return (
        OURS
        + [f"{baseline}_{key}" for baseline in (*training_free, "all_foreground") for key in OURS[:2]]
        + [f"{method}_{group}" for method in ("ours", *training_free) for group in GROUPS]
    )


def training_free_of(rows: list[dict]) -> list[str]:
    """The training-free methods that the runs scored, in the order first met."""
    return list(dict.fromkeys(method for row in rows for method in row["training_free"]))


def load_grid(path: Path) -> dict:
    """The grid file, checked: name, parameter, a list of values, stages as lists of arguments."""
    example = "see experiments/ablations/*.grid.yaml"
    if not path.is_file():
        raise ConfigError(f"Grid file '{path}' does not exist; {example}")
    try:
        grid = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(grid, dict):
        raise ConfigError(f"{path} must be a mapping with name, parameter, values and stages; {example}")
    missing = {"name", "parameter", "values", "stages"} - set(grid)
    if missing:
        raise ConfigError(f"{path} lacks {sorted(missing)}; {example}")
    if not isinstance(grid["values"], list) or not grid["values"]:
        raise ConfigError(f"{path}: values must be a non-empty list, not {grid['values']!r}")
    stages = grid["stages"]
    if not isinstance(stages, list) or not all(
        isinstance(s, list) and s and s[0] in SUBCOMMANDS for s in stages
    ):
        raise ConfigError(
            f"{path}: each stage must be a list starting with one of {SUBCOMMANDS}, e.g. [fit, --config, X.yaml]; got {stages!r}"
        )
    check_seeds(grid.get("seeds"), f"{path}: seeds")
    return grid


def check_seeds(seeds, where: str) -> None:
    if seeds is None:
        return
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(type(s) is int and s >= 0 for s in seeds)
        or len(set(seeds)) < len(seeds)
    ):
        raise ConfigError(
            f"{where} must be a non-empty list of distinct whole numbers >= 0, e.g. [0, 1, 2], not {seeds!r}"
        )


def value_dir(out: Path, value) -> Path:
    return out / slug(value)


def runs(grid: dict, value, out: Path) -> list[tuple[int | None, Path]]:
    """(seed, run folder) of each run of ``value``: one without seeds, else one per seed."""
    if not grid.get("seeds"):
        return [(None, value_dir(out, value))]
    return [(seed, value_dir(out, value) / f"seed{seed}") for seed in grid["seeds"]]


def slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value))


def numeric(value) -> float | None:
    """The number in a grid value (``seen20`` -> 20, ``false`` -> 0), for the plot's x axis."""
    if isinstance(value, bool):
        return float(value)
    found = re.search(r"-?\d+(\.\d+)?", str(value))
    return float(found.group()) if found else None


def commands(
    grid: dict, value, seed: int | None, out: Path, run_dir: Path, configs: list[str], single_device: bool
) -> list[list[str]]:
    extra = [a for c in configs for a in ("--config", c)]
    extra += [f"--{grid['parameter']}={json.dumps(value) if isinstance(value, bool) else value}"]
    extra += [f"--trainer.default_root_dir={run_dir}"] + (
        [f"--seed_everything={seed}"] if seed is not None else []
    )
    if single_device:
        extra += ["--trainer.devices=1", "--trainer.strategy=auto"]
    shared = str(value_dir(out, value))
    return [
        [
            sys.executable,
            "-m",
            "grounded_diffusion",
            *(a.replace("{value_dir}", shared) for a in stage),
            *extra,
        ]
        for stage in grid["stages"]
    ]


def run_value(grid, value, out: Path, configs, gpu: str | None, force: bool, dry_run: bool) -> str:
    """Every run of ``value``, one after another (its seeds may share a synthesis cache)."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    outcomes = []
    for seed, run_dir in runs(grid, value, out):
        name = value if seed is None else f"{value}, seed {seed}"
        if (run_dir / "report" / "metrics.json").exists() and not force:
            outcomes.append(f"{name}: done before, kept")
            continue
        for number, command in enumerate(
            commands(grid, value, seed, out, run_dir, configs, gpu is not None), 1
        ):
            if dry_run:
                print(" ".join(command))
                continue
            log = run_dir / "logs" / f"{number}-{command[3]}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            print(f"[{name}] {command[3]} ... (log: {log})", flush=True)
            with open(log, "w") as handle:
                code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
            if code != 0:
                outcomes.append(
                    f"{name}: FAILED at stage {number} ({' '.join(command[3:])}), exit {code}; see {log}"
                )
                return "\n".join(outcomes)  # its other seeds would fail alike
            print(f"[{name}] {command[3]} done in {time.perf_counter() - started:.0f} s", flush=True)
        outcomes.append(f"{name}: ran")
    return "\n".join(outcomes)


def collect(grid: dict, out: Path) -> list[dict]:
    """One row per finished run: the value, its seed (None without seeds) and its test metrics."""
    rows = []
    for value in grid["values"]:
        for seed, run_dir in runs(grid, value, out):
            path = run_dir / "report" / "metrics.json"
            if not path.exists():
                continue
            metrics = read_metrics(path)
            training_free = metrics.get("training_free", [])
            row = {"value": value, "seed": seed, "x": numeric(value), "training_free": training_free}
            row.update({k: metrics.get(k) for k in OURS})
            for baseline in (*training_free, "all_foreground"):
                for key in OURS[:2]:
                    row[f"{baseline}_{key}"] = metrics.get("baselines", {}).get(baseline, {}).get(key)
            for method in ("ours", *training_free):
                for group in GROUPS:
                    row[f"{method}_{group}"] = (
                        metrics.get("groups", {}).get(method, {}).get(group, {}).get("miou")
                    )
            rows.append(row)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per value (in grid order): the number of seeds and, per metric, the mean and the sample
    standard deviation over them (None with one seed)."""
    summary, names = [], metric_names(training_free_of(rows))
    for value in dict.fromkeys(row["value"] for row in rows):
        runs_of_value = [row for row in rows if row["value"] == value]
        entry = {"value": value, "seeds": len(runs_of_value), "x": runs_of_value[0]["x"]}
        for metric in names:
            entry[metric], entry[f"{metric}_sd"] = spread(
                [row[metric] for row in runs_of_value if row.get(metric) is not None]
            )
        summary.append(entry)
    return summary


def write_results(grid: dict, rows: list[dict], out: Path) -> None:
    seeded, names = bool(grid.get("seeds")), metric_names(training_free_of(rows))
    columns = ["value", *(["seed"] if seeded else []), "x", *names]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    text = markdown_table(columns, [[row.get(c) for c in columns] for row in rows])
    summary = summarise(rows)
    if seeded:
        means = markdown_table(
            ["value", "seeds", *names],
            [[e["value"], e["seeds"], *(mean_sd(e[m], e[f"{m}_sd"]) for m in names)] for e in summary],
        )
        text = f"Mean ± standard deviation over seeds:\n\n{means}\n\nEach run:\n\n{text}"
    (out / "results.md").write_text(f"# {grid['name']}: {grid['parameter']}\n\n{text}\n")
    points = [e for e in summary if e["x"] is not None]
    if points:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        figure, axis = plt.subplots(figsize=(5, 3.5))
        for key, label in (("seen_miou", "seen"), ("unseen_miou", "unseen")):
            means = [e[key] if e[key] is not None else float("nan") for e in points]
            spreads = [e[f"{key}_sd"] or 0.0 for e in points]  # error bars: the seeds' standard deviation
            axis.errorbar([e["x"] for e in points], means, yerr=spreads, fmt="o-", capsize=3, label=label)
        axis.set_xlabel(grid.get("x_label", grid["parameter"]))
        axis.set_ylabel("mIoU (%)")
        axis.set_title(grid["name"])
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / "results.png", dpi=120)
        plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("grid", type=Path, help="a *.grid.yaml file")
    parser.add_argument(
        "--config", action="append", default=[], help="extra config for every stage (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/ablations/<grid name>")
    parser.add_argument(
        "--gpus", default=None, help="comma-separated GPU ids: one grid value per GPU at a time"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run every value once per seed "
        "(replaces the grid's seeds); tables give mean ± standard deviation",
    )
    parser.add_argument("--force", action="store_true", help="rerun values that have results")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid)
        if args.seeds is not None:
            check_seeds(args.seeds, "--seeds")
            grid["seeds"] = args.seeds
    except UserError as error:
        sys.exit(f"error: {error}")
    out = args.out or Path("outputs") / "ablations" / grid["name"]
    out.mkdir(parents=True, exist_ok=True)

    todo: queue.Queue = queue.Queue()
    for value in grid["values"]:
        todo.put(value)
    outcomes: list[str] = []

    def worker(gpu: str | None) -> None:
        while True:
            try:
                value = todo.get_nowait()
            except queue.Empty:
                return
            outcomes.append(run_value(grid, value, out, args.config, gpu, args.force, args.dry_run))

    gpus = args.gpus.split(",") if args.gpus else [None]
    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in gpus]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if args.dry_run:
        return
    rows = collect(grid, out)
    write_results(grid, rows, out)
    print("\n".join(outcomes))
    total = len(grid["values"]) * len(grid.get("seeds") or [None])
    print(f"results: {out / 'results.md'} ({len(rows)}/{total} runs)")
    if any("FAILED" in o for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
