"""Run an ablation grid without a W&B server, and tabulate it.

Every value of the grid's parameter runs the grid's stages (e.g. synthesise the training set,
synthesise the test set, fit, test) as CLI subprocesses, one value after another, or one value
per GPU with ``--gpus``. The test metrics of every value are collected into ``results.csv``,
``results.md`` and ``results.png`` (seen and unseen mIoU against the parameter).

    python -m grounded_diffusion.launch experiments/ablations/coco_seen_counts.grid.yaml
    python -m grounded_diffusion.launch experiments/ablations/coco_seen_counts.grid.yaml --gpus 0,1,2,3
    python -m grounded_diffusion.launch GRID --config experiments/offline.yaml   # CPU smoke run

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

from grounded_diffusion.data.prompts import GROUPS
from grounded_diffusion.cli import SUBCOMMANDS
from grounded_diffusion.errors import ConfigError, UserError
from grounded_diffusion.reports import markdown_table

COLUMNS = ["value", "x", "seen_miou", "unseen_miou", "harmonic_miou"] + [
    f"{method}_{group}" for method in ("ours", "daam") for group in GROUPS
]


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
    if not isinstance(stages, list) or not all(isinstance(s, list) and s and s[0] in SUBCOMMANDS for s in stages):
        raise ConfigError(f"{path}: each stage must be a list starting with one of {SUBCOMMANDS}, e.g. [fit, --config, X.yaml]; got {stages!r}")
    return grid


def slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value))


def numeric(value) -> float | None:
    """The number in a grid value (``seen20`` -> 20, ``false`` -> 0), for the plot's x axis."""
    if isinstance(value, bool):
        return float(value)
    found = re.search(r"-?\d+(\.\d+)?", str(value))
    return float(found.group()) if found else None


def commands(grid: dict, value, run_dir: Path, configs: list[str], single_device: bool) -> list[list[str]]:
    extra = [a for c in configs for a in ("--config", c)]
    extra += [f"--{grid['parameter']}={json.dumps(value) if isinstance(value, bool) else value}"]
    extra += [f"--trainer.default_root_dir={run_dir}"]
    if single_device:
        extra += ["--trainer.devices=1", "--trainer.strategy=auto"]
    return [[sys.executable, "-m", "grounded_diffusion", *stage, *extra] for stage in grid["stages"]]


def run_value(grid, value, out: Path, configs, gpu: str | None, force: bool, dry_run: bool) -> str:
    run_dir = out / slug(value)
    if (run_dir / "report" / "metrics.json").exists() and not force:
        return f"{value}: done before, kept"
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    for number, command in enumerate(commands(grid, value, run_dir, configs, gpu is not None), 1):
        if dry_run:
            print(" ".join(command))
            continue
        log = run_dir / "logs" / f"{number}-{command[3]}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        print(f"[{value}] {command[3]} ... (log: {log})", flush=True)
        with open(log, "w") as handle:
            code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        if code != 0:
            return f"{value}: FAILED at stage {number} ({' '.join(command[3:])}), exit {code}; see {log}"
        print(f"[{value}] {command[3]} done in {time.perf_counter() - started:.0f} s", flush=True)
    return f"{value}: ran"


def collect(grid: dict, out: Path) -> list[dict]:
    rows = []
    for value in grid["values"]:
        path = out / slug(value) / "report" / "metrics.json"
        if not path.exists():
            continue
        metrics = json.loads(path.read_text())
        row = {"value": value, "x": numeric(value)}
        row.update({k: metrics.get(k) for k in ("seen_miou", "unseen_miou", "harmonic_miou")})
        for method in ("ours", "daam"):
            for group in GROUPS:
                row[f"{method}_{group}"] = metrics.get("groups", {}).get(method, {}).get(group, {}).get("miou")
        rows.append(row)
    return rows


def write_results(grid: dict, rows: list[dict], out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(COLUMNS, [[row[c] for c in COLUMNS] for row in rows])
    (out / "results.md").write_text(f"# {grid['name']}: {grid['parameter']}\n\n{table}\n")
    points = [r for r in rows if r["x"] is not None]
    if points:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        figure, axis = plt.subplots(figsize=(5, 3.5))
        for key, label in (("seen_miou", "seen"), ("unseen_miou", "unseen")):
            axis.plot([r["x"] for r in points], [r[key] if r[key] is not None else float("nan") for r in points], "o-", label=label)
        axis.set_xlabel(grid.get("x_label", grid["parameter"]))
        axis.set_ylabel("mIoU (%)")
        axis.set_title(grid["name"])
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / "results.png", dpi=120)
        plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="a *.grid.yaml file")
    parser.add_argument("--config", action="append", default=[], help="extra config for every stage (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/ablations/<grid name>")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU ids: one grid value per GPU at a time")
    parser.add_argument("--force", action="store_true", help="rerun values that have results")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid)
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
    print(f"results: {out / 'results.md'} ({len(rows)}/{len(grid['values'])} values)")
    if any("FAILED" in o for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
