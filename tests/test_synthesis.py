"""Generation with feature capture and DAAM tracing, checked against independent computations."""

from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor

from grounded_diffusion.models.backbones import BackboneConfig, StableDiffusionBackbone
from grounded_diffusion.models.daam import word_token_indices, word_token_table
from grounded_diffusion.models.tokenizer import load_clip_tokenizer, write_clip_tokenizer_files

PROMPTS = ["a photograph of a dog and a hot dog", "a photograph of a cat"]
WORDS = [["dog", "hot dog"], ["cat"]]
SEEDS = [11, 12]


@pytest.fixture(scope="module", params=["embedded/tiny-sd", "embedded/tiny-sd2", "embedded/tiny-sdxl"])
def short_backbone(request):
    """Each architecture: SD-1.x, SD-2.x (v-prediction), SDXL (two text encoders, added conditions)."""
    config = BackboneConfig(
        model_id=request.param, branches="uncond+cond", num_inference_steps=10, capture_step=2
    )
    return StableDiffusionBackbone(config)


@pytest.fixture(scope="module")
def generation(short_backbone):
    return short_backbone.generate(PROMPTS, SEEDS, guidance_scale=7.5, words=WORDS)  # whole-word matching


@pytest.fixture(scope="module")
def reference_matching(short_backbone):
    return short_backbone.generate(PROMPTS, SEEDS, guidance_scale=7.5, words=WORDS, word_matching="reference")


