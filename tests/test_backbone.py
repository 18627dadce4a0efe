import pytest
import torch
from diffusers import DDIMScheduler

from grounded_diffusion.cli import main
from grounded_diffusion.errors import ConfigError
from grounded_diffusion.models.backbones import (
    BackboneConfig,
    MissingWeightsError,
    StableDiffusionBackbone,
    capture_timestep,
)
from grounded_diffusion.models.grounding_head import GroundingHead, HeadConfig


def latents_and_prompts(backbone, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = backbone.unet.config.sample_size
    latents = torch.randn(n, 4, size, size, generator=g)
    prompts = ["a photograph of a dog", "a photograph of a cat and a bus", "a photograph of a sofa"]
    return latents, backbone.encode_prompts([prompts[i % 3] for i in range(n)])


def test_authors_25_blocks_grouped_by_resolution(backbone):
    assert len(backbone.block_names) == 25
    assert backbone.block_names[0] == "input_blocks.0" and backbone.block_names[-1] == "output_blocks.11"
    # CompVis grouping worked out by hand for widths (32, 32, 64, 64), as docs/design.md §2 gives for SD-1.5
    # (an output block that ends a level is counted after its upsampler, at the finer size):
    # 2x2:   input 9-11 (3x64)    + middle (64) + output 0-1 (2x64)   = 384
    # 4x4:   input 6-8 (32+2x64)  + output 2-4 (3x64)                 = 352
    # 8x8:   input 3-5 (3x32)     + output 5-7 (64+2x32)              = 224
    # 16x16: input 0-2 (3x32)     + output 8-11 (4x32)                = 224
    assert backbone.feature_channels() == [384, 352, 224, 224]


def test_both_guidance_branches_double_the_channels():
    both = StableDiffusionBackbone(BackboneConfig(branches="uncond+cond"))
    assert both.feature_channels() == [768, 704, 448, 448]


def test_block_subset():
    subset = StableDiffusionBackbone(BackboneConfig(blocks=["middle_block", "output_blocks.11"]))
    assert subset.feature_channels() == [64, 32]


def test_capture_step_counts_from_the_end_as_in_the_paper(backbone):
    config = backbone.scheduler_config
    assert capture_timestep(config, 50, 1) == 1  # the authors' code: the last step
    assert capture_timestep(config, 50, 5) == 81  # the paper: t = 5
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(50)
    assert backbone.timestep == int(scheduler.timesteps[-5])


def test_batch_of_n_equals_n_single_calls(backbone):
    latents, embeds = latents_and_prompts(backbone, 3)
    t = torch.full((3,), backbone.timestep)
    batched = backbone.features(latents, t, embeds)
    singles = [backbone.features(latents[i : i + 1], t[:1], embeds[i : i + 1]) for i in range(3)]
    for g, group in enumerate(batched):
        torch.testing.assert_close(group, torch.cat([s[g] for s in singles]), rtol=1e-4, atol=1e-5)

    torch.manual_seed(0)
    head = GroundingHead(
        backbone.feature_channels(), 64, HeadConfig(embed_dim=64, ffn_dim=128, num_heads=4)
    ).eval()
    text = torch.randn(3, 2, 64)
    slots = torch.tensor([[True, True], [True, False], [True, True]])
    out = head(batched, text, slots, (128, 128))
    for i in range(3):
        single = head(
            [g[i : i + 1] for g in batched],
            text[i : i + 1, : int(slots[i].sum())],
            slots[i : i + 1, : int(slots[i].sum())],
            (128, 128),
        )
        torch.testing.assert_close(out[i : i + 1, : single.shape[1]], single, rtol=1e-4, atol=1e-4)


def test_category_embedding_is_mean_of_the_name_tokens(backbone):
    # "a photograph of a potted plant": BOS a photograph of a | potted plant | EOS ->
    # the class name is tokens 5 and 6.
    ids = backbone.tokenizer("a photograph of a potted plant").input_ids
    assert len(ids) == 8
    hidden = backbone.encode_prompts(["a photograph of a potted plant"]).hidden[0]
    expected = hidden[5:7].mean(0)
    torch.testing.assert_close(backbone.category_embeddings(["potted plant", "dog"])[0], expected)


def test_noising_reaches_the_capture_step(backbone):
    latents, embeds = latents_and_prompts(backbone, 2)
    noise = torch.randn_like(latents)
    alpha = DDIMScheduler.from_config(backbone.scheduler_config).alphas_cumprod[backbone.timestep]
    out = backbone.latents_at_capture_step(latents, embeds, noise, mode="noise")
    torch.testing.assert_close(out, alpha.sqrt() * latents + (1 - alpha).sqrt() * noise)


def test_ddim_inversion_is_undone_by_ddim_sampling(backbone):
    latents, embeds = latents_and_prompts(backbone, 2)
    inverted = backbone.latents_at_capture_step(latents, embeds, mode="ddim_inversion")
    assert not torch.allclose(inverted, latents)
    scheduler = DDIMScheduler.from_config(backbone.scheduler_config)
    scheduler.set_timesteps(backbone.config.num_inference_steps)
    x = inverted
    for t in scheduler.timesteps[scheduler.timesteps <= backbone.timestep]:
        eps = backbone.unet(x, t, encoder_hidden_states=embeds.hidden).sample
        x = scheduler.step(eps, t, x).prev_sample
    # DDIM inversion is exact up to the change of the UNet's output between adjacent steps.
    assert (x - latents).abs().mean() < 0.1 * (inverted - latents).abs().mean()


def test_missing_local_folder_names_the_problem(tmp_path):
    with pytest.raises(MissingWeightsError, match="no model_index.json"):
        StableDiffusionBackbone(BackboneConfig(model_id=str(tmp_path)))


def test_missing_hub_weights_name_the_model_and_the_fix(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as error:
        StableDiffusionBackbone(BackboneConfig(model_id="stable-diffusion-v1-5/stable-diffusion-v1-5"))
    message = str(error.value)
    assert "'stable-diffusion-v1-5/stable-diffusion-v1-5'" in message
    assert "hf download" in message and "save_pretrained" in message and "offline.yaml" in message


def test_paper_experiment_fails_with_the_clear_error_only(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "experiments/pascal_split1.yaml", "--trainer.accelerator", "cpu"])
    message = str(exit_info.value.code)
    assert message.startswith("error: Could not load Stable Diffusion weights for model_id")
    assert "Traceback" not in message


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="branches 'both'"):
        StableDiffusionBackbone(BackboneConfig(branches="both"))
    with pytest.raises(ValueError, match="Unknown UNet blocks \\['middle'\\]"):
        StableDiffusionBackbone(BackboneConfig(blocks=["middle"]))
    with pytest.raises(
        ValueError, match=r"capture_step is 60, outside \[1, 50\]: the nearest valid value is 50"
    ):
        StableDiffusionBackbone(BackboneConfig(capture_step=60))


