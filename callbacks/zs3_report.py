"""Writes a Protocol II test run as one row of paper Tab. 2 (report.json + report.md)."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback, LightningModule, Trainer

from grounded_diffusion.data.vocabulary import vocabulary_label
from grounded_diffusion.reports import markdown_table, table2, table2_markdown, write_report


class ZS3Report(Callback):
    """After ``test``: seen / unseen / harmonic mIoU and per-class IoU, with what the segmenter
    was trained on. Combine runs with ``python -m grounded_diffusion.reports --table 2``.

    Args:
        out_dir: folder for report.json and report.md.
        name: the row's name (default: the folder above ``out_dir``).
    """

    def __init__(self, out_dir: str, name: str | None = None) -> None:
        self.out_dir, self.name = Path(out_dir), name

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule, results = trainer.datamodule, pl_module.results["test"]
        trained_on = datamodule.training_sets()
        synthetic = [
            t.removeprefix("synthetic ").strip("()") for t in trained_on if t.startswith("synthetic")
        ]
        # Real images (in the shapes world: rendered scenes) of seen classes only, or of all classes.
        real = [t for t in trained_on if not t.startswith("synthetic")]
        split = datamodule.category_split
        row = {
            "name": self.name or self.out_dir.parent.name,
            "vocabulary": vocabulary_label(datamodule.vocabulary),
            "architecture": pl_module.hparams.architecture,
            "trained_on": trained_on,
            "real_seen": any(t.endswith("(seen only)") for t in real),
            "real_all": any(not t.endswith("(seen only)") for t in real),
            "background": pl_module.hparams.background,
            "synthetic": ", ".join(synthetic),
            "num_seen": len(split.seen),
            "num_unseen": len(split.unseen),
            "unseen": list(split.unseen),
            **results,
        }
        per_class = markdown_table(
            ["class", "", "IoU"],
            [[c, "unseen" if c in split.unseen else "seen", v] for c, v in results["per_category"].items()],
        )
        text = table2_markdown(table2([row])) + "\n" + per_class + "\n"
        path = write_report(self.out_dir, row, text)
        print(text)
        print(f"report: {path}")
