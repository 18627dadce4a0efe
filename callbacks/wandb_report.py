"""Evaluation to W&B (tables and mask overlays) and, for offline users, the same on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from callbacks.evaluation_report import overlay_strip, sample_masks
from grounded_diffusion.data.prompts import GROUPS
from grounded_diffusion.reports import markdown_table


def label_map(masks: np.ndarray) -> np.ndarray:
    """Object masks [O, H, W] -> one label image (0 = background, k + 1 = object k)."""
    labels = np.zeros(masks.shape[1:], dtype=np.uint8)
    for k, mask in enumerate(masks):
        labels[mask] = k + 1
    return labels


class WandbEvaluation(Callback):
    """At each validation: per-category IoU (seen / unseen) as a table and mask overlays of the
    first ``num_overlays`` validation samples (the same ones every time). After ``test``: the
    per-category table (ours, DAAM, trivial predictors) and the DAAM comparison per Table-1 group.

    Everything goes to the run's ``WandbLogger`` if there is one (rank zero only; the metrics
    themselves are computed on every rank by the module), and to ``out_dir`` as PNG + markdown.
    """

    def __init__(self, out_dir: str = "outputs/evaluation", num_overlays: int = 8) -> None:
        self.out_dir, self.num_overlays = Path(out_dir), num_overlays
        self.samples: list[tuple] = []

    @staticmethod
    def _wandb(trainer: Trainer) -> WandbLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.samples = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        names = pl_module.category_split.categories
        for i in range(min(len(batch["id"]), self.num_overlays - len(self.samples))):
            self.samples.append((batch["id"][i], batch["prompt"][i], *sample_masks(batch, outputs, i, names)))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        results, unseen = pl_module.results["val"], set(pl_module.category_split.unseen)
        rows = [[c, "unseen" if c in unseen else "seen", v] for c, v in results["per_category"].items()]
        folder = self.out_dir / f"val-step{trainer.global_step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        summary = [[k, results[k]] for k in ("seen_miou", "unseen_miou", "harmonic_miou")]
        (folder / "report.md").write_text(
            f"# Validation at step {trainer.global_step}\n\n{markdown_table(['metric', 'value'], summary)}\n\n"
            f"{markdown_table(['category', 'split', 'IoU (%)'], rows)}\n"
        )
        for sample_id, _, image, truth, pred, labels in self.samples:
            Image.fromarray(overlay_strip(image, truth, pred)).save(
                folder / f"{sample_id}_{'+'.join(labels)}.png"
            )
        logger = self._wandb(trainer)
        if logger is None:
            return
        import wandb

        images = []
        for _, prompt, image, truth, pred, labels in self.samples:
            classes = {0: "background", **{k + 1: name for k, name in enumerate(labels)}}
            masks = {
                "ground_truth": {"mask_data": label_map(truth), "class_labels": classes},
                "predictions": {"mask_data": label_map(pred), "class_labels": classes},
            }
            images.append(wandb.Image(image, masks=masks, caption=prompt))
        logger.experiment.log(
            {
                "val/per_category": wandb.Table(columns=["category", "split", "iou"], data=rows),
                "val/overlays": images,
                "trainer/global_step": trainer.global_step,
            }
        )

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        results, unseen = pl_module.results["test"], set(pl_module.category_split.unseen)
        methods = ["ours", *results["baselines"]]
        per_category = [
            [
                c,
                "unseen" if c in unseen else "seen",
                v,
                *(results["baselines"][m]["per_category"][c] for m in methods[1:]),
            ]
            for c, v in results["per_category"].items()
        ]
        groups = results["groups"]
        metrics = ("miou", "image_noun_miou", "on_other_object")
        compared = ["ours", *results["training_free"]]
        comparison = [[g, *(groups[m][g][k] for k in metrics for m in compared)] for g in [*GROUPS, "all"]]
        comparison_columns = ["group", *(f"{m} {k}" for k in metrics for m in compared)]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "test.md").write_text(
            f"# Test\n\nOurs vs the training-free baseline per group (%):\n\n{markdown_table(comparison_columns, comparison)}\n\n"
            f"IoU (%) per category:\n\n{markdown_table(['category', 'split', *methods], per_category)}\n"
        )
        logger = self._wandb(trainer)
        if logger is None:
            return
        import wandb

        logger.experiment.log(
            {
                "test/per_category": wandb.Table(columns=["category", "split", *methods], data=per_category),
                "test/baseline_comparison": wandb.Table(columns=comparison_columns, data=comparison),
            }
        )