def reference_daam(backbone, prompt, seed, word, monkeypatch, whole_in=()):
    """DAAM as the reference package computes it, one prompt at a time, written out plainly:
    explicit attention probabilities of every down/up ``attn2``, conditional half, summed over
    steps per (layer, head, token), bicubic to the latent size, clamped, averaged over (layer,
    head), then over the word's tokens. With ``whole_in`` (the prompt's categories), the word's
    occurrences inside a longer one of them are left out."""
    unet = backbone.unet
    names = {
        m: n
        for n, m in unet.named_modules()
        if n.endswith("attn2") and n.startswith(("down_blocks", "up_blocks"))
    }
    sums = defaultdict(float)
    original = Attention.get_attention_scores

    def recording(self, query, key, attention_mask=None):
        probs = original(self, query, key, attention_mask)
        if self in names:
            sums[names[self]] = sums[names[self]] + probs[probs.shape[0] // 2 :].float()  # [heads, HW, 77]
        return probs

    processors = unet.attn_processors
    monkeypatch.setattr(Attention, "get_attention_scores", recording)
    unet.set_attn_processor(AttnProcessor())
    try:
        backbone.pipeline()(
            prompt,
            num_inference_steps=backbone.config.num_inference_steps,
            guidance_scale=7.5,
            latents=backbone.initial_noise([seed]),
            output_type="pt",
        )
    finally:
        unet.set_attn_processor(processors)
        monkeypatch.undo()
    size = unet.config.sample_size
    maps = []
    for probs in sums.values():
        side = int(probs.shape[1] ** 0.5)
        for head in probs:
            per_token = head.T.reshape(77, 1, side, side)
            maps.append(F.interpolate(per_token, size=(size, size), mode="bicubic").clamp(min=0)[:, 0])
    token_maps = torch.stack(maps).mean(0)
    ids = backbone.tokenizer(prompt).input_ids
    word_ids = backbone.tokenizer(word, add_special_tokens=False).input_ids
    starts = [i for i in range(len(ids)) if ids[i : i + len(word_ids)] == word_ids]
    for longer in [w for w in whole_in if w != word and word in w]:
        longer_ids = backbone.tokenizer(longer, add_special_tokens=False).input_ids
        inside = {
            i + k
            for i in range(len(ids))
            if ids[i : i + len(longer_ids)] == longer_ids
            for k in range(len(longer_ids))
        }
        starts = [s for s in starts if s not in inside]
    positions = [s + k for s in starts for k in range(len(word_ids))]
    return token_maps[positions].mean(0)


@pytest.mark.parametrize("matching", ["whole", "reference"])
def test_batched_daam_matches_a_per_prompt_reference(
    short_backbone, generation, reference_matching, matching, monkeypatch
):
    traced = generation if matching == "whole" else reference_matching
    size = short_backbone.unet.config.sample_size
    assert traced.heat_maps.shape == (2, 2, size, size)
    for b, (prompt, seed, words) in enumerate(zip(PROMPTS, SEEDS, WORDS)):
        for o, word in enumerate(words):
            whole_in = words if matching == "whole" else ()
            expected = reference_daam(short_backbone, prompt, seed, word, monkeypatch, whole_in)
            torch.testing.assert_close(traced.heat_maps[b, o], expected, rtol=1e-4, atol=1e-5)
    assert not traced.heat_maps[1, 1].any()  # the empty word slot of the one-object prompt
    # "hot dog" is the same either way; "dog" differs: the reference also pools the "dog" of "hot dog".
    torch.testing.assert_close(generation.heat_maps[0, 1], reference_matching.heat_maps[0, 1])
    assert not torch.allclose(generation.heat_maps[0, 0], reference_matching.heat_maps[0, 0])


def test_dog_and_hot_dog_are_different_words(generation):
    # "dog" occurs twice in "a dog and a hot dog"; "hot dog" is the last two tokens only.
    assert not torch.allclose(generation.heat_maps[0, 0], generation.heat_maps[0, 1])


def test_captured_features_are_the_unet_features_of_the_captured_latent(short_backbone, generation):
    """Replay: one UNet call on the stored latent gives the features captured during sampling."""
    timesteps = torch.full((2,), short_backbone.timestep)
    replayed = short_backbone.features(generation.latents, timesteps, short_backbone.encode_prompts(PROMPTS))
    assert [f.shape[1] for f in replayed] == [f.shape[1] for f in generation.features]
    for stored, again in zip(generation.features, replayed):
        torch.testing.assert_close(again, stored, rtol=1e-4, atol=1e-5)


def test_capture_step_latent_is_the_sampler_state_at_that_step(short_backbone, generation):
    """Independent check with the plain pipeline: stop the sampler right before the capture step."""
    pipe = short_backbone.pipeline()
    states = {}

    def keep(pipe, i, t, kwargs):
        states[i] = kwargs["latents"].clone()
        return {}

    pipe(
        PROMPTS[1],
        num_inference_steps=10,
        guidance_scale=7.5,
        latents=short_backbone.initial_noise([SEEDS[1]]),
        output_type="pt",
        callback_on_step_end=keep,
    )
    capture_index = 10 - 2  # t=2 of 10 steps is loop index 8; its input is the state after step 7
    # batch of 2 vs batch of 1: float rounding only (latents are of order 1)
    torch.testing.assert_close(generation.latents[1:], states[capture_index - 1], rtol=1e-4, atol=1e-4)


def test_images_depend_on_the_seed_not_the_batch(short_backbone, generation):
    alone = short_backbone.generate(PROMPTS[1:], SEEDS[1:], guidance_scale=7.5)
    side = short_backbone.unet.config.sample_size * short_backbone.vae_scale_factor
    assert generation.images.dtype == torch.uint8 and generation.images.shape == (2, 3, side, side)
    assert (alone.images.int() - generation.images[1:].int()).abs().max() <= 1
    assert alone.heat_maps is None


def test_both_branches_need_guidance(short_backbone):
    from grounded_diffusion.errors import ConfigError

    with pytest.raises(ConfigError, match="guidance_scale > 1"):
        short_backbone.generate(PROMPTS, SEEDS, guidance_scale=1.0)


@pytest.mark.parametrize("short_name, long_name", [("dog", "hot dog"), ("bear", "teddy bear")])
def test_whole_category_matching_leaves_out_the_word_inside_a_longer_category(
    tmp_path, short_name, long_name
):
    """Token positions counted by hand: [BOS] a(1) photograph(2) of(3) a(4) <long: 5, 6> and(7) a(8) <short: 9>."""
    tokenizer = load_clip_tokenizer(write_clip_tokenizer_files(tmp_path))
    prompt, words = f"a photograph of a {long_name} and a {short_name}", [long_name, short_name]
    assert word_token_indices(tokenizer, prompt, short_name) == [6, 9]  # the reference: every occurrence
    assert word_token_indices(tokenizer, prompt, short_name, words) == [9]
    assert word_token_indices(tokenizer, prompt, long_name, words) == [5, 6]
    # Only inside the longer name: that is all there is, so it is kept.
    assert word_token_indices(tokenizer, f"a photograph of a {long_name}", short_name, words) == [6]
    _, weights = word_token_table(tokenizer, [prompt], [words], matching="whole")
    assert weights[0].tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]  # tokens traced: 5, 6, 9
    with pytest.raises(ValueError, match="'exact' is not one of"):
        word_token_table(tokenizer, [prompt], [words], matching="exact")
