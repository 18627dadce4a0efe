"""Protocol I in miniature on the shapes world's MM-DiT (SD3's layout, rectified flow, `make
world-dit`), at CI size: ours clears bars over the joint-attention baseline and all-foreground."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from world_runs import run_protocol1_ci

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`

# A CI-sized Protocol I run on the MM-DiT (experiments/shapes_dit.yaml). Measured (torch 2.14.1,
# seed 0): ours 39.2 / 42.1 (seen / unseen), joint attention 17.5 / 18.0, all-foreground 8.1 / 7.4;
# training seeds move ours by about 4 points (docs/results.md, "On a diffusion transformer").
DIT_MARGIN_OVER_BASELINE, DIT_UNSEEN_MARGIN_OVER_FOREGROUND = 10.0, 20.0


def test_protocol1_in_miniature_on_the_mmdit_beats_joint_attention_and_all_foreground(tmp_path):
    run = run_protocol1_ci(tmp_path, "--config", str(REPO / "experiments" / "shapes_dit.yaml"))
    ours = json.loads((run / "report" / "metrics.json").read_text())
    cache = json.loads(next(run.glob("cache-*/cache.json")).read_text())
    assert cache["backbone"]["model_id"] == "embedded/shapes-dit" and cache["feature_groups"] == [128] * 4
    baselines = ours["baselines"]
    assert ours["training_free"] == ["joint_attention", "concept_attention"]  # ConceptAttention beside
    for group in ("seen_miou", "unseen_miou"):
        assert ours[group] >= baselines["joint_attention"][group] + DIT_MARGIN_OVER_BASELINE
    assert (
        ours["unseen_miou"] >= baselines["all_foreground"]["unseen_miou"] + DIT_UNSEEN_MARGIN_OVER_FOREGROUND
    )
