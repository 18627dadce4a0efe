"""Writes what a test run found: metrics.json, a per-category table, and overlay pictures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from lightning import Callback, LightningModule, Trainer
from PIL import Image

from grounded_diffusion.data.prompts import GROUPS
from grounded_diffusion.data.voc import PALETTE_RGB
from grounded_diffusion.reports import markdown_table, method_label, table1_header, table1_row, table1_rule


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Tint each object slot's mask with its own colour over an [H, W, 3] uint8 image."""
    out = image.astype(np.float32)
    for k, mask in enumerate(masks):
        out[mask] = (1 - alpha) * out[mask] + alpha * PALETTE_RGB[k + 1]
    return out.astype(np.uint8)


def overlay_strip(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """image | truth overlay | prediction overlay, side by side."""
    return np.concatenate([image, overlay(image, truth), overlay(image, pred)], axis=1)


def sample_masks(batch: dict, preds, i: int, names) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Sample ``i`` of an evaluation batch as numpy: image [H, W, 3] (resized to the masks),
    truth and predicted masks of its objects [O, H, W], and the objects' names."""
    image = batch["image"][i].permute(1, 2, 0).cpu().numpy()
    valid = (batch["categories"][i] >= 0).cpu()
    truth = batch["masks"][i][valid].cpu().numpy()
    pred = preds[i][valid].cpu().numpy()
    if image.shape[:2] != truth.shape[1:]:
        image = np.array(Image.fromarray(image).resize(truth.shape[1:][::-1]))
    return image, truth, pred, [names[c] for c in batch["categories"][i][valid].tolist()]


def format_table(results: dict, unseen: set[str]) -> str:
    def pct(v: float) -> str:
        return "   -  " if v is None or math.isnan(v) else f"{v:6.2f}"

    baselines = results["baselines"]
    names = ["ours", *baselines]
    rows = [f"{'category':<16}{'':8}" + "".join(f"{n:>16}" for n in names)]
    for category, value in results["per_category"].items():
        others = [baselines[b]["per_category"][category] for b in baselines]
        tag = "unseen" if category in unseen else "seen"
        rows.append(f"{category:<16}{tag:<8}" + "".join(f"{pct(v):>16}" for v in [value, *others]))
    for key in ("seen_miou", "unseen_miou", "harmonic_miou"):
        values = [results[key]] + [baselines[b][key] for b in baselines]
        rows.append(f"{key:<24}" + "".join(f"{pct(v):>16}" for v in values))
    return "\n".join(rows)


def format_groups(results: dict, metric: str = "miou") -> str:
    """Paper Tab. 1 for one run: a metric per group (class-averaged mIoU by default), ours vs
    each training-free baseline, by its name (markdown)."""
    rows = [table1_header(), table1_rule()]
    for method in ("ours", *results["training_free"]):
        rows.append(table1_row(method_label(method), [results["groups"][method][g][metric] for g in GROUPS]))
    for method, tuned in results["tuned"].items():
        values = [tuned["groups"][g][metric] for g in GROUPS]
        rows.append(table1_row(f"{method_label(method)} (τ={tuned['threshold']:g}, chosen on seen)", values))
    for method, argmax in results.get("argmax", {}).items():
        values = [argmax["groups"][g][metric] for g in GROUPS]
        rows.append(table1_row(f"{method_label(method)} (argmax over concepts)", values))
    return "\n".join(rows)


def format_other_object(results: dict, top: int = 5) -> str:
    """Per group, the share of an object's predicted pixels on the other object of its image, and
    ours' most confused category pairs (markdown)."""
    text = (
        "Predicted pixels on the other named object (%, images where both objects have a mask; about 50 "
        "when both objects get the same mask, and low too for masks mostly off the objects):\n\n"
        + format_groups(results, "on_other_object")
    )
    pairs = results.get("confused_pairs", [])[:top]
    if pairs:
        rows = [
            [" + ".join(p["pair"]), p["on_other_object"], f"{p['on_other_pixels']} / {p['predicted_pixels']}"]
            for p in pairs
        ]
        columns = ["pair", "on the other object (%)", "pixels on it / predicted"]
        text += f"\n\nOurs, the pairs with the most pixels on the other object:\n\n{markdown_table(columns, rows)}"
    return text


def format_test_filter(results: dict) -> str:
    """How many objects each group scored and dropped, and Tab. 1 without the filter (markdown);
    empty when the test scored every object."""
    if "test_filter" not in results:
        return ""
    counts, min_score = results["test_filter"]["objects"], results["test_filter"]["min_oracle_score"]
    rows = [
        f"Objects scored / dropped (empty oracle mask, or oracle score < {min_score:g}):",
        "",
        table1_header("objects"),
        table1_rule(),
        "| scored / dropped | "
        + " | ".join(f"{counts[g]['scored']} / {counts[g]['dropped']}" for g in GROUPS)
        + " |",
        "",
        "mIoU (%) per group with every object scored (no filter):",
        "",
        format_groups(results["unfiltered"]),
    ]
    return "\n".join(rows)


def to_json(value):
    """NaN (an empty group) becomes null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


class EvaluationReport(Callback):
    """After ``test``: ``<out_dir>/metrics.json`` and ``report.md``, the IoU tables on stdout
    (per category; per Table-1 group, ours vs the training-free baseline), and overlay PNGs (image | truth | prediction)
    of the first ``num_overlays`` test samples of rank zero.

    Metrics are computed on every rank by the module; only rank zero writes.
    """

    def __init__(self, out_dir: str = "outputs/report", num_overlays: int = 8) -> None:
        self.out_dir = Path(out_dir)
        self.num_overlays = num_overlays

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.saved = 0
        if trainer.is_global_zero:
            (self.out_dir / "overlays").mkdir(parents=True, exist_ok=True)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.is_global_zero or self.saved >= self.num_overlays:
            return
        names = pl_module.category_split.categories
        for i in range(min(len(batch["id"]), self.num_overlays - self.saved)):
            image, truth, pred, labels = sample_masks(batch, outputs, i, names)
            strip = overlay_strip(image, truth, pred)
            Image.fromarray(strip).save(
                self.out_dir / "overlays" / f"{batch['id'][i]}_{'+'.join(labels)}.png"
            )
            self.saved += 1

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        results = pl_module.results["test"]
        path = self.out_dir / "metrics.json"
        path.write_text(json.dumps(to_json(results), indent=2))
        per_category = format_table(results, set(pl_module.category_split.unseen))
        groups = format_groups(results)
        test_filter = format_test_filter(results)
        other_object = format_other_object(results)
        (self.out_dir / "report.md").write_text(
            f"# Test results\n\nmIoU (%) per group, class-averaged (paper Tab. 1):\n\n{groups}\n\n"
            + f"{other_object}\n\n"
            + (f"{test_filter}\n\n" if test_filter else "")
            + f"IoU (%) per category:\n\n```\n{per_category}\n```\n"
        )
        print("\nIoU (%) per category, ours vs. the training-free baseline and trivial predictors:")
        print(per_category)
        print("\nmIoU (%) per group (paper Tab. 1):")
        print(groups)
        print("\n" + other_object)
        if test_filter:
            print("\n" + test_filter)
        print(f"\noverlays (image | truth | prediction): {self.out_dir / 'overlays'}")
        print(f"metrics: {path}")
