import json
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, print_config, scenes_args
from grounded_diffusion import lightning_entry
from grounded_diffusion.cli import main
from grounded_diffusion.data.cache import TripletCache

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`

ABLATIONS = REPO / "experiments" / "ablations"
BACKBONES = REPO / "experiments" / "backbones"  # overlays too
BASE = REPO / "experiments" / "base"  # pieces that experiments name, not experiments
PROTOCOL2 = REPO / "experiments" / "protocol2"
# Overlays go after an experiment; every other YAML is a complete experiment.
P2_OVERLAYS = {
    "zs3_split",
    "with_real_seen",
    "with_real_seen_coco",
    "deeplabv3",
    "offline",
    "shapes_with_real_seen",
    "shapes_real_seen",
    "shapes_real_all",
}
EXPERIMENTS = sorted(
    str(p.relative_to(REPO))
    for p in (REPO / "experiments").rglob("*.yaml")
    if ABLATIONS not in p.parents
    and BACKBONES not in p.parents
    and BASE not in p.parents
    and p.name != "offline.yaml"
    and not (p.parent == PROTOCOL2 and p.stem in P2_OVERLAYS)
    # overlays of one experiment (resolved after it in test_configs.py)
    and str(p.relative_to(REPO))
    not in (
        "experiments/shapes_wide.yaml",
        "experiments/world/wide.yaml",
        "experiments/shapes_dit.yaml",
        "experiments/world/dit.yaml",
        "experiments/world/dit_patch1.yaml",
    )
)


def offline_overlay(config: str) -> str | None:
    """Segmenter experiments have their own offline overlay; the shapes world's models train
    offline already (none); everything else takes offline.yaml."""
    if config.startswith(("experiments/world/", "experiments/protocol2/shapes_")):
        return None
    segmenter = config.endswith("_maskformer.yaml") or config == "experiments/protocol2/own_data.yaml"
    return "experiments/protocol2/offline.yaml" if segmenter else "experiments/offline.yaml"


OVERLAYS = sorted(
    str(p.relative_to(REPO)) for p in ABLATIONS.glob("*.yaml") if not p.name.endswith(".grid.yaml")
)


@pytest.mark.parametrize("config", EXPERIMENTS)
@pytest.mark.parametrize("subcommand", ["fit", "test", "predict"])
def test_every_experiment_parses_alone_and_offline(config, subcommand, capsys):
    overlay = offline_overlay(config)
    for configs in ([config], [config, overlay]) if overlay else ([config],):
        args = [subcommand] + [a for c in configs for a in ("--config", str(REPO / c))]
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--print_config"])
        assert exit_info.value.code in (None, 0)
        assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ablation_overlays_parse_after_an_experiment(overlay, capsys):
    base = "experiments/coco_split1.yaml" if "coco" in overlay else "experiments/pascal_split1.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / base), "--config", str(REPO / overlay), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "default_root_dir: outputs/" in printed
    if "seen" in overlay:
        assert f"split: {Path(overlay).stem.split('_')[1]}" in printed


@pytest.mark.parametrize(
    "base, overlay",
    [
        ("pascal_split1.yaml", "zs3_split"),
        ("synth/pascal_split1_train.yaml", "zs3_split"),
        ("protocol2/pascal_maskformer.yaml", "with_real_seen"),
        ("protocol2/coco_maskformer.yaml", "with_real_seen_coco"),
        ("protocol2/pascal_maskformer.yaml", "deeplabv3"),
        ("protocol2/shapes_segmenter.yaml", "shapes_with_real_seen"),
        ("protocol2/shapes_segmenter.yaml", "shapes_real_seen"),
        ("protocol2/shapes_segmenter.yaml", "shapes_real_all"),
    ],
)
def test_protocol2_overlays_parse_after_their_experiment(base, overlay, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(REPO / "experiments" / base),
                "--config",
                str(PROTOCOL2 / f"{overlay}.yaml"),
                "--print_config",
            ]
        )
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    expected = {
        "zs3_split": "split: zs3",
        "deeplabv3": "architecture: deeplabv3",
        "shapes_real_all": "seen_only: false",
    }
    assert expected.get(overlay, "seen_only: true") in printed


@pytest.mark.parametrize("overlay", ["sd2", "sdxl", "sd3", "flux", "flux2", "flux2_dev"])
def test_real_backbone_overlays_parse_after_an_experiment(overlay, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(REPO / "experiments/pascal_split1.yaml"),
                "--config",
                str(BACKBONES / f"{overlay}.yaml"),
                "--print_config",
            ]
        )
    printed = capsys.readouterr().out
    model_id = yaml.safe_load((BACKBONES / f"{overlay}.yaml").read_text())["model"]["init_args"]["backbone"][
        "model_id"
    ]
    assert f"cache_dir: data/pascal_sim/{model_id}/split1" in printed  # (resolved)


def predict_fit_test_on(overlay: str, root: Path, *flags: str) -> dict:
    """A small scenes run (predict, fit, test) on a tiny backbone's overlay: the cache's metadata."""
    args = [
        *scenes_args(root, "{train: 16, val: 4, test: 8}"),
        "--config",
        str(BACKBONES / f"{overlay}.yaml"),
        *flags,
        "--trainer.default_root_dir",  # (after the overlay, which sets its own)
        str(root),
        "--trainer.logger",
        "false",
    ]
    for stage in (["predict"], ["fit"], ["test", "--ckpt_path", "last"]):
        main([stage[0], *args, *stage[1:]])
    return json.loads(next(root.glob("cache-*/cache.json")).read_text())


@pytest.mark.parametrize(
    "overlay", ["tiny_sd2", "tiny_sdxl", "tiny_sd3", "tiny_flux", "tiny_flux2", "tiny_flux2_dev"]
)
def test_grounding_runs_end_to_end_on_every_architecture(overlay, tmp_path, capsys):
    """Feature capture, training and evaluation (ours, the attention baseline and the trivial
    predictors) on the tiny SD-2.x (v-prediction), SDXL (two text encoders, 3 resolution groups),
    SD3 (joint attention over [image, CLIP + T5 text]), FLUX.1 (double- and single-stream
    blocks over [text, image], packed latents) and FLUX.2 [klein] (Qwen3 text in chat markup,
    patchified latents, a separate unconditional call per step) and [dev] (a system message
    before the prompt, a guidance embedding)."""
    cache = predict_fit_test_on(overlay, tmp_path)
    assert cache["backbone"]["model_id"] == f"embedded/{overlay.replace('_', '-')}"
    assert len(cache["feature_groups"]) == (3 if overlay == "tiny_sdxl" else 4)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    unet = overlay in ("tiny_sd2", "tiny_sdxl")
    baseline = "daam" if unet else "joint_attention"  # keyed by method
    assert metrics["training_free"] == ([baseline] if unet else [baseline, "concept_attention"])
    assert 0 <= metrics["seen_miou"] <= 100 and 0 <= metrics["baselines"][baseline]["seen_miou"] <= 100
    # Grounded generation with the trained head: experiments/generate.yaml after the same overlay.
    prompts = [{"prompt": "a photograph of a dog and a cat", "categories": ["dog", "cat"]}]
    main(
        [
            "predict",
            "--config",
            str(REPO / "experiments/generate.yaml"),
            "--config",
            str(REPO / "experiments/offline.yaml"),
            "--config",
            str(BACKBONES / f"{overlay}.yaml"),
            "--ckpt_path",
            str(tmp_path / "checkpoints" / "last.ckpt"),
            "--trainer.default_root_dir",
            str(tmp_path / "generated"),
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.prompts",
            json.dumps(
                {
                    "class_path": "grounded_diffusion.data.prompts.PromptList",
                    "init_args": {"file": None, "prompts": prompts},
                }
            ),
        ]
    )
    coco = json.loads((tmp_path / "generated" / "annotations.json").read_text())
    assert len(coco["images"]) == 1 and {c["name"] for c in coco["categories"]} >= {"dog", "cat"}


def test_predict_fit_test_end_to_end(scene_cache, capsys):
    cache = TripletCache(next(scene_cache.glob("cache-*")))
    ids = [r["id"] for r in cache.manifest()]
    assert len(ids) == len(set(ids)) == 24 + 7 + 9
    assert {r["split"] for r in cache.manifest()} == {"train", "val", "test"}
    assert not list(Path(scene_cache).rglob("*.pkl")) and not list(Path(scene_cache).rglob("*.pt"))

    main(["fit", *scenes_args(scene_cache, steps=3)])
    assert (scene_cache / "checkpoints" / "last.ckpt").exists()
    main(["test", *scenes_args(scene_cache), "--ckpt_path", "last", "--verbose", "false"])
    out = capsys.readouterr().out
    metrics_path = scene_cache / "report" / "metrics.json"
    assert out.strip().splitlines()[-1] == f"metrics: {metrics_path}"
    metrics = json.loads(metrics_path.read_text())
    assert {"seen_miou", "unseen_miou", "harmonic_miou", "per_category", "baselines"} <= set(metrics)
    assert set(metrics["baselines"]) == {"daam", "all_foreground", "all_background"}
    assert set(metrics["groups"]["daam"]) == {
        "one_seen",
        "two_seen",
        "one_unseen",
        "two_seen_unseen",
        "two_unseen",
        "all",
    }
    assert metrics["groups"]["daam"]["all"]["miou"] > 0
    assert metrics["baselines"]["all_background"]["seen_miou"] == 0
    overlays = list((scene_cache / "report" / "overlays").glob("*.png"))
    assert len(overlays) == 8


def test_checkpoints_hold_the_head_not_the_frozen_backbone(scene_cache):
    import torch

    main(["fit", *scenes_args(scene_cache, steps=2)])
    state = torch.load(scene_cache / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and all(k.startswith("head.") for k in state)


def test_interrupted_cache_build_resumes_without_duplicates(tmp_path):
    args = scenes_args(tmp_path, counts="{train: 10, val: 3}")
    main(["predict", *args])
    cache = TripletCache(next(tmp_path.glob("cache-*")))
    lines = cache.manifest_path.read_text().splitlines()
    # Simulate a run killed after 4 samples: a torn manifest line, a half-written temp file.
    cache.manifest_path.write_text("\n".join(lines[:4]) + '\n{"id": "scene-tr')
    for record in lines[4:]:
        cache.sample_path(json.loads(record)["id"]).unlink()
    (cache.samples_dir / ".scene-train-000005.safetensors.tmp123").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="removed a torn last line"):
        main(["predict", *args])
    ids = [r["id"] for r in cache.manifest()]
    expected = [f"scene-train-{i:06d}" for i in range(10)] + [f"scene-val-{i:06d}" for i in range(3)]
    assert sorted(ids) == expected
    assert len(list(cache.samples_dir.glob("*.safetensors"))) == 13
    assert not list(cache.samples_dir.glob(".*.tmp*"))


def test_unknown_category_in_config_fails_before_any_work(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                *scenes_args(tmp_path),
                "--data.init_args.unseen",
                "[rnig]",
                "--data.init_args.split",
                "null",
            ]
        )
    assert "'rnig' (did you mean 'ring'" in str(exit_info.value.code)
    assert not list(tmp_path.iterdir())


def test_lightning_script_runs_our_subcommands(monkeypatch):
    calls = []
    monkeypatch.setattr(lightning_entry, "run_experiment", calls.append)
    lightning_entry.main(["fit", "--config", "x.yaml"])
    assert calls == [["fit", "--config", "x.yaml"]]


def test_lightning_script_hands_other_subcommands_to_lightning_sdk(monkeypatch):
    seen = []
    sdk = types.ModuleType("lightning_sdk.cli.entrypoint")
    sdk.main_cli = lambda: seen.append(list(sys.argv))
    for name in ("lightning_sdk", "lightning_sdk.cli"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "lightning_sdk.cli.entrypoint", sdk)
    lightning_entry.main(["login", "--foo"])
    assert seen == [["lightning", "login", "--foo"]]


def test_lightning_script_without_lightning_sdk_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning_sdk.cli.entrypoint", None)  # import fails
    with pytest.raises(SystemExit) as exit_info:
        lightning_entry.main(["studio"])
    assert "pip install lightning-sdk" in str(exit_info.value.code)


@pytest.mark.parametrize(
    "synth", sorted((REPO / "experiments" / "synth").glob("*.yaml")), ids=lambda p: p.stem
)
def test_synthesis_configs_feed_their_training_config(synth):
    """A fit config trains on the cache its synthesis configs write, with the same backbone
    (compared resolved: both name base files and interpolate the cache path)."""
    import yaml

    fit_name = synth.stem.rsplit("_", 1)[0]
    fit, built = (
        yaml.safe_load(print_config([p])) for p in (REPO / "experiments" / f"{fit_name}.yaml", synth)
    )
    assert fit["data"]["init_args"]["cache_dir"] == built["data"]["init_args"]["cache_dir"]
    for key in ("vocabulary", "split"):
        assert fit["data"]["init_args"][key] == built["data"]["init_args"][key]
    assert fit["model"]["init_args"]["backbone"] == built["model"]["init_args"]["backbone"]


TRAINING_DATA_SYNTHESIS = [
    *sorted((REPO / "experiments" / "synth").glob("*.yaml")),
    PROTOCOL2 / "pascal_build.yaml",
    PROTOCOL2 / "coco_build.yaml",
]


@pytest.mark.parametrize("config", TRAINING_DATA_SYNTHESIS, ids=lambda p: p.stem)
def test_training_data_is_synthesised_at_the_authors_guidance(config):
    """The authors generate training data with guidance 5.0 (train.py) and demo with 7.5 (test.py).
    A Protocol-I test set shares its training set's cache, so it is made the same way."""
    import yaml

    assert yaml.safe_load(config.read_text())["model"]["init_args"]["guidance_scale"] == 5.0
    demo = yaml.safe_load((REPO / "experiments" / "generate.yaml").read_text())
    assert demo["model"]["init_args"]["guidance_scale"] == 7.5


def test_fusion_steps_train_a_head_on_two_timesteps_end_to_end(tmp_path):
    """FLUX.2 with a second step (``backbone.fusion_steps``): the cache records both steps' groups,
    fit learns each block's step weights, and the exported head generates and segments again
    from its folder with the same steps."""
    from grounded_diffusion.api import GroundedGenerator
    from grounded_diffusion.models.pretrained_head import PretrainedHead

    cache = predict_fit_test_on("tiny_flux2", tmp_path, "--model.init_args.backbone.fusion_steps", "[10]")
    assert cache["backbone"]["fusion_steps"] == [10] and len(cache["feature_groups"]) == 2 * 4
    pretrained = PretrainedHead.from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    weights = pretrained.head.timestep_weights
    assert weights.shape == (4, 2) and weights.abs().max() > 0  # learned: they start at 0
    pretrained.save_pretrained(tmp_path / "head")
    generator = GroundedGenerator.from_pretrained(tmp_path / "head")
    assert generator.backbone.config.fusion_steps == [10]
    torch.testing.assert_close(generator.head.timestep_weights, weights)
    out = generator(["a photograph of a red circle"], [["red circle"]], seed=[0], progress=False)
    assert out.probabilities[0].shape == (1, 128, 128)
