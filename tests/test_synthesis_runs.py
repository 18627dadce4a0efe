"""Synthesis as a predict run: the cache it writes, both storage modes, resume after a real kill,
two DDP processes, and the config-time errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from conftest import REPO, run_cli
from datamodules.triplets import TripletDataModule
from grounded_diffusion.cli import main
from grounded_diffusion.data.cache import TripletCache, decode_image
from grounded_diffusion.data.prompts import GROUPS

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`

FEATURES_WRITER = "[{class_path: callbacks.cache_writer.TripletCacheWriter, init_args: {storage: features}}]"


def synth_args(
    root: Path, config: str = "pascal_split1_test", per_group: int = 2, batch_size: int = 4
) -> list[str]:
    """A synthesis config run offline, small and short (6 DDIM steps, capture at t=2)."""
    return [
        "--config",
        str(REPO / "experiments" / "synth" / f"{config}.yaml"),
        "--config",
        str(REPO / "experiments" / "offline.yaml"),
        "--data.init_args.max_per_group",
        str(per_group),
        "--data.init_args.batch_size",
        str(batch_size),
        "--model.init_args.backbone.num_inference_steps",
        "6",
        "--model.init_args.backbone.capture_step",
        "2",
        "--trainer.default_root_dir",
        str(root),
        "--data.init_args.cache_dir",
        str(root / "cache-synth"),  # (offline: data/<vocab>_sim/embedded/tiny-sd/...)
        "--trainer.enable_progress_bar",
        "false",
    ]


def expected_ids(per_group: int) -> list[str]:
    return sorted(f"test-{g}-{i:06d}" for g in GROUPS for i in range(per_group))


def cache_in(root: Path) -> TripletCache:
    return TripletCache(next(root.glob("cache-*")))


@pytest.fixture(scope="module")
def latents_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth-latents")
    run_cli(["predict", *synth_args(root)])
    return root


def test_synthesis_writes_every_requested_sample_with_all_its_parts(latents_cache):
    cache = cache_in(latents_cache)
    records = cache.manifest()
    assert sorted(r["id"] for r in records) == expected_ids(2)
    assert {r["group"] for r in records} == set(GROUPS)
    metadata = cache.metadata()
    assert metadata["storage"] == "latents" and metadata["oracle"]["oracle"] == "MaskRCNNOracle"
    tensors, file_metadata = cache.load(records[-1]["id"])
    objects = len(records[-1]["categories"])
    assert set(tensors) == {"latents", "timestep", "image.jpeg", "masks", "daam", "oracle_scores"}
    assert (
        tensors["latents"].shape == (4, 16, 16) and tensors["latents"].dtype == torch.float32
    )  # the UNet's dtype
    assert int(tensors["timestep"]) == metadata["capture_timestep"]
    image = decode_image(tensors)
    assert image.shape == (3, 128, 128) and image.dtype == torch.uint8
    assert file_metadata["mask_shape"] == f"{objects},128,128"
    assert tensors["daam"].shape == (objects, 16, 16) and tensors["oracle_scores"].shape == (objects,)


def test_replayed_features_equal_stored_features(latents_cache, tmp_path):
    """The same config in ``features`` storage; replaying the latents through the module's frozen
    UNet gives the stored features within fp16 rounding (rtol 2^-10, atol 1e-3)."""
    main(["predict", *synth_args(tmp_path), "--trainer.callbacks", FEATURES_WRITER])
    stored_cache, replay_cache = cache_in(tmp_path), cache_in(latents_cache)
    assert stored_cache.metadata()["storage"] == "features"

    from grounded_diffusion.models.backbones import BackboneConfig
    from lightning_modules.grounding import GroundingModule

    config = BackboneConfig(branches="uncond+cond", num_inference_steps=6, capture_step=2)
    module = GroundingModule(backbone=config)
    ids = [r["id"] for r in replay_cache.manifest()]
    batches = []
    for cache in (stored_cache, replay_cache):
        data = TripletDataModule(str(cache.root), vocabulary="pascal", split=1, max_objects=2)
        samples = data._split_samples(cache.manifest(), "test")
        order = {s: i for i, s in enumerate(r["id"] for r in samples.records)}
        batches.append(default_collate([samples[order[i]] for i in ids]))  # as the DataLoader
    stored, replayed = module._features(batches[0]), module._features(batches[1])
    assert len(stored) == len(replayed) == 4
    for s, r in zip(stored, replayed):
        torch.testing.assert_close(r.float(), s.float(), rtol=2**-10, atol=1e-3)
    for key in ("image", "masks", "daam"):
        torch.testing.assert_close(batches[0][key], batches[1][key], atol=1e-3, rtol=0)


def test_training_replays_latents(latents_cache):
    main(["predict", *synth_args(latents_cache, "pascal_split1_train")])
    assert {r["split"] for r in cache_in(latents_cache).manifest()} == {"train", "val", "test"}
    fit = [
        "fit",
        "--config",
        str(REPO / "experiments" / "pascal_split1.yaml"),
        *synth_args(latents_cache)[2:],
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--data.init_args.batch_size",
        "2",
    ]
    main(fit)
    assert (latents_cache / "checkpoints" / "last.ckpt").exists()

    # Table 1 offline: ours vs DAAM on the synthetic test set, every group, τ also tuned on seen.
    test = [
        "test",
        "--config",
        str(REPO / "experiments" / "pascal_split1.yaml"),
        *synth_args(latents_cache)[2:],
        "--ckpt_path",
        "last",
        "--verbose",
        "false",
        "--model.init_args.daam_thresholds",
        "[0.2, 0.4, 0.6]",
    ]
    main(test)
    metrics = json.loads((latents_cache / "report" / "metrics.json").read_text())
    # The test filter is on: the random offline oracle is rarely sure, so most objects are dropped;
    # every object of every group is scored in the unfiltered table.
    counts = metrics["test_filter"]["objects"]
    assert all(counts[g]["scored"] + counts[g]["dropped"] > 0 for g in GROUPS)
    assert sum(counts[g]["scored"] for g in GROUPS) == counts["all"]["scored"]
    assert sum(counts[g]["dropped"] for g in GROUPS) == counts["all"]["dropped"] > 0
    unfiltered = metrics["unfiltered"]
    for method in ("ours", "daam"):
        assert set(metrics["groups"][method]) == set(unfiltered["groups"][method]) == {*GROUPS, "all"}
        assert all(unfiltered["groups"][method][g]["image_noun_miou"] is not None for g in GROUPS)
    assert metrics["training_free"] == unfiltered["training_free"] == ["daam"]
    assert unfiltered["tuned"]["daam"]["threshold"] in (0.2, 0.4, 0.6)
    assert set(unfiltered["tuned"]["daam"]["seen_miou_by_threshold"]) == {"0.2", "0.4", "0.6"}
    report = (latents_cache / "report" / "report.md").read_text()
    assert "| DAAM (τ=" in report and "| scored / dropped |" in report
    assert "Predicted pixels on the other named object" in report


def test_a_half_precision_backbone_runs_every_stage(tmp_path):
    """The GPU configs' float16 backbone, here as bfloat16 (float16 is refused on a CPU): a dtype
    mixed up anywhere (latents, replayed features, DAAM maps, the head) would fail on the CPU too.
    Synthesis with latents -> fit replaying them -> test -> grounded generation."""
    half = ["--model.init_args.backbone.dtype", "bfloat16", "--trainer.logger", "false"]
    main(["predict", *synth_args(tmp_path, "pascal_split1_train"), *half])
    tensors, _ = cache_in(tmp_path).load(cache_in(tmp_path).manifest()[0]["id"])
    assert tensors["latents"].dtype == torch.bfloat16  # the UNet's dtype
    run = ["--config", str(REPO / "experiments" / "pascal_split1.yaml"), *synth_args(tmp_path)[2:], *half]
    main(
        [
            "fit",
            *run,
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--data.init_args.batch_size",
            "2",
        ]
    )
    main(["test", *run, "--ckpt_path", "last", "--verbose", "false"])
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["groups"]["daam"]
    main(
        [
            "predict",
            "--config",
            str(REPO / "experiments" / "generate.yaml"),
            "--config",
            str(REPO / "experiments" / "offline.yaml"),
            "--ckpt_path",
            str(tmp_path / "checkpoints" / "last.ckpt"),
            "--trainer.default_root_dir",
            str(tmp_path / "generated"),
            "--trainer.enable_progress_bar",
            "false",
            *half,
        ]
    )
    assert len(list((tmp_path / "generated" / "SegmentationClass").glob("*.png"))) > 0


def test_a_killed_build_resumes_to_exactly_the_requested_ids(tmp_path):
    args = synth_args(tmp_path, per_group=4, batch_size=2)
    command = [sys.executable, "-m", "grounded_diffusion", "predict", *args]
    process = subprocess.Popen(
        command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    manifest = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            manifest = next(tmp_path.glob("cache-*/manifest.jsonl"), None)
            if manifest is not None and len(manifest.read_bytes().splitlines()) >= 5:
                break
            assert process.poll() is None, "the build ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    written = len(manifest.read_bytes().splitlines())
    assert 5 <= written < 20  # killed mid-build

    main(["predict", *args])
    lines = manifest.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert sorted(ids) == expected_ids(4)  # none duplicated, none lost
    cache = cache_in(tmp_path)
    for sample_id in ids:
        cache.load(sample_id)  # every file is complete
    assert not list(cache.samples_dir.glob(".*.tmp*"))  # a killed write's temp file is cleared


def test_two_ddp_processes_write_exactly_the_requested_ids(tmp_path):
    main(
        [
            "predict",
            *synth_args(tmp_path, per_group=3, batch_size=2),
            "--trainer.strategy",
            "ddp_spawn",
            "--trainer.devices",
            "2",
        ]
    )
    lines = cache_in(tmp_path).manifest_path.read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == expected_ids(3)


@pytest.mark.parametrize("config", sorted(p.stem for p in (REPO / "experiments" / "synth").glob("*.yaml")))
def test_every_synthesis_config_runs_offline(config, tmp_path):
    main(
        [
            "predict",
            *synth_args(tmp_path, config, per_group=1),
            "--model.init_args.backbone.num_inference_steps",
            "2",
            "--model.init_args.backbone.capture_step",
            "1",
        ]
    )
    records = cache_in(tmp_path).manifest()
    kind = config.rsplit("_", 1)[1]
    assert {r["split"] for r in records} == ({"train", "val"} if kind == "train" else {"test"})
    assert len(records) == (4 if kind == "train" else 5)


def test_synthesis_of_categories_the_oracle_cannot_label_fails_at_config_time(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["predict", *synth_args(tmp_path), "--data.init_args.vocabulary", "scenes"])
    assert "cannot label" in str(info.value.code) and "'disc'" in str(info.value.code)
    assert not list(tmp_path.glob("cache-*"))


def test_synthesis_without_an_oracle_says_what_to_set(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["predict", *synth_args(tmp_path), "--model.init_args.oracle", "null"])
    assert "needs model.init_args.oracle" in str(info.value.code)


@pytest.mark.parametrize("overlay", ["tiny_sd3", "tiny_flux", "tiny_flux2", "tiny_flux2_dev"])
def test_diffusion_transformers_synthesise_into_both_cache_modes_replay_and_train(overlay, tmp_path):
    """SD3, FLUX.1 and FLUX.2 ([klein], [dev]): synthesis (generation + oracle + joint-attention
    maps) into a latents cache and a features cache; the replayed latents give the stored
    features; fit and test run on the latents cache (the baseline's maps on the 8x8 token grid)."""

    def args(root: Path, config: str = "pascal_split1_test") -> list[str]:
        arguments = synth_args(root, config)  # the overlay after the configs, before the flags
        return [
            *arguments[:4],
            "--config",
            str(REPO / "experiments" / "backbones" / f"{overlay}.yaml"),
            *arguments[4:],
        ]

    latents_root, features_root = tmp_path / "latents", tmp_path / "features"
    main(["predict", *args(latents_root)])
    main(["predict", *args(features_root), "--trainer.callbacks", FEATURES_WRITER])
    replay_cache, stored_cache = cache_in(latents_root), cache_in(features_root)
    assert (
        replay_cache.metadata()["storage"] == "latents" and stored_cache.metadata()["storage"] == "features"
    )
    record = replay_cache.manifest()[-1]
    tensors, _ = replay_cache.load(record["id"])
    latent_shape = (128, 8, 8) if "flux2" in overlay else (16, 16, 16)  # FLUX.2: patchified 2x2
    assert "daam" not in tensors  # the maps are keyed by their method, ConceptAttention's beside
    assert tensors["concept_attention"].shape == tensors["joint_attention"].shape
    concepts = replay_cache.metadata()["concept_attention"]
    assert concepts["background"] == ["background"] and concepts["blocks"]
    assert tensors["latents"].shape == latent_shape and tensors["joint_attention"].shape == (
        len(record["categories"]),
        8,
        8,
    )
    assert float(tensors["timestep"]) == pytest.approx(replay_cache.metadata()["capture_timestep"])

    from grounded_diffusion.models.backbones import BackboneConfig
    from lightning_modules.grounding import GroundingModule

    module = GroundingModule(backbone=BackboneConfig(**replay_cache.metadata()["backbone"]))  # what built it
    ids = [r["id"] for r in replay_cache.manifest()]
    batches = []
    for cache in (stored_cache, replay_cache):
        data = TripletDataModule(str(cache.root), vocabulary="pascal", split=1, max_objects=2)
        samples = data._split_samples(cache.manifest(), "test")
        order = {s: i for i, s in enumerate(r["id"] for r in samples.records)}
        batches.append(default_collate([samples[order[i]] for i in ids]))
    stored, replayed = module._features(batches[0]), module._features(batches[1])
    assert len(stored) == len(replayed) == 4
    for s, r in zip(stored, replayed):
        torch.testing.assert_close(r.float(), s.float(), rtol=2**-10, atol=1e-3)

    main(["predict", *args(latents_root, "pascal_split1_train")])
    common = ["--config", str(REPO / "experiments" / "pascal_split1.yaml"), *args(latents_root)[2:]]
    main(
        [
            "fit",
            *common,
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--data.init_args.batch_size",
            "2",
        ]
    )
    main(["test", *common, "--ckpt_path", "last", "--verbose", "false"])
    metrics = json.loads((latents_root / "report" / "metrics.json").read_text())
    assert metrics["unfiltered"]["groups"]["joint_attention"]["all"]["miou"] is not None
    assert metrics["training_free"] == ["joint_attention", "concept_attention"]
    assert (
        set(metrics["argmax"]) == {"concept_attention"} and "concept_attention@argmax" in metrics["baselines"]
    )
    assert "daam" not in metrics["groups"] and "daam" not in metrics["baselines"]
    report = (latents_root / "report" / "report.md").read_text()
    assert "| joint attention | " in report and "| daam" not in report  # the baseline by its name
    assert "| ConceptAttention | " in report and "| ConceptAttention (argmax over concepts) | " in report
