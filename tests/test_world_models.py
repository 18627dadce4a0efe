"""The shapes worlds' shipped models and Protocols I and II in miniature on them: they load
through ``from_pretrained``, each text-to-image model draws what its prompts name as often as the
guides say (docs/shapes_world.md), each oracle segments held-out rendered scenes as well as they
say, and the wide world's text space puts a held-out colour word among its hue neighbours. A
CI-sized Protocol I run clears stated bars on seen and on unseen categories and on two-object
images, another with a whole word held out ("cross") on the unseen categories, and another on the
world's diffusion transformer (an MM-DiT) against the joint-attention baseline; its head
segments rendered scenes through the Python API (and runs the README's example), and a segmenter
trained only on what its head labelled segments unseen categories of rendered scenes. (A CI-sized
run of the wide world is too small to say anything: with 160 training images over 42 seen
categories, its head scored 9.3 on unseen green objects.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from conftest import REPO, doc_blocks, run_cli
from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.models.oracle import SegmenterOracle
from grounded_diffusion.shapes_world.models import WORLD_MODELS
from grounded_diffusion.shapes_world.render import render_shapes_scene, world_categories

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`

PROTOCOL2 = REPO / "experiments" / "protocol2"

# The guides' figures (`make world`, `make world-wide`), and how far a run on another machine may
# fall below them: the oracle's mIoU (%) over the world's categories on 200 scenes of seed 3, and
# the found rate over 40 images (8 per group, prompt seed 1; unseen groups from the world's split).
WORLD_FIGURES = {
    "shapes": {"oracle_miou": 93.4, "found_rate": 0.575, "split": 1},
    "shapes_wide": {"oracle_miou": 84.7, "found_rate": 0.60, "split": "word_green"},
}
ORACLE_TOLERANCE, FOUND_TOLERANCE = 2.0, 0.15


@pytest.mark.parametrize("world", list(WORLD_FIGURES))
def test_the_oracle_segments_held_out_rendered_scenes(world):
    oracle = SegmenterOracle(WORLD_MODELS[world][1])
    oracle.build()
    scenes = [render_shapes_scene(i, seed=3, world=world) for i in range(200)]
    images = torch.from_numpy(np.stack([s[0] for s in scenes])).permute(0, 3, 1, 2)
    labels = torch.from_numpy(np.stack([s[1] for s in scenes])).long()
    with torch.no_grad():
        predicted = torch.cat(
            [oracle.segmenter.scores(images[i : i + 50].float() / 255).argmax(1) for i in range(0, 200, 50)]
        )
    num_classes = len(world_categories(world)) + 1
    iou = MulticlassJaccardIndex(num_classes=num_classes, average="none")(predicted, labels)
    assert 100 * iou[1:].mean().item() >= WORLD_FIGURES[world]["oracle_miou"] - ORACLE_TOLERANCE


@pytest.mark.parametrize("world", list(WORLD_FIGURES))
def test_the_shipped_model_draws_the_named_objects_at_the_documented_rate(world):
    from grounded_diffusion.models.backbones import load_pipeline
    from grounded_diffusion.shapes_world.diagnostics import found_rates

    model_id, oracle_id, _ = WORLD_MODELS[world]
    pipe = load_pipeline(model_id, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    split = CategorySplit.named(world, WORLD_FIGURES[world]["split"])
    rates = found_rates(pipe, SegmenterOracle(oracle_id), split, per_group=8, seed=1, progress=False)
    assert np.mean(list(rates.values())) >= WORLD_FIGURES[world]["found_rate"] - FOUND_TOLERANCE


# Why a held-out colour word needed the wide world: the unseen (green) category embeddings of the
# shipped models, among the seen ones (`python -m grounded_diffusion.shapes_world --text-space`).
# Measured: in the 20-category world 12-52 % of each lies outside the span of the seen embeddings
# and the nearest seen category of three of five is a yellow one; in the wide world 6-17 %, and the
# nearest is always the teal category of the same shape (its hue neighbour).
WIDE_OUTSIDE_BAR, NARROW_OUTSIDE_BAR = 0.2, 0.5


def test_the_wide_world_puts_a_held_out_colour_among_its_hue_neighbours():
    from grounded_diffusion.models.backbones import BackboneConfig, StableDiffusionBackbone
    from grounded_diffusion.shapes_world.diagnostics import text_space

    def rows(model_id: str, world: str) -> list[dict]:
        split = CategorySplit.named(world, "word_green")
        backbone = StableDiffusionBackbone(BackboneConfig(model_id=model_id, dtype="float32"))
        with torch.no_grad():
            return text_space(backbone.category_embeddings(list(split.categories)), split)

    wide, narrow = (
        rows(WORLD_MODELS["shapes_wide"][0], "shapes_wide"),
        rows(WORLD_MODELS["shapes"][0], "shapes"),
    )
    assert max(r["outside"] for r in wide) <= WIDE_OUTSIDE_BAR < max(r["outside"] for r in narrow)
    assert max(r["outside"] for r in narrow) >= NARROW_OUTSIDE_BAR
    for row in wide:
        assert row["nearest"] == row["category"].replace("green", "teal"), row


def test_daam_of_the_shipped_model_localises_in_its_finest_layers_and_avoids_the_object_in_coarser_ones():
    """Why DAAM is weak in this world (README): on one-object images the 16² layers' maps find the
    object, the 8² layers' maps avoid it (their inverted map finds it), and the mean over all
    layers cancels. Measured with 20 images: 39.9 vs 3.5; 43.9 vs 0.9 (mIoU at τ = 0.6)."""
    from grounded_diffusion.models.backbones import load_pipeline
    from grounded_diffusion.shapes_world.diagnostics import daam_by_resolution

    pipe = load_pipeline("embedded/shapes-sd", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    table = daam_by_resolution(
        pipe, SegmenterOracle(), CategorySplit.named("shapes", 1), per_group=10, seed=1, progress=False
    )
    assert table["16² layers only"]["map > 0.6"] >= table["all layers (DAAM)"]["map > 0.6"] + 15
    assert table["8² layers only"]["inverted > 0.6"] >= table["8² layers only"]["map > 0.6"] + 15


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
CI_STEPS = 800
CI_COUNTS = (
    "{train: {one_seen: 80, two_seen: 80}, val: {one_seen: 8, two_seen: 8}, "
    "test: {one_seen: 16, one_unseen: 16, two_seen: 16, two_seen_unseen: 16, two_unseen: 16}}"
)


def run_protocol1_ci(root: Path, *extra: str) -> Path:
    """predict, fit and test of experiments/shapes.yaml (then the ``extra`` arguments) at CI size
    in ``root``: checkpoints/last.ckpt (the head) and report/metrics.json."""
    args = [
        "--config",
        str(REPO / "experiments" / "shapes.yaml"),
        *extra,
        "--data.init_args.source.init_args.counts",
        CI_COUNTS,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_steps",
        str(CI_STEPS),
        "--trainer.val_check_interval",
        str(CI_STEPS // 2),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
    ]
    run_cli(["predict", *args])
    run_cli(["fit", *args])
    run_cli(["test", *args, "--ckpt_path", "last", "--verbose", "false"])
    return root


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


# The same CI-sized run with a whole shape word held out (split word_cross: the head never meets
# "cross"; docs/shapes_world.md, "Held-out words"). Measured (torch 2.14.1, seed 0): unseen mIoU
# 50.9 against all-foreground 7.5 and DAAM 11.2 (seen 68.3).
HELD_OUT_WORD_MARGIN = 20.0


@pytest.fixture(scope="module")
def held_out_cross_run(tmp_path_factory) -> Path:
    return run_protocol1_ci(tmp_path_factory.mktemp("word_cross"), "--data.init_args.split", "word_cross")


def test_a_head_that_never_met_the_word_cross_segments_crosses(held_out_cross_run):
    ours = json.loads((held_out_cross_run / "report" / "metrics.json").read_text())
    baselines = ours["baselines"]
    assert ours["unseen_miou"] >= baselines["all_foreground"]["unseen_miou"] + HELD_OUT_WORD_MARGIN
    assert ours["unseen_miou"] >= baselines["daam"]["unseen_miou"] + HELD_OUT_WORD_MARGIN


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


# The shapes world's MM-DiT (SD3's layout, rectified flow, `make world-dit`): it draws the named
# objects (found rate over 40 images as above: 0.725 measured; with 50 per group: 64 / 84 / 50 / 58
# / 36 %), and a CI-sized Protocol I run on it (experiments/shapes_dit.yaml) clears bars over the
# joint-attention baseline and over all-foreground. Measured (torch 2.14.1, seed 0): ours 39.2 /
# 42.1 (seen / unseen), joint attention 17.5 / 18.0, all-foreground 8.1 / 7.4; training seeds
# move ours by about 4 points (docs/shapes_world.md, "On a diffusion transformer").
DIT_FOUND_RATE = 0.725
DIT_MARGIN_OVER_BASELINE, DIT_UNSEEN_MARGIN_OVER_FOREGROUND = 10.0, 20.0


def test_the_shipped_mmdit_draws_the_named_objects_at_the_documented_rate():
    from grounded_diffusion.models.backbones import load_pipeline
    from grounded_diffusion.models.embedded import pipeline_options
    from grounded_diffusion.shapes_world.diagnostics import found_rates
    from grounded_diffusion.shapes_world.models import SHAPES_DIT_ID

    pipe = load_pipeline(SHAPES_DIT_ID, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    rates = found_rates(
        pipe,
        SegmenterOracle(WORLD_MODELS["shapes"][1]),
        CategorySplit.named("shapes", 1),
        per_group=8,
        seed=1,
        progress=False,
        options=pipeline_options(SHAPES_DIT_ID),
    )
    assert np.mean(list(rates.values())) >= DIT_FOUND_RATE - FOUND_TOLERANCE


def test_protocol1_in_miniature_on_the_mmdit_beats_joint_attention_and_all_foreground(tmp_path):
    run = run_protocol1_ci(tmp_path, "--config", str(REPO / "experiments" / "shapes_dit.yaml"))
    ours = json.loads((run / "report" / "metrics.json").read_text())
    cache = json.loads(next(run.glob("cache-*/cache.json")).read_text())
    assert cache["backbone"]["model_id"] == "embedded/shapes-dit" and cache["feature_groups"] == [128] * 4
    baselines = ours["baselines"]  # ("daam": the joint-attention baseline in DAAM's place)
    for group in ("seen_miou", "unseen_miou"):
        assert ours[group] >= baselines["daam"][group] + DIT_MARGIN_OVER_BASELINE
    assert (
        ours["unseen_miou"] >= baselines["all_foreground"]["unseen_miou"] + DIT_UNSEEN_MARGIN_OVER_FOREGROUND
    )
