import math

import pytest
import torch

from callbacks.evaluation_report import format_test_filter
from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.models.grounding_head import HeadConfig
from lightning_modules.grounding import GroundingModule

SMALL = HeadConfig(group_channels=[8, 8, 8, 8], embed_dim=16, num_heads=2, ffn_dim=32)


def test_nan_loss_stops_with_the_samples_named():
    module = GroundingModule(head=SMALL)
    module.category_embeds = torch.zeros(3, 64)
    features = [torch.full((1, c, s, s), float("nan")) for c, s in zip([384, 352, 224, 224], [2, 4, 8, 16])]
    batch = {
        "id": ["scene-train-000042"],
        "features": features,
        "masks": torch.ones(1, 2, 16, 16, dtype=torch.bool),
        "categories": torch.tensor([[0, -1]]),
    }
    with pytest.raises(
        FloatingPointError,
        match="the data, not the learning rate: sample scene-train-000042 of the training data holds NaN",
    ):
        module.training_step(batch, 0)
    batch["features"] = [torch.full_like(f, 3e38) for f in features]  # finite inputs, an infinite loss
    with pytest.raises(
        FloatingPointError, match="The learning rate is too high for it .*start the fit again"
    ):
        module.training_step(batch, 0)


def test_unknown_real_image_mode_fails_at_construction():
    with pytest.raises(ValueError, match="real_image_mode 'inversion'"):
        GroundingModule(head=SMALL, real_image_mode="inversion")


def test_a_module_built_in_python_saves_hyperparameters_a_weights_only_load_reads(tmp_path):
    """Its typed configs go into the checkpoint as dicts (a pickled class would stop ``fit
    --ckpt_path`` and ``load_from_checkpoint``) and build the same module again."""
    module = GroundingModule(head=SMALL, lr=3e-4)
    torch.save({"hyper_parameters": dict(module.hparams)}, tmp_path / "hparams.pt")
    saved = torch.load(tmp_path / "hparams.pt", weights_only=True)["hyper_parameters"]
    again = GroundingModule(**saved)
    assert again.head_config == SMALL and again.backbone_config == module.backbone_config
    assert again.hparams.lr == 3e-4


def test_test_filter_drops_empty_and_low_score_oracle_masks_for_every_method(monkeypatch):
    """Hand case, 4-pixel masks; categories a (seen), b (unseen); minimum oracle score 0.7.
    s0 one_seen:        a truth 1100 score .9,  ours 1000 (I1 U2)
    s1 two_seen_unseen: a truth 0000 score 0 (empty), ours 1000 (I0 U1); b truth 0011 score .95, ours 0011 (I2 U2)
    s2 one_unseen:      b truth 1111 score .5 (low), ours 1000 (I1 U4)
    Filtered: a 1/2, b 2/2.  Unfiltered: a 1/3, b 3/6.  All-foreground, filtered: a 2/4, b 2/4."""

    def bits(rows):
        return torch.tensor(
            [[[[int(v) for v in r]] if r else [[0] * 4] for r in s] for s in rows], dtype=torch.bool
        )

    batch = {
        "masks": bits([["1100", ""], ["0000", "0011"], ["1111", ""]]),
        "categories": torch.tensor([[0, -1], [0, 1], [1, -1]]),
        "oracle_scores": torch.tensor([[0.9, 0], [0.0, 0.95], [0.5, 0]]),
        "group": ["one_seen", "two_seen_unseen", "one_unseen"],
    }
    ours = bits([["1000", ""], ["1000", "0011"], ["1000", ""]])

    def test_results(min_score: float | None) -> dict:
        module = GroundingModule(head=SMALL, test_min_oracle_score=min_score)
        module.category_split = CategorySplit(("a", "b", "c"), unseen=("b",))
        module.configure_metrics()
        monkeypatch.setattr(module, "log_dict", lambda *args, **kwargs: None)
        monkeypatch.setattr(module, "_evaluate", lambda batch, stage: ours)
        module.test_step(batch, 0)
        module.on_test_epoch_end()
        return module.results["test"]

    results = test_results(0.7)
    assert (results["seen_miou"], results["unseen_miou"]) == (50, 100)
    assert results["baselines"]["all_foreground"]["per_category"]["a"] == 50
    assert results["baselines"]["all_foreground"]["per_category"]["b"] == 50
    unfiltered = results["unfiltered"]
    assert unfiltered["seen_miou"] == pytest.approx(100 / 3) and unfiltered["unseen_miou"] == 50
    objects = results["test_filter"]["objects"]
    assert objects["one_seen"] == {"scored": 1, "dropped": 0}
    assert objects["two_seen_unseen"] == {"scored": 1, "dropped": 1}
    assert objects["one_unseen"] == {"scored": 0, "dropped": 1}
    assert objects["all"] == {"scored": 2, "dropped": 2}
    assert math.isnan(results["groups"]["ours"]["one_unseen"]["miou"])  # nothing left to score there
    assert results["groups"]["ours"]["two_seen_unseen"]["per_category"]["b"] == 100

    report = format_test_filter(results)
    assert "| scored / dropped | 1 / 0 | 0 / 1 | 0 / 0 | 1 / 1 | 0 / 0 |" in report  # Tab. 1's group order
    assert "oracle score < 0.7" in report

    everything = test_results(None)
    assert "test_filter" not in everything and "unfiltered" not in everything
    assert everything["seen_miou"] == pytest.approx(100 / 3) and everything["unseen_miou"] == 50


@pytest.mark.parametrize("key", ["joint_attention", "daam"])
def test_the_baseline_is_scored_under_its_method_and_an_old_cache_key_is_read_with_a_notice(
    key, monkeypatch, caplog
):
    """A transformer backbone's baseline is joint attention: its maps are scored and reported under
    ``joint_attention``, whether the cache keys them so or, written before the rename, ``daam``.
    Hand case: the maps are ours' masks, so the baseline scores what ours scores (a 50, b 100)."""
    masks = torch.tensor(
        [[[[1, 1, 0, 0]], [[0, 0, 0, 0]]], [[[0, 0, 1, 1]], [[1, 1, 1, 1]]]], dtype=torch.bool
    )
    ours = torch.tensor(
        [[[[1, 0, 0, 0]], [[0, 0, 0, 0]]], [[[0, 0, 1, 1]], [[1, 1, 1, 1]]]], dtype=torch.bool
    )
    batch = {
        "masks": masks,
        "categories": torch.tensor([[0, -1], [1, 2]]),
        "group": ["one_seen", "two_seen_unseen"],
        key: ours.float(),
    }
    module = GroundingModule(head=SMALL, test_min_oracle_score=None)
    monkeypatch.setattr(module.backbone, "baseline_method", "joint_attention")
    module.category_split = CategorySplit(("a", "b", "c"), unseen=("b",))
    module.configure_metrics()
    monkeypatch.setattr(module, "log_dict", lambda *args, **kwargs: None)
    monkeypatch.setattr(module, "_evaluate", lambda batch, stage: ours)
    with caplog.at_level("INFO"):
        module.test_step(batch, 0)
        module.test_step(batch, 1)
    module.on_test_epoch_end()
    results = module.results["test"]
    assert results["training_free"] == ["joint_attention"] and "daam" not in results["groups"]
    baseline = results["baselines"]["joint_attention"]["per_category"]
    assert (
        (baseline["a"], baseline["b"])
        == (50, 100)
        == (results["per_category"]["a"], results["per_category"]["b"])
    )
    notices = [r.getMessage() for r in caplog.records if "under 'daam'" in r.getMessage()]
    assert len(notices) == (1 if key == "daam" else 0)  # once per run, not per batch
