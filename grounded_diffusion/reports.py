"""Paper Tab. 1 and Tab. 2 from test runs.

Tab. 1 (Protocol I): one row per method, one column per group, splits averaged::

    python -m grounded_diffusion.reports --name PASCAL-sim --out outputs/table1_pascal \
        outputs/pascal_split1/report/metrics.json outputs/pascal_split2/report/metrics.json \
        outputs/pascal_split3/report/metrics.json

writes ``report.json`` and ``report.md`` (per split and the average over splits, ours vs the
training-free baseline of the runs' backbone (DAAM, or joint attention on a diffusion transformer),
class-averaged mIoU, with the baseline's own image-noun mIoU alongside).

Tab. 2 (Protocol II, ZS3 on real images): one row per segmenter run, the training data it saw
(real images of seen classes, synthetic one / two / mixture), then seen / unseen / harmonic mIoU
per dataset::

    python -m grounded_diffusion.reports --table 2 --out outputs/table2 \
        outputs/protocol2/voc_synthetic/zs3/report.json outputs/protocol2/voc_mixture/zs3/report.json

Runs of one segmenter on the same training data (fits with other ``--seed_everything``) make one
row, with the mean ± standard deviation over them; every run is listed below it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

from grounded_diffusion.data.prompts import GROUPS

GROUP_TITLES = ("one: seen", "one: unseen", "two: seen", "two: seen+unseen", "two: unseen")
TRIVIAL = ("all_foreground", "all_background")  # the predictors every method must beat


# The training-free baselines: the key that their maps (in caches) and scores (in metrics.json,
# W&B, the launcher's tables) carry, and their name in reports.
TRAINING_FREE = {
    "daam": "DAAM",
    "joint_attention": "joint attention",
    "concept_attention": "ConceptAttention",
}
# Before baselines were keyed by method, every backbone's sat under this key.
LEGACY_BASELINE = "daam"
# A baseline variant scored by the argmax over its concepts (ConceptAttention) rather than a τ.
ARGMAX = "argmax"


def table1_results(table: dict, thresholds: dict[str, dict[str, float]]) -> dict:
    """A test's Tab. 1 results (``metrics.json``) from ``GroupedIoU.compute``'s table: ours over
    the whole set, the baselines, the groups of ours and of each training-free method, and each
    method at the τ of its grid with the best seen mIoU (``tuned``). ``thresholds``: per method,
    its scored variants, the configured τ first (``{"daam": {"daam": 0.4, "daam@0.2": 0.2, ...}}``;
    a variant of τ ``ARGMAX`` is the method's argmax scoring, reported under ``argmax``)."""
    methods = list(thresholds)
    results = {
        **table["ours"]["all"],
        "training_free": methods,
        "baselines": {m: table[m]["all"] for m in (*methods, *TRIVIAL)},
        "groups": {m: table[m] for m in ("ours", *methods)},
        "thresholds": {m: variants[m] for m, variants in thresholds.items()},
        "tuned": {},
        "argmax": {},
    }
    for method, variants in thresholds.items():
        for key in (k for k, t in variants.items() if t == ARGMAX):
            results["baselines"][key] = table[key]["all"]
            results["argmax"][method] = {"groups": table[key]}
        grid = {t: table[k]["all"]["seen_miou"] for k, t in variants.items() if k != method and t != ARGMAX}
        finite = {t: v for t, v in grid.items() if not math.isnan(v)}
        if finite:  # τ chosen on seen categories only, then reported on every group
            best = max(finite, key=finite.get)
            results["tuned"][method] = {
                "threshold": best,
                "seen_miou_by_threshold": grid,
                "groups": table[f"{method}@{best:g}"],
            }
    return results


def upgrade_metrics(metrics: dict, path: str | Path) -> dict:
    """A test's metrics.json as this version writes it. Files from before baselines were keyed by
    method hold the baseline under ``daam`` whatever the backbone: read so, with a one-line notice."""
    if "training_free" in metrics or LEGACY_BASELINE not in metrics.get("groups", {}):
        return metrics
    print(
        f"note: {path} is from before baselines were named by method: its '{LEGACY_BASELINE}' entries "
        "are read as the training-free baseline (joint attention on a diffusion transformer); "
        "rerun its `test` to rewrite it",
        file=sys.stderr,
    )

    def upgrade(results: dict) -> dict:
        results = dict(results)
        results["training_free"] = [LEGACY_BASELINE]
        results["thresholds"] = {LEGACY_BASELINE: results.pop("daam_threshold", None)}
        tuned = results.pop("daam_tuned", None)
        results["tuned"] = {LEGACY_BASELINE: tuned} if tuned else {}
        results["argmax"] = {}
        return results

    upgraded = upgrade(metrics)
    if "unfiltered" in upgraded:
        upgraded["unfiltered"] = upgrade(upgraded["unfiltered"])
    return upgraded


def read_metrics(path: str | Path) -> dict:
    """A test run's ``report/metrics.json``, in this version's keys (``upgrade_metrics``)."""
    return upgrade_metrics(json.loads(Path(path).read_text()), path)


def pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def spread(numbers: list[float]) -> tuple[float | None, float | None]:
    """The mean and the sample standard deviation (None with fewer than two numbers)."""
    mean_value = statistics.fmean(numbers) if numbers else None
    return mean_value, statistics.stdev(numbers) if len(numbers) > 1 else None


def mean_sd(mean_value: float | None, sd: float | None) -> str:
    """ "12.34 ± 0.56", "12.34" without a spread, "–" without a mean."""
    return pct(mean_value) + (f" ± {sd:.2f}" if mean_value is not None and sd is not None else "")


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A markdown table; floats with two decimals, missing values (None, NaN) as "–"."""
    cell = lambda v: pct(v) if v is None or isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def table1_header(first: str = "method") -> str:
    return f"| {first} | " + " | ".join(GROUP_TITLES) + " |"


def table1_rule() -> str:
    return "|---" * (len(GROUPS) + 1) + "|"


def table1_row(name: str, values: list[float | None]) -> str:
    return f"| {name} | " + " | ".join(pct(v) for v in values) + " |"


def mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


TABLE1_METRICS = ("miou", "image_noun_miou", "on_other_object")


def table1(name: str, runs: dict[str, dict]) -> dict:
    """{method: {split: {group: {miou, image_noun_miou, on_other_object}}}} plus the mean over
    splits (on_other_object: None for runs scored before it existed), for ours and each
    training-free method that every split's run scored."""
    report: dict = {"name": name, "groups": list(GROUPS), "methods": {}}
    scored = [run.get("training_free", [LEGACY_BASELINE]) for run in runs.values()]
    training_free = [m for m in scored[0] if all(m in methods for methods in scored)]
    for method in ("ours", *training_free):
        per_split = {
            split: {g: {k: run["groups"][method][g].get(k) for k in TABLE1_METRICS} for g in GROUPS}
            for split, run in runs.items()
        }
        average = {
            g: {k: mean([per_split[s][g][k] for s in per_split]) for k in TABLE1_METRICS} for g in GROUPS
        }
        report["methods"][method] = {"splits": per_split, "mean": average}
    return report


def method_label(method: str) -> str:
    """A method's name in reports: "ours", "DAAM", "joint attention", ..."""
    return TRAINING_FREE.get(method, method)


def markdown(report: dict) -> str:
    name = report["name"]
    methods = list(report["methods"])

    def mean_table(title: str, metric: str) -> list[str]:
        lines = [title, "", table1_header("test set"), table1_rule()]
        for method in methods:
            average = report["methods"][method]["mean"]
            lines.append(table1_row(f"{name}, {method_label(method)}", [average[g][metric] for g in GROUPS]))
        return lines

    lines = [f"# {name}: Protocol I (paper Tab. 1)", ""]
    lines += mean_table("Class-averaged mIoU (%), mean over splits:", "miou")
    lines += [
        "",
        *mean_table("Predicted pixels on the other named object (%), mean over splits:", "on_other_object"),
    ]
    lines += ["", "Per split (class-averaged mIoU; each method's own image-noun mIoU in parentheses):", ""]
    lines += [table1_header("split, method"), table1_rule()]
    for method in methods:
        for split, groups in report["methods"][method]["splits"].items():
            cells = [f"{pct(groups[g]['miou'])} ({pct(groups[g]['image_noun_miou'])})" for g in GROUPS]
            lines.append(f"| {split}, {method_label(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


DATASETS = {"pascal": "PASCAL VOC", "coco": "COCO", "shapes": "shapes world"}


ZS3_METRICS = ("seen_miou", "unseen_miou", "harmonic_miou")
TRAINING = ("architecture", "real_seen", "real_all", "synthetic")  # what makes a Tab. 2 row


def table2(rows: list[dict]) -> dict:
    """ZS3 runs (each a ``ZS3Report`` report.json) grouped by dataset, in the given order, and
    per dataset the Tab. 2 rows: runs of one segmenter on the same training data, averaged."""
    datasets: dict[str, list[dict]] = {}
    for row in rows:
        datasets.setdefault(DATASETS.get(row["vocabulary"], row["vocabulary"]), []).append(row)
    return {
        "table": 2,
        "datasets": datasets,
        "rows": {name: table2_rows(runs) for name, runs in datasets.items()},
    }


def table2_rows(runs: list[dict]) -> list[dict]:
    """One row per segmenter and training data, in the order first seen: the number of runs, and
    per metric the mean and standard deviation over them."""
    same_training: dict[tuple, list[dict]] = {}
    for run in runs:
        same_training.setdefault(tuple(run.get(k) for k in TRAINING), []).append(run)
    rows = []
    for group in same_training.values():
        # The run folders of one row differ by their seed only (make protocol2 SEEDS=...: <row>_seed<N>).
        row = {
            "name": re.sub(r"[_-]seed\d+$", "", group[0]["name"]),
            "runs": len(group),
            **{k: group[0].get(k) for k in TRAINING},
        }
        for metric in ZS3_METRICS:
            row[metric], row[f"{metric}_sd"] = spread([run[metric] for run in group])
        rows.append(row)
    return rows


def real_cell(row: dict, num_classes: int) -> str:
    """Tab. 2's real-images column: ✓ (seen classes only), all N (fully supervised) or ✗."""
    if row.get("real_all"):
        return f"all {num_classes}"
    return "✓" if row["real_seen"] else "✗"


def table2_markdown(report: dict) -> str:
    lines = ["# Protocol II: zero-shot segmentation of real images (paper Tab. 2)", ""]
    for dataset, runs in report["datasets"].items():
        first = runs[0]
        seen, unseen = first["num_seen"], first["num_unseen"]
        columns = [
            "run",
            "segmenter",
            f"Real / {seen}",
            f"Synthetic / {seen}+{unseen} (# objects)",
            "seen",
            "unseen",
            "harmonic",
        ]

        def training(r: dict) -> list:
            return [r["name"], r["architecture"], real_cell(r, seen + unseen), r["synthetic"] or "✗"]

        background = (
            "background ignored" if first.get("background") == "ignore" else "background counted as seen"
        )
        lines += [f"## {dataset} (mIoU %, {background}; unseen: {', '.join(first['unseen'])})", ""]
        each_run = markdown_table(columns, [training(r) + [r[m] for m in ZS3_METRICS] for r in runs])
        rows = report["rows"][dataset]
        if all(row["runs"] == 1 for row in rows):
            lines += [each_run, ""]
            continue
        means = [training(r) + [r["runs"]] + [mean_sd(r[m], r[f"{m}_sd"]) for m in ZS3_METRICS] for r in rows]
        lines += ["Mean ± standard deviation over the runs of each row (seeds):", ""]
        lines += [
            markdown_table(columns[:4] + ["runs"] + columns[4:], means),
            "",
            "Each run:",
            "",
            each_run,
            "",
        ]
    return "\n".join(lines)


def write_report(out: str | Path, report: dict, text: str) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(text)
    return out / "report.json"


# What each table reads, and a key only that file has.
TABLE_INPUTS = {
    1: ("metrics.json of a Protocol I test run (<run>/report/metrics.json)", "groups"),
    2: ("report.json of a Protocol II test run (<run>/zs3/report.json)", "architecture"),
}


def read_run(path: str, table: int) -> dict:
    """One run's results, or exit with one line saying what is wrong with the file."""
    wanted, key = TABLE_INPUTS[table]
    try:
        run = json.loads(Path(path).read_text())
    except FileNotFoundError:
        sys.exit(f"error: {path} does not exist; --table {table} reads the {wanted}")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        sys.exit(f"error: {path} is not a JSON file ({error}); --table {table} reads the {wanted}")
    if not isinstance(run, dict) or key not in run:
        other = 3 - table
        if isinstance(run, dict) and TABLE_INPUTS[other][1] in run:
            sys.exit(f"error: {path} is the input of --table {other}, not the {wanted}")
        sys.exit(f"error: {path} is not the {wanted} (or it is from an older version: rerun its `test`)")
    return upgrade_metrics(run, path) if table == 1 else run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "metrics",
        nargs="+",
        help="Tab. 1: metrics.json of each split's test run, in split order; "
        "Tab. 2: report.json of each ZS3 run, in row order",
    )
    parser.add_argument("--table", type=int, choices=(1, 2), default=1)
    parser.add_argument("--name", default="PASCAL-sim", help="Tab. 1: the test set's name")
    parser.add_argument("--out", required=True, help="folder for report.json and report.md")
    args = parser.parse_args(argv)
    runs = [read_run(p, args.table) for p in args.metrics]
    if args.table == 2:
        report = table2(runs)
        text = table2_markdown(report)
        print(text)
        print(f"report: {write_report(args.out, report, text)}")
        return
    report = table1(args.name, {f"split {number}": run for number, run in enumerate(runs, 1)})
    text = markdown(report)
    print(text)
    print(f"report: {write_report(args.out, report, text)}")


if __name__ == "__main__":
    main()
