"""Protocol I and II in miniature on the shapes world's shipped UNet, at CI size: the run
clears stated bars on seen and on unseen categories and on two-object images; its head, exported,
segments rendered scenes through the Python API (and runs the README's example); and a segmenter
trained only on what the head labelled segments unseen categories of rendered scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, doc_blocks, run_cli
from grounded_diffusion.data.vocabulary import CategorySplit
from world_runs import run_protocol1_ci

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`

PROTOCOL2 = REPO / "experiments" / "protocol2"

# A CI-sized Protocol I run on the shipped models (experiments/shapes.yaml, fewer samples and
# steps): the bars it must clear, in mIoU points, on seen and on unseen categories.
# Measured (torch 2.14.1): 51.6, 46.5 (seed 0, the test's); 45.6, 44.2 with --seed_everything 1;
# 52.4, 53.4 with 2.
SEEN_MARGIN_OVER_DAAM, UNSEEN_MARGIN_OVER_FOREGROUND = 30.0, 20.0
# The mean of the three two-object groups, where the head must tell the objects apart by their
# names. The head first learns where the objects are and only later which is which: at 400 steps
# this run scored 28.6 (both objects nearly one mask; an earlier torch), at 800 47.2; 43.3 with
# seed 1, 53.4 with 2 (torch 2.14.1).
TWO_OBJECT_MIOU_BAR = 38.0
# Of the pixels the head predicts for an object of a two-object image, the share on the other
# object (all groups): about 50 when both objects get one mask, the bug this bar is for. Measured
# 19.4 (seed 0), 24.2 (seed 1), 18.8 (seed 2) with torch 2.14.1; with an earlier torch and training
# order, 40.1 at 400 steps, and 37.7 with the visual tokens unnormalised (400 steps).
ON_OTHER_OBJECT_BAR = 33.0


@pytest.fixture(scope="module")
def protocol1_run(tmp_path_factory) -> Path:
    return run_protocol1_ci(tmp_path_factory.mktemp("shapes"))


def test_protocol1_in_miniature_beats_daam_on_seen_and_all_foreground_on_unseen(protocol1_run):
    ours = json.loads((protocol1_run / "report" / "metrics.json").read_text())
    baselines = ours["baselines"]
    assert ours["seen_miou"] >= baselines["daam"]["seen_miou"] + SEEN_MARGIN_OVER_DAAM
    assert ours["unseen_miou"] >= baselines["all_foreground"]["unseen_miou"] + UNSEEN_MARGIN_OVER_FOREGROUND


def test_protocol1_in_miniature_tells_the_two_objects_of_an_image_apart(protocol1_run):
    groups = json.loads((protocol1_run / "report" / "metrics.json").read_text())["groups"]["ours"]
    two_objects = [groups[g]["miou"] for g in ("two_seen", "two_seen_unseen", "two_unseen")]
    assert np.mean(two_objects) >= TWO_OBJECT_MIOU_BAR
    assert groups["all"]["on_other_object"] <= ON_OTHER_OBJECT_BAR


# The CI head, exported, segments rendered scenes through GroundedGenerator.segment (the real-image
# path; `python -m grounded_diffusion.shapes_world --segment HEAD`): mIoU (%) over 200 scenes of seed 3.
# The quickstart's head scores 70.6 / 70.1 (seen / unseen, README and docs/generation.md); the CI head, trained on a
# third of its data for 800 steps, scored 67.8 / 63.8 (torch 2.14.1); a run elsewhere may fall
# this many points below.
SEGMENT_MEASURED, SEGMENT_TOLERANCE = {"seen_miou": 67.8, "unseen_miou": 63.8}, 10.0


def test_the_exported_head_segments_rendered_scenes_and_runs_the_readme_example(
    protocol1_run, tmp_path, monkeypatch
):
    from grounded_diffusion.api import GroundedGenerator
    from grounded_diffusion.shapes_world.diagnostics import segment_scores

    head = tmp_path / "outputs" / "shapes" / "head"  # where `make quickstart` exports its head
    run_cli(["export", "--ckpt_path", str(protocol1_run / "checkpoints" / "last.ckpt"), "--out", str(head)])
    scores = segment_scores(
        GroundedGenerator.from_pretrained(head, device="cpu"),
        CategorySplit.named("shapes", 1),
        progress=False,
    )
    for key, measured in SEGMENT_MEASURED.items():
        assert scores[key] >= measured - SEGMENT_TOLERANCE, (key, scores)

    monkeypatch.chdir(tmp_path)
    (example,) = doc_blocks("## Python API and demo page", "python")
    assert doc_blocks("# Python API and demo page", "python", "docs/generation.md") == [
        example
    ]  # the guide shows the same
    exec(compile(example, "README.md (Python API)", "exec"), {})
    assert (tmp_path / "grounded.png").is_file() and (tmp_path / "scene.png").is_file()
    coco = json.loads((tmp_path / "outputs" / "grounded" / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["blue cross", "yellow square"] and len(
        coco["annotations"]
    ) == 2


# A CI-sized Protocol II run (experiments/protocol2/shapes_*.yaml, fewer images and steps): the
# CI head labels a synthetic set over all 20 categories, a segmenter learns from it alone, and
# must segment rendered scenes, the 5 unseen categories as well as the seen ones, at least this
# well (mIoU %); one trained on real scenes of the seen categories scores 0 on the unseen (README).
# 128 images are far from `make protocol2`'s 1,000 (seed 0: 60.2 / 61.8), hence the low bar. At
# 500 steps the unseen mIoU was 13.9 with the head before the token LayerNorm and 6.3 with this
# one: too few steps for a stable figure.
P2_MIOU_BAR = 7.0  # measured: seen 24.3, unseen 22.8 (poly decay; 17.7 / 15.6 with a constant lr)


def test_protocol2_in_miniature_segments_unseen_categories_of_rendered_scenes(protocol1_run, tmp_path):
    synthetic, segmenter = tmp_path / "synthetic", tmp_path / "segmenter"
    quiet = ["--trainer.enable_progress_bar", "false"]
    run_cli(
        [
            "predict",
            "--config",
            str(PROTOCOL2 / "shapes_build.yaml"),
            "--ckpt_path",
            str(protocol1_run / "checkpoints" / "last.ckpt"),
            "--data.init_args.prompts.init_args.counts",
            "{train: {one_seen: 64, two_seen: 64}}",
            "--trainer.default_root_dir",
            str(synthetic),
            *quiet,
        ]
    )
    train = [
        {
            "class_path": "grounded_diffusion.data.segmentation_sets.FolderSegmentationSet",
            "init_args": {"root": str(synthetic)},
        }
    ]
    args = [
        "--config",
        str(PROTOCOL2 / "shapes_segmenter.yaml"),
        "--data.init_args.train",
        json.dumps(train),
        "--data.init_args.val.init_args.count",
        "32",
        "--data.init_args.test.init_args.count",
        "200",
        "--data.init_args.batch_size",
        "8",
        "--trainer.max_steps",
        "1000",
        "--trainer.val_check_interval",
        "1000",
        "--trainer.default_root_dir",
        str(segmenter),
        "--trainer.logger",
        "false",
        *quiet,
    ]
    run_cli(["fit", *args])
    run_cli(["test", *args, "--ckpt_path", "last", "--verbose", "false"])
    report = json.loads((segmenter / "zs3" / "report.json").read_text())
    assert report["trained_on"] == ["synthetic (mixture)"] and report["num_unseen"] == 5
    assert report["seen_miou"] >= P2_MIOU_BAR and report["unseen_miou"] >= P2_MIOU_BAR
