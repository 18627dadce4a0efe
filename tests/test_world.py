"""The shapes world: its renderer, the training code of its three models (a few steps, then
resumed), and the oracle's forward pass against a hand-computed case."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli
from grounded_diffusion.data.vocabulary import CategorySplit
from grounded_diffusion.shapes_world.render import COLOURS, SHAPES, SHAPES_WORLD, caption, render_shapes_scene

pytestmark = pytest.mark.workflow  # runs the CLI or a whole workflow: `make test`, not `make test-fast`

WORLD = REPO / "experiments" / "world"


def world_args(config: str, root: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--config",
        str(WORLD / config),
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(steps),
        "--trainer.limit_val_batches",
        "1",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.batch_size",
        "2",
        *extra,
    ]


def saved(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def test_scenes_are_deterministic_and_labelled_exactly():
    for index in range(20):
        image, labels, names = render_shapes_scene(index)
        again = render_shapes_scene(index)
        assert np.array_equal(image, again[0]) and np.array_equal(labels, again[1]) and names == again[2]
        assert image.shape == (64, 64, 3) and labels.shape == (64, 64)
        present = {SHAPES_WORLD[v - 1] for v in np.unique(labels) if v}
        assert present == set(names) and 1 <= len(names) <= 2
        assert caption(names).startswith("a photograph of a " + names[0])
    # different seeds, different scenes
    assert not np.array_equal(render_shapes_scene(0, seed=0)[0], render_shapes_scene(0, seed=3)[0])


def test_every_word_of_an_unseen_category_is_seen_in_another():
    split = CategorySplit.named("shapes", 1)
    assert len(split.categories) == len(COLOURS) * len(SHAPES) == 20 and len(split.unseen) == 5
    seen_words = {word for name in split.seen for word in name.split()}
    for name in split.unseen:
        assert set(name.split()) <= seen_words, name
    # the seen-count ablation: nested seen sets of 5, 10, 15, none of them seeing split 1's unseen
    seen = [set(CategorySplit.named("shapes", f"seen{n}").seen) for n in (5, 10, 15)]
    assert [len(s) for s in seen] == [5, 10, 15] and seen[0] < seen[1] < seen[2] == set(split.seen)
    # a shape is never told apart by a colour of its own: each shape is seen in several colours
    for shape in SHAPES:
        assert len({n.split()[0] for n in split.seen if n.endswith(shape)}) >= 3


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory) -> Path:
    """The autoencoder config trained 2 steps, then resumed to 3; returns its run folder."""
    root = tmp_path_factory.mktemp("autoencoder")
    run_cli(["fit", *world_args("autoencoder.yaml", root, 2)])
    run_cli(["fit", *world_args("autoencoder.yaml", root, 3), "--ckpt_path", "last"])
    return root


def test_autoencoder_trains_resumes_and_exports(trained_vae):
    from diffusers import AutoencoderKL

    assert saved(trained_vae / "checkpoints" / "last.ckpt")["global_step"] == 3
    vae = AutoencoderKL.from_pretrained(trained_vae / "vae")
    assert vae.config.scaling_factor > 0 and len(vae.config.block_out_channels) == 3  # 4x: 64 px -> 16x16


def test_text_to_image_trains_resumes_with_its_ema_and_exports_a_pipeline(trained_vae, tmp_path):
    from grounded_diffusion.models.backbones import load_pipeline

    args = ["--model.init_args.vae", str(trained_vae / "vae"), "--model.init_args.num_inference_steps", "2"]
    run_cli(["fit", *world_args("text_to_image.yaml", tmp_path, 2, *args)])
    first = saved(tmp_path / "checkpoints" / "last.ckpt")
    assert first["ema"]["optimization_step"] == 2
    run_cli(["fit", *world_args("text_to_image.yaml", tmp_path, 3, *args), "--ckpt_path", "last"])
    resumed = saved(tmp_path / "checkpoints" / "last.ckpt")
    assert (
        resumed["global_step"] == 3 and resumed["ema"]["optimization_step"] == 3
    )  # EMA restored, not restarted
    assert (tmp_path / "samples" / "step-3.png").is_file()
    # The export: float16 on disk, loaded as float32 through the real from_pretrained path.
    from safetensors.torch import load_file

    unet_file = tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    assert next(iter(load_file(unet_file).values())).dtype == torch.float16
    assert not (tmp_path / "pipeline" / "tokenizer" / "tokenizer.json").exists()
    pipe = load_pipeline(str(tmp_path / "pipeline"), torch.float32)
    assert pipe.unet.dtype == torch.float32
    image = pipe("a photograph of a red square", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 64, 64)


def test_the_mmdit_trains_with_rectified_flow_resumes_and_exports_an_sd3_pipeline(tmp_path):
    """experiments/world/dit.yaml: SD3's layout over the shipped VAE; the loss is the velocity
    MSE at x_σ = (1 - σ) x_0 + σ ε (checked against a hand-written one with the same draws); the
    export loads as an SD3 pipeline and a backbone without T5 tokens."""
    from grounded_diffusion.models.backbones import BackboneConfig, build_backbone, load_pipeline
    from lightning_modules.world_text_to_image import TextToImageModule

    def args(steps: int) -> list[str]:  # the overlay right after its experiment, the flags after both
        flags = world_args(
            "text_to_image.yaml", tmp_path, steps, "--model.init_args.num_inference_steps", "2"
        )
        return [*flags[:2], "--config", str(WORLD / "dit.yaml"), *flags[2:]]

    run_cli(["fit", *args(2)])
    run_cli(["fit", *args(3), "--ckpt_path", "last"])
    resumed = saved(tmp_path / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 3 and resumed["ema"]["optimization_step"] == 3
    pipe = load_pipeline(str(tmp_path / "pipeline"), torch.float32)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    backbone = build_backbone(
        BackboneConfig(
            model_id=str(tmp_path / "pipeline"), max_sequence_length=0, num_inference_steps=4, capture_step=2
        )
    )
    generation = backbone.generate(["a photograph of a red square"], [0], 3.0, [["red square"]])
    assert generation.images.shape == (1, 3, 64, 64) and generation.heat_maps.shape == (1, 1, 8, 8)

    module = TextToImageModule(
        vae=str(REPO / "grounded_diffusion/shapes_world/weights/shapes-sd/vae"), architecture="mmdit"
    )
    latents, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    captions = ["a photograph of a red square", ""]
    loss = module._flow_loss(latents, noise, captions, torch.Generator().manual_seed(0))
    sigma = torch.sigmoid(torch.randn(2, generator=torch.Generator().manual_seed(0)))[:, None, None, None]
    hidden, _, pooled, _ = module.pipeline().encode_prompt(
        captions, None, None, do_classifier_free_guidance=False, max_sequence_length=0
    )
    velocity = module.transformer(
        hidden_states=(1 - sigma) * latents + sigma * noise,
        timestep=1000 * sigma.flatten(),
        encoder_hidden_states=hidden,
        pooled_projections=pooled,
    ).sample
    torch.testing.assert_close(loss, ((velocity - (noise - latents)) ** 2).mean())


def test_oracle_segmenter_trains_resumes_and_loads_as_the_oracle(tmp_path):
    from grounded_diffusion.models.oracle import SegmenterOracle

    run_cli(["fit", *world_args("oracle.yaml", tmp_path, 2)])
    run_cli(["fit", *world_args("oracle.yaml", tmp_path, 3), "--ckpt_path", "last"])
    assert saved(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 3
    oracle = SegmenterOracle(str(tmp_path / "segmenter"))
    oracle.check_categories(["blue ring", "red circle"])
    images = torch.from_numpy(np.stack([render_shapes_scene(i)[0] for i in range(2)])).permute(0, 3, 1, 2)
    masks, scores = oracle(images, [["blue ring"], ["red circle", "green cross"]])
    assert masks.shape == (2, 2, 64, 64) and scores.shape == (2, 2)
    assert not masks[0, 1].any() and scores[0, 1] == 0  # the empty slot


def test_segmenter_oracle_masks_and_scores_match_a_hand_computed_case(tmp_path):
    from grounded_diffusion.models.oracle import SegmenterOracle
    from grounded_diffusion.models.segmenters import LRASPP, save_segmenter

    classes = ["red circle", "blue ring", "green cross"]
    save_segmenter(
        LRASPP(4), tmp_path, architecture="lraspp", num_classes=4, classes=classes, background="class"
    )
    oracle = SegmenterOracle(str(tmp_path), min_pixels=2)
    oracle.build()
    # A 1x4 image; rows are pixels, columns the classes (background, red circle, blue ring,
    # green cross): background; red circle (p .7); red circle (p .5); blue ring (p .6), which
    # covers 1 pixel < min_pixels and so is not found; green cross is nowhere.
    probs = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.1, 0.2, 0.6, 0.1]]
    )
    logits = probs.log().T.reshape(1, 4, 1, 4)  # [B, classes, H, W]; softmax(log p) = p (rows sum to 1)
    oracle.segmenter.scores = lambda images: logits
    masks, scores = oracle(
        torch.zeros(1, 3, 1, 4, dtype=torch.uint8), [["red circle", "blue ring", "green cross"]]
    )
    assert masks[0, 0, 0].tolist() == [False, True, True, False]
    assert scores[0, 0].item() == pytest.approx((0.7 + 0.5) / 2)
    assert not masks[0, 1].any() and scores[0, 1] == 0
    assert not masks[0, 2].any() and scores[0, 2] == 0


def test_missing_world_weights_name_the_command_that_retrains_them(tmp_path, monkeypatch):
    from grounded_diffusion.errors import MissingWeightsError
    from grounded_diffusion.models import backbones, embedded, oracle

    monkeypatch.setattr(embedded, "WEIGHTS_DIR", tmp_path / "none")  # (the shipped weights gone)
    with pytest.raises(
        MissingWeightsError, match="missing from .*none/shapes-sd .*retrain them with `make world`"
    ):
        backbones.load_pipeline("embedded/shapes-sd", torch.float32)
    with pytest.raises(MissingWeightsError, match="retrain them with `make world`"):
        oracle.SegmenterOracle("embedded/shapes-oracle")
    with pytest.raises(MissingWeightsError, match="retrain them with `make world-dit`"):
        backbones.load_pipeline("embedded/shapes-dit", torch.float32)


def test_the_embedded_registry_is_the_one_place_ids_resolve():
    """Every embedded id the code names is registered, of its kind, and an unknown one is one line."""
    from grounded_diffusion.errors import ConfigError
    from grounded_diffusion.models import tiny_dit, tiny_sd
    from grounded_diffusion.models.embedded import REGISTRY, embedded_model
    from grounded_diffusion.shapes_world import models as world_models

    named = {
        v
        for module in (world_models, tiny_dit, tiny_sd)
        for k, v in vars(module).items()
        if k.endswith("_ID") and isinstance(v, str) and v.startswith("embedded/")
    }
    assert named == set(REGISTRY)
    assert {m.model_id for m in REGISTRY.values() if m.kind == "oracle"} == {
        world_models.SHAPES_ORACLE_ID,
        world_models.SHAPES_WIDE_ORACLE_ID,
    }
    for model in REGISTRY.values():  # a trained model names the Makefile target that retrains it
        assert model.trained == (model.retrain is not None)
        if model.trained:
            assert f"\n{model.retrain.removeprefix('make ')}:" in (REPO / "Makefile").read_text()
            assert model.folder().is_dir()  # (shipped)
    with pytest.raises(
        ConfigError, match=r"'embedded/tiny-sd4' is not an embedded model \(did you mean 'embedded/tiny-sd'"
    ):
        embedded_model("embedded/tiny-sd4")
    with pytest.raises(ConfigError, match="is an embedded pipeline, not 'oracle'"):
        embedded_model("embedded/shapes-sd", "oracle")
    assert embedded_model("stabilityai/stable-diffusion-2-1") is None


def test_the_shipped_weights_hold_the_clip_tokenizer_once(tmp_path):
    """Every world model's tokenizer folder is a link to the one shared copy, and a retrained
    model's copied-in tokenizer is linked back (what the Makefile's world targets run)."""
    from grounded_diffusion.models.embedded import REGISTRY
    from grounded_diffusion.shapes_world.packaging import (
        SHARED,
        WEIGHTS_DIR,
        link_tokenizers,
        tokenizer_copies,
    )

    assert tokenizer_copies() == []
    pipelines = [m for m in REGISTRY.values() if m.trained and m.kind == "pipeline"]
    folders = [f for m in pipelines for f in sorted(m.folder().glob("tokenizer*"))]
    assert len(folders) == 4 and all(f.is_symlink() and f.resolve() == WEIGHTS_DIR / SHARED for f in folders)
    shutil.copytree(WEIGHTS_DIR / SHARED, tmp_path / SHARED)
    shutil.copytree(
        WEIGHTS_DIR / SHARED, tmp_path / "retrained" / "tokenizer"
    )  # (a real folder, as cp -r leaves)
    (tmp_path / "other" / "tokenizer").mkdir(parents=True)
    (tmp_path / "other" / "tokenizer" / "vocab.json").write_text("{}")  # another tokenizer: kept
    assert link_tokenizers(tmp_path) == [tmp_path / "retrained" / "tokenizer"]
    linked = tmp_path / "retrained" / "tokenizer"
    assert (
        linked.is_symlink()
        and (linked / "vocab.json").read_bytes() == (WEIGHTS_DIR / SHARED / "vocab.json").read_bytes()
    )
    assert not (tmp_path / "other" / "tokenizer").is_symlink()