@pytest.fixture(scope="module")
def sd2():
    return StableDiffusionBackbone(BackboneConfig(model_id="embedded/tiny-sd2"))


@pytest.fixture(scope="module")
def sdxl():
    return StableDiffusionBackbone(BackboneConfig(model_id="embedded/tiny-sdxl"))


@pytest.fixture(params=["sd2", "sdxl"])
def other_backbone(request):
    return request.getfixturevalue(request.param)


def test_sd2_and_sdxl_blocks_and_groups(other_backbone):
    if other_backbone.is_xl:
        # SDXL's CompVis layout: input_blocks 0-8, middle, output_blocks 0-8, three levels. By hand
        # for widths (32, 64, 64) at 16² latents (a level-ending output block counted after its
        # upsampler): 4²: in 6-8 (3x64) + mid 64 + out 0-1 (2x64) = 384;
        # 8²: in 3 (32) + in 4-5 (2x64) + out 2-4 (3x64) = 352; 16²: in 0-2 (3x32) + out 5 (64) + out 6-8 (3x32) = 256
        assert len(other_backbone.block_names) == 19 and other_backbone.block_names[-1] == "output_blocks.8"
        assert other_backbone.feature_channels() == [384, 352, 256]
        assert other_backbone.encode_prompts(["a dog"]).pooled.shape == (1, 32)
    else:
        assert other_backbone.scheduler_config["prediction_type"] == "v_prediction"
        assert (
            other_backbone.unet.config.sample_size * other_backbone.vae_scale_factor == 192
        )  # 1.5x tiny SD-1.x
        assert other_backbone.feature_channels() == [384, 352, 224, 224]
        assert other_backbone.tokenizer.pad_token == "!"


