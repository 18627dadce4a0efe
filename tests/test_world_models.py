"""The shapes worlds' shipped models: they load through ``from_pretrained``, each text-to-image
model (the UNets and the MM-DiT) draws what its prompts name as often as the results say
(docs/results.md), each oracle segments held-out rendered scenes as well as they say, the wide
world's text space puts a held-out colour word among its hue neighbours, and DAAM behaves as the
results explain. The CI-sized Protocol I and II runs on them are in test_world_protocol1.py,
test_world_held_out_word.py and test_world_mmdit.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.models.oracle import SegmenterOracle
from grounded_diffusion.shapes_world.models import WORLD_MODELS
from grounded_diffusion.shapes_world.render import render_shapes_scene, world_categories
from world_runs import FOUND_TOLERANCE

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`

# The guides' figures (`make world`, `make world-wide`), and how far a run on another machine may
# fall below them: the oracle's mIoU (%) over the world's categories on 200 scenes of seed 3, and
# the found rate over 40 images (8 per group, prompt seed 1; unseen groups from the world's split).
WORLD_FIGURES = {
    "shapes": {"oracle_miou": 93.4, "found_rate": 0.575, "split": 1},
    "shapes_wide": {"oracle_miou": 84.7, "found_rate": 0.60, "split": "word_green"},
}
ORACLE_TOLERANCE = 2.0


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


# The shapes world's MM-DiT (SD3's layout, rectified flow, `make world-dit`) draws the named
# objects: found rate over 40 images as above, 0.725 measured (with 50 per group: 64 / 84 / 50 /
# 58 / 36 %).
DIT_FOUND_RATE = 0.725


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