def test_sdxl_text_is_both_encoders_penultimate_states_concatenated(sdxl):
    """Independent of the pipeline's encode_prompt: run each encoder and concatenate."""
    b = sdxl
    ids = [
        tok("a photograph of a dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
        for tok in (b.tokenizer, b.tokenizer_2)
    ]
    first = b.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2]
    second = b.text_encoder_2(ids[1], output_hidden_states=True)
    embeds = b.encode_prompts(["a photograph of a dog"])
    torch.testing.assert_close(embeds.hidden, torch.cat([first, second.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(embeds.pooled, second.text_embeds)
    assert not b.unconditional_embeds(1).hidden.any()  # SDXL zeroes the empty negative prompt


def test_ddim_inversion_runs_for_v_prediction_and_sdxl(other_backbone):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds = other_backbone.encode_prompts(["a dog", "a cat"])
    inverted = other_backbone.latents_at_capture_step(latents, embeds, mode="ddim_inversion")
    assert inverted.shape == latents.shape and torch.isfinite(inverted).all()


def test_compiled_unet_generates_the_same_images_features_and_daam_maps():
    """torch.compile (aot_eager: dynamo's tracing without a compiler, as on a GPU with inductor)
    keeps the feature-capture hooks and DAAM's swapped attention processors working, call after
    call; its cache identity is the eager one's."""
    eager = StableDiffusionBackbone(BackboneConfig(num_inference_steps=4, capture_step=2))
    compiled = StableDiffusionBackbone(
        BackboneConfig(num_inference_steps=4, capture_step=2, compile_backend="aot_eager")
    )
    prompts, words = ["a photograph of a dog", "a photograph of a cat and a bus"], [["dog"], ["cat", "bus"]]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for seeds in ([0, 1], [2, 3]):  # hooks and processors are set anew on every call
        a, b = (m.generate(prompts, seeds, guidance_scale=4.0, words=words) for m in (eager, compiled))
        torch.testing.assert_close(a.images.float(), b.images.float(), atol=1, rtol=0)
        for x, y in zip([a.latents, *a.features, a.heat_maps], [b.latents, *b.features, b.heat_maps]):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did run compiled
    assert compiled.config.identity() == eager.config.identity()
    with pytest.raises(ConfigError, match="compile_backend 'inductr' is not one of"):
        StableDiffusionBackbone(BackboneConfig(compile_backend="inductr"))


def test_channels_last_unet_gives_the_same_features_and_the_same_cache_identity(backbone):
    channels_last = StableDiffusionBackbone(BackboneConfig(channels_last=True))
    assert channels_last.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    timesteps = torch.full((2,), backbone.timestep)
    plain = backbone.features(latents, timesteps, backbone.encode_prompts(["a dog", "a cat"]))
    fast = channels_last.features(latents, timesteps, channels_last.encode_prompts(["a dog", "a cat"]))
    for a, b in zip(plain, fast):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert channels_last.config.identity() == backbone.config.identity()
