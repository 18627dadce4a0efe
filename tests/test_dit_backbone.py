"""Diffusion transformers (SD3, FLUX.1, FLUX.2 [klein] and [dev]) as backbones, on their tiny offline versions: block taps,
the joint-attention baseline against a plainly written full-softmax reference, replay, batching,
rectified-flow noising and inversion, fake-CUDA paths and host syncs."""

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.pipelines.flux2.pipeline_flux2 import format_input
from test_cuda_paths import CUDA, fake_cuda, on_cuda

from grounded_diffusion.errors import ConfigError
from grounded_diffusion.models.backbones import (
    BackboneConfig,
    DiffusionTransformerBackbone,
    StableDiffusionBackbone,
    build_backbone,
)
from grounded_diffusion.models.daam import TextStream, word_token_indices, word_token_table
from grounded_diffusion.models.tiny_dit import TINY_FLUX2_DEV_ID, TINY_FLUX2_ID, TINY_FLUX_ID, TINY_SD3_ID
from host_syncs import HostSyncs

DITS = [TINY_SD3_ID, TINY_FLUX_ID, TINY_FLUX2_ID, TINY_FLUX2_DEV_ID]
# Text tokens: 16 for the prompts here, after FLUX.2 [dev]'s system message (116 tokens of the tiny vocabulary).
SEQUENCE = {TINY_FLUX2_DEV_ID: 116 + 16}
PROMPTS = ["a photograph of a dog and a cat", "a photograph of a hot dog"]
WORDS = [["dog", "cat"], ["hot dog"]]


def dit(model_id: str, **overrides) -> DiffusionTransformerBackbone:
    config = dict(
        model_id=model_id,
        image_size=128,
        max_sequence_length=SEQUENCE.get(model_id, 16),
        num_inference_steps=4,
        capture_step=2,
    )
    return build_backbone(BackboneConfig(**{**config, **overrides}))


@pytest.fixture(scope="module", params=DITS)
def backbone(request):
    return dit(request.param)


def test_tiny_dits_have_their_architectures_layouts(backbone):
    blocks = backbone.transformer.transformer_blocks
    if backbone.family == "sd3":
        assert blocks[-1].context_pre_only and not blocks[0].context_pre_only  # SD3's last block
        assert [(s.start, s.length) for s in backbone.text_streams()] == [(0, 77), (77, 16)]  # CLIP, then T5
    elif backbone.family == "flux":
        assert (
            len(backbone.transformer.single_transformer_blocks) == 2
            and backbone.transformer.config.guidance_embeds
        )
        assert [s.length for s in backbone.text_streams()] == [16]  # T5 tokens only
    elif backbone.config.model_id == TINY_FLUX2_ID:
        assert backbone.latent_shape() == (128, 8, 8)  # 32 channels, patchified 2x2
        # Qwen3's chat markup: "<|im_start|>", "user" (3 tokens in this small vocabulary), "\n"
        assert [(s.start, s.length) for s in backbone.text_streams()] == [(5, 11)]
        assert backbone.text_dim == 3 * backbone.text_encoder.config.hidden_size  # three layers' states
        assert not backbone.transformer.config.guidance_embeds
    else:  # FLUX.2 [dev]: the system message first, and a guidance embedding
        assert [(s.start, s.length) for s in backbone.text_streams()] == [(116, 16)]
        assert backbone.transformer.config.guidance_embeds and backbone.guidance_embedding == 4.0
    if backbone.family == "flux2":  # the chat markup's tokens padded to max_sequence_length
        assert backbone.encode_prompts(["a dog"]).hidden.shape[1] == backbone.max_sequence_length
    assert backbone.block_names == list(backbone.block_modules)  # 4 blocks: the default takes all
    assert backbone.grid == (8, 8) and backbone.feature_channels() == [64] * 4
    assert isinstance(build_backbone(BackboneConfig()), StableDiffusionBackbone)


def test_features_are_the_next_blocks_input_on_the_token_grid(backbone):
    """An independent read of each tapped block's image stream: what the following module takes
    (the next block's hidden_states, or the output norm's input after the last; FLUX.2's single
    blocks take the joint [text, image] sequence, whose image part is its end)."""
    embeds = backbone.encode_prompts(PROMPTS[:1])
    latents = backbone.initial_noise([3])
    inputs = []
    modules = list(backbone.block_modules.values())[1:] + [backbone.transformer.norm_out]
    handles = [
        m.register_forward_pre_hook(
            lambda m, args, kwargs: inputs.append(kwargs.get("hidden_states", args[0] if args else None)),
            with_kwargs=True,
        )
        for m in modules
    ]
    try:
        features = backbone.features(latents, torch.full((1,), backbone.timestep), embeds)
    finally:
        for handle in handles:
            handle.remove()
    for feature, tokens in zip(features, inputs):
        rows = tokens[:, -64:].unflatten(1, backbone.grid).permute(0, 3, 1, 2)  # [1, D, 8, 8], row-major
        torch.testing.assert_close(feature, rows)


def test_batched_features_equal_one_by_one(backbone):
    embeds = backbone.encode_prompts(PROMPTS)
    latents = backbone.initial_noise([1, 2])
    t = torch.full((2,), backbone.timestep)
    batched = backbone.features(latents, t, embeds)
    singles = [backbone.features(latents[i : i + 1], t[:1], embeds[i : i + 1]) for i in range(2)]
    for g, group in enumerate(batched):
        torch.testing.assert_close(group, torch.cat([s[g] for s in singles]), atol=1e-5, rtol=1e-5)


def reference_probabilities(attn, inputs: dict, image_first: bool) -> torch.Tensor:
    """Full softmax attention probabilities [B, heads, S, S] of one joint attention, written out
    from the module's weights (SD3: [image, text]; FLUX.1: [text, image] with rotary embedding)."""
    x, c = inputs["hidden_states"], inputs.get("encoder_hidden_states")

    def heads(t):
        return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # [B, heads, S, d]

    if hasattr(attn, "to_qkv_mlp_proj"):  # FLUX.2's single blocks: q, k, v and the MLP in one matmul
        q, k, _ = attn.to_qkv_mlp_proj(x)[..., : 3 * attn.inner_dim].chunk(3, -1)
        q, k = heads(q), heads(k)
    else:
        q, k = heads(attn.to_q(x)), heads(attn.to_k(x))
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    if c is not None and getattr(attn, "add_q_proj", None) is not None:
        qc, kc = heads(attn.add_q_proj(c)), heads(attn.add_k_proj(c))
        if attn.norm_added_q is not None:
            qc, kc = attn.norm_added_q(qc), attn.norm_added_k(kc)
        q, k = (
            (torch.cat([q, qc], 2), torch.cat([k, kc], 2))
            if image_first
            else (torch.cat([qc, q], 2), torch.cat([kc, k], 2))
        )
    if inputs.get("image_rotary_emb") is not None:
        q = apply_rotary_emb(q, inputs["image_rotary_emb"], sequence_dim=2)
        k = apply_rotary_emb(k, inputs["image_rotary_emb"], sequence_dim=2)
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)


@pytest.mark.parametrize("model_id", DITS)
def test_joint_attention_maps_match_a_per_prompt_full_softmax_reference(model_id):
    backbone = dit(model_id)
    latents, t = backbone.initial_noise([1, 2]), torch.full((2,), backbone.timestep)
    with backbone.trace_words(PROMPTS, WORDS) as tracer:
        backbone.features(latents, t, backbone.encode_prompts(PROMPTS))
    maps = tracer.word_maps()
    assert maps.shape == (2, 2, 8, 8)
    clip = backbone.text_modules["tokenizer"]
    clip = getattr(clip, "tokenizer", clip)  # (FLUX.2 [dev]: the tokenizer in its processor)
    for b, (prompt, words) in enumerate(zip(PROMPTS, WORDS)):
        inputs = []
        attentions = [backbone.block_modules[n].attn for n in backbone.attention_names]
        handles = [
            a.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(kwargs), with_kwargs=True)
            for a in attentions
        ]
        try:
            backbone.features(latents[b : b + 1], t[:1], backbone.encode_prompts([prompt]))
        finally:
            for handle in handles:
                handle.remove()
        probs = [reference_probabilities(a, i, not backbone.is_flux) for a, i in zip(attentions, inputs)]
        length = probs[0].shape[-1]
        pixels = 64
        text_start, image = (
            (pixels, slice(0, pixels)) if not backbone.is_flux else (0, slice(length - pixels, length))
        )
        ids = clip(prompt).input_ids  # the CLIP BPE in every slot here: the same positions in each stream
        space = ""
        # FLUX.2: the prompt in its chat markup, as its pipeline encodes it ([dev]: by its processor)
        if backbone.config.model_id == TINY_FLUX2_ID:
            markup = clip.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            ids, space = clip(markup).input_ids, " "  # byte-level BPE: a word after a space
        if backbone.config.model_id == TINY_FLUX2_DEV_ID:  # its system message, then the prompt
            conversation = format_input([prompt], backbone.pipeline().system_message)
            ids = (
                backbone.text_modules["tokenizer"]
                .apply_chat_template(
                    conversation,
                    tokenize=True,
                    return_dict=True,
                    return_tensors="pt",
                    add_generation_prompt=False,
                )["input_ids"][0]
                .tolist()
            )
            space = " "
        for o, word in enumerate(words):
            word_ids = clip(space + word, add_special_tokens=False).input_ids
            start = next(
                i
                for i in range(len(ids))
                if ids[i : i + len(word_ids)] == word_ids
                and (
                    word != "dog" or ids[i - 1] != clip(space + "hot", add_special_tokens=False).input_ids[0]
                )
            )
            positions = list(range(start, start + len(word_ids)))
            if not backbone.is_flux:
                positions += [77 + p for p in positions]  # the same word among SD3's T5 tokens
            columns = [text_start + p for p in positions]
            expected = torch.stack([p[0][:, image][..., columns].mean(0) for p in probs]).mean(0).mean(-1)
            torch.testing.assert_close(maps[b, o].flatten(), expected, atol=1e-6, rtol=1e-4)
    assert maps[1, 1].abs().sum() == 0  # the empty slot of the one-word prompt


def test_word_matching_takes_sentencepiece_tokens_without_a_bos():
    """T5's tokenizer: words start with ▁, no BOS; ``TextStream`` offsets place its tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        (f"▁{w}", -1.0) for w in "a photograph of hot dog and cat".split()
    ]
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5 = PreTrainedTokenizerFast(
        tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=32
    )
    prompt = "a photograph of a hot dog and a dog"
    assert t5.tokenize(prompt)[:2] == ["▁a", "▁photograph"]
    assert word_token_indices(t5, prompt, "dog") == [5, 8]  # no BOS: positions from 0
    assert word_token_indices(t5, prompt, "dog", others=["hot dog", "dog"]) == [8]
    index, weights = word_token_table([TextStream(t5, 77, 32)], [prompt], [["hot dog", "dog"]])
    assert index[0].tolist() == [77 + 4, 77 + 5, 77 + 8] and weights[0, 0, :2].tolist() == [0.5, 0.5]


def test_word_matching_takes_byte_level_tokens_at_the_start_and_after_a_space():
    """Qwen's byte-level BPE (FLUX.2): a word opening the text has no "Ġ", the same word after a
    space does; both are the word. Positions checked against the tokenizer's own ids."""
    from grounded_diffusion.models.tiny_dit import caption_corpus
    from grounded_diffusion.models.tokenizer import byte_level_chat_tokenizer

    qwen = byte_level_chat_tokenizer(caption_corpus())
    prompt = "dog on grass, a hot dog and a dog"
    ids, opening, inside = qwen(prompt).input_ids, qwen("dog").input_ids, qwen(" dog").input_ids
    assert opening != inside  # two different tokenizations of "dog"

    def occurrences(form):
        return [list(range(i, i + len(form))) for i in range(len(ids)) if ids[i : i + len(form)] == form]

    first, (in_hot_dog, last) = occurrences(opening), occurrences(inside)
    assert len(first) == 1 and first[0][0] == 0
    assert word_token_indices(qwen, prompt, "dog") == first[0] + in_hot_dog + last
    assert word_token_indices(qwen, prompt, "dog", others=["hot dog"]) == first[0] + last


def test_generation_captures_at_the_pipelines_capture_timestep_and_replays(backbone):
    seen = []
    handle = backbone.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(float(kwargs["timestep"][0])), with_kwargs=True
    )
    try:
        generation = backbone.generate(PROMPTS, [1, 2], 5.0, WORDS)
    finally:
        handle.remove()
    step = backbone.config.num_inference_steps - backbone.config.capture_step
    scale = 1000 if backbone.is_flux else 1  # the FLUX pipelines pass t / 1000
    calls = (
        2 if backbone.config.model_id == TINY_FLUX2_ID else 1
    )  # FLUX.2 [klein] base: cond, uncond per step
    assert len(seen) == calls * backbone.config.num_inference_steps
    assert seen[calls * step] * scale == pytest.approx(backbone.timestep, rel=1e-5)
    assert generation.images.shape == (2, 3, 128, 128)
    assert generation.latents.shape == (2, *backbone.latent_shape())
    assert generation.heat_maps.shape == (2, 2, 8, 8)
    replayed = backbone.replay_features(generation.latents, torch.full((2,), backbone.timestep), PROMPTS)
    for stored, again in zip(generation.features, replayed):
        torch.testing.assert_close(stored, again, atol=1e-5, rtol=1e-5)
    one = backbone.generate(PROMPTS[1:], [2], 5.0, WORDS[1:])
    torch.testing.assert_close(one.images, generation.images[1:], atol=1, rtol=0)
    torch.testing.assert_close(one.heat_maps[:, :1], generation.heat_maps[1:, :1], atol=1e-5, rtol=1e-4)


def test_flow_matching_noise_is_the_schedulers_and_inversion_runs_the_sampler_backwards(backbone):
    embeds = backbone.encode_prompts(PROMPTS[:1])
    clean = backbone.encode_images(torch.rand(1, 3, 128, 128) * 2 - 1)
    noise = torch.randn_like(clean)
    scheduler = backbone._schedule(backbone.config.num_inference_steps)  # the pipeline's schedule
    expected = scheduler.scale_noise(
        clean, torch.tensor([backbone.timestep]), noise
    )  # diffusers' forward process
    torch.testing.assert_close(backbone.latents_at_capture_step(clean, embeds, noise, "noise"), expected)
    # Inversion, one step: the Euler step from sigma = 0 (t = 0) up to the first sigma, by hand.
    one = dit(backbone.config.model_id, capture_step=1)
    velocity = one._transformer(clean, torch.zeros(1), embeds)
    torch.testing.assert_close(
        one.latents_at_capture_step(clean, embeds, mode="ddim_inversion"), clean + one.sigma * velocity
    )
    # Several steps: the pipeline's own Euler steps from the inverted latent, back to sigma = 0,
    # return near the start, much nearer than the noised latent lies.
    fine = dit(backbone.config.model_id, num_inference_steps=50, capture_step=10)
    inverted = fine.latents_at_capture_step(clean, embeds, mode="ddim_inversion")
    schedule = fine._schedule(50)
    schedule.set_begin_index(50 - 10)
    latents = inverted
    for t in schedule.timesteps[-10:]:
        latents = schedule.step(fine._transformer(latents, t.expand(1), embeds), t, latents).prev_sample
    assert (latents - clean).norm() < 0.1 * (inverted - clean).norm()


def test_dit_configuration_errors_name_the_setting():
    with pytest.raises(ConfigError, match="FLUX.1 is guidance-distilled"):
        dit(TINY_FLUX_ID, branches="uncond+cond")
    with pytest.raises(ConfigError, match="unknown blocks \\['transformer_blocks.9'\\]"):
        dit(TINY_SD3_ID, blocks=["transformer_blocks.9"])
    with pytest.raises(ConfigError, match="image_size 120 must be a multiple of 16"):
        dit(TINY_SD3_ID, image_size=120)
    with pytest.raises(ConfigError, match="channels_last"):
        dit(TINY_SD3_ID, channels_last=True)
    with pytest.raises(ConfigError, match="apply to diffusion transformers"):
        StableDiffusionBackbone(BackboneConfig(attention_blocks=["down_blocks.0"]))
    with pytest.raises(ConfigError, match="a diffusion transformer: build its backbone with"):
        StableDiffusionBackbone(BackboneConfig(model_id=TINY_SD3_ID))


@pytest.mark.parametrize("model_id", DITS)
def test_fusion_steps_are_the_euler_jump_from_the_capture_step_and_are_not_traced(model_id):
    """Features of a fusion step, by hand: the pipeline's schedule gives both sigmas; the velocity
    at the capture step, one Euler step to the fusion step's sigma, the blocks there. The trace
    reads the capture step's call alone."""
    fused, single = dit(model_id, capture_step=1, fusion_steps=[3]), dit(model_id, capture_step=1)
    latents, t = fused.initial_noise([1, 2]), torch.full((2,), fused.timestep)
    embeds = fused.encode_prompts(PROMPTS)
    with fused.trace_words(PROMPTS, WORDS) as tracer:
        groups = fused.features(latents, t, embeds)
    assert len(groups) == 8 and fused.feature_channels() == [64] * 8
    schedule = fused._schedule(4)
    sigma, fusion_sigma = schedule.sigmas[-2], schedule.sigmas[-4]  # steps 1 and 3 from the end
    moved = latents + (fusion_sigma - sigma) * single._transformer(latents, t, embeds)
    at_fusion_step = single.features(moved, schedule.timesteps[-3].expand(2), embeds)
    for got, want in zip(groups, single.features(latents, t, embeds) + at_fusion_step):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with single.trace_words(PROMPTS, WORDS) as plain:
        single.features(latents, t, embeds)
    torch.testing.assert_close(tracer.word_maps(), plain.word_maps())
    if model_id == TINY_SD3_ID:  # the jump on a (fake) CUDA device: no tensor left on the CPU
        with fake_cuda(fused):
            embeds = fused.encode_prompts(PROMPTS)
            on_device = fused.features(fused.initial_noise([1, 2]), t.to(CUDA), embeds)
        assert len(on_device) == 8 and all(on_cuda(g) for g in on_device)


def test_fusion_steps_are_checked_before_any_weights_load():
    with pytest.raises(ConfigError, match="fusion_steps \\[5\\] repeats a step"):
        BackboneConfig(capture_step=5, fusion_steps=[5])
    with pytest.raises(ConfigError, match="fusion_steps"):
        BackboneConfig(num_inference_steps=10, fusion_steps=[11])
    with pytest.raises(ConfigError, match="fusion_steps and features_from apply to diffusion transformers"):
        StableDiffusionBackbone(BackboneConfig(fusion_steps=[10]))


def test_sd3_with_both_guidance_branches_doubles_the_channels():
    backbone = dit(TINY_SD3_ID, branches="uncond+cond")
    features = backbone.features(
        backbone.initial_noise([1]), torch.full((1,), backbone.timestep), backbone.encode_prompts(["a dog"])
    )
    assert [f.shape[1] for f in features] == backbone.feature_channels() == [128] * 4


def test_every_dit_path_on_a_fake_cuda_device(backbone, monkeypatch):
    backbone = dit(backbone.config.model_id)  # a fresh copy: the fake mode replaces its weights
    if backbone.config.model_id == TINY_FLUX2_DEV_ID:
        # Pixtral's processor counts the image tokens in the ids it has just made: CPU tensors in a
        # real run, which the fake mode makes fake and cannot read back.
        processor = type(backbone.text_modules["tokenizer"])
        monkeypatch.setattr(processor, "_check_special_mm_tokens", lambda *args, **kwargs: None)
    with fake_cuda(backbone):
        embeds = backbone.encode_prompts(PROMPTS)
        assert on_cuda(embeds.hidden) and (embeds.pooled is None or on_cuda(embeds.pooled))
        latents = backbone.encode_images(torch.zeros(2, 3, 128, 128, device=CUDA))
        noise = backbone.initial_noise([1, 2], latents.shape[1:])
        for mode in ("noise", "ddim_inversion"):
            at_t = backbone.latents_at_capture_step(latents, embeds, noise, mode)
            assert on_cuda(at_t)
        timesteps = torch.full((2,), backbone.timestep, device=CUDA)
        with backbone.trace_words(PROMPTS, WORDS) as tracer:
            features = backbone.features(at_t, timesteps, embeds)
        assert all(on_cuda(f) for f in features) and on_cuda(tracer.word_maps())
        assert on_cuda(backbone.category_embeddings(["dog", "hot dog"]))


@pytest.mark.parametrize("model_id", DITS)
def test_dit_sampling_with_capture_and_maps_adds_no_sync_per_step(model_id):
    def syncs(steps: int):
        backbone = dit(model_id, num_inference_steps=steps, capture_step=1)
        pipe, noise = backbone.pipeline(), backbone.initial_noise([1, 2])
        if backbone.family == "flux":
            noise = pipe._pack_latents(noise, 2, *backbone.latent_shape())
        size = dict(height=128, width=128, max_sequence_length=backbone.max_sequence_length, output_type="pt")
        with HostSyncs() as plain:
            pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=5.0, latents=noise, **size)
        with HostSyncs() as ours:
            backbone.generate(PROMPTS, [1, 2], 5.0, words=WORDS)
        return plain.count, ours.count

    (plain2, ours2), (plain5, ours5) = syncs(2), syncs(5)
    assert (ours5 - ours2) == (plain5 - plain2)


def test_dit_conversion_and_replay_read_nothing_back(backbone):
    with HostSyncs() as syncs:
        embeds = backbone.encode_prompts(PROMPTS)
        latents = backbone.encode_images(torch.zeros(2, 3, 128, 128))
        at_t = backbone.latents_at_capture_step(latents, embeds, torch.randn_like(latents), "ddim_inversion")
        with backbone.trace_words(PROMPTS, WORDS) as tracer:
            backbone.replay_features(at_t, torch.full((2,), backbone.timestep), PROMPTS)
        tracer.word_maps()
    # FLUX.2's Qwen3 (transformers) reads its padding mask once per text encoding, to skip
    # building a causal mask: once per batch, never per step, and not ours to change.
    ours = {where: n for where, n in syncs.where.items() if not where.startswith("masking_utils.py")}
    assert not ours, syncs.where


@pytest.mark.parametrize("model_id", DITS)
def test_other_resolutions_change_the_grid_and_flux_shift(model_id):
    """Any side the model accepts (a multiple of the VAE's factor times the patch): 192 px is a
    12x12 token grid; FLUX.1's timestep shift depends on it, as its pipeline's does."""
    small, large = dit(model_id), dit(model_id, image_size=192)
    generation = large.generate(PROMPTS[:1], [1], 5.0, WORDS[:1])
    assert generation.images.shape == (1, 3, 192, 192) and generation.heat_maps.shape == (1, 2, 12, 12)
    assert [f.shape[-2:] for f in generation.features] == [(12, 12)] * 4
    assert (large.timestep != small.timestep) == large.is_flux


def test_flux_schnell_without_a_guidance_embedding_runs_every_path():
    """FLUX.1-schnell's transformer has no guidance embedding: the backbone gives it none."""
    from diffusers import FluxTransformer2DModel

    from grounded_diffusion.models.backbones import load_pipeline

    pipe = load_pipeline(TINY_FLUX_ID, torch.float32)
    torch.manual_seed(0)
    pipe.transformer = FluxTransformer2DModel.from_config(
        {**pipe.transformer.config, "guidance_embeds": False}
    )
    config = BackboneConfig(
        model_id=TINY_FLUX_ID, image_size=128, max_sequence_length=16, num_inference_steps=4, capture_step=1
    )
    backbone = build_backbone(config, pipeline=pipe)
    generation = backbone.generate(PROMPTS, [1, 2], 0.0, WORDS)
    replayed = backbone.replay_features(generation.latents, torch.full((2,), backbone.timestep), PROMPTS)
    for stored, again in zip(generation.features, replayed):
        torch.testing.assert_close(stored, again, atol=1e-5, rtol=1e-5)
    assert generation.heat_maps.shape == (2, 2, 8, 8)


def test_flux2_klein_distilled_calls_once_per_step_and_base_captures_the_conditional_call():
    """FLUX.2 [klein]'s distilled models skip the unconditional call; its base models make it
    after the conditional one, and the captured features and maps are the conditional call's:
    the replay (conditional only) gives them back, and they differ from the unconditional one's."""
    from grounded_diffusion.models.backbones import load_pipeline

    pipe = load_pipeline(TINY_FLUX2_ID, torch.float32)
    pipe.register_to_config(is_distilled=True)
    config = BackboneConfig(
        model_id=TINY_FLUX2_ID, image_size=128, max_sequence_length=16, num_inference_steps=4, capture_step=1
    )
    distilled = build_backbone(config, pipeline=pipe)
    calls = []
    handle = distilled.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        generation = distilled.generate(PROMPTS, [1, 2], 4.0, WORDS)
    finally:
        handle.remove()
    assert len(calls) == 4 and distilled.pipeline().config.is_distilled
    base = dit(TINY_FLUX2_ID, capture_step=1)
    inputs = []  # every call's packed latents and timestep: conditional, unconditional, ...
    handle = base.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append((kwargs["hidden_states"], kwargs["timestep"])), with_kwargs=True
    )
    try:
        guided = base.generate(PROMPTS, [1, 2], 4.0, WORDS)
    finally:
        handle.remove()
    assert len(inputs) == 8
    t = torch.full((2,), base.timestep)
    conditional = base.replay_features(guided.latents, t, PROMPTS)
    unconditional = base.features(guided.latents, t, base.encode_prompts(["", ""]))
    for stored, cond, uncond in zip(guided.features, conditional, unconditional):
        torch.testing.assert_close(stored, cond, atol=1e-5, rtol=1e-5)
        assert (stored - uncond).abs().max() > 1e-3
    # The maps: the conditional calls' joint attention alone, summed over the steps.
    embeds = base.encode_prompts(PROMPTS)
    with base.trace_words(PROMPTS, WORDS) as tracer:
        for tokens, timestep in inputs[::2]:
            base.features(tokens.transpose(1, 2).unflatten(-1, base.grid), timestep * 1000, embeds)
    torch.testing.assert_close(guided.heat_maps, tracer.word_maps(), atol=1e-6, rtol=1e-4)
    assert generation.heat_maps.shape == guided.heat_maps.shape


@pytest.mark.parametrize("model_id", ["embedded/shapes-dit", "embedded/tiny-sd3", "embedded/tiny-flux"])
def test_features_from_attention_are_the_image_tokens_attention_outputs(model_id):
    """``features_from: attention``: each tapped joint block's image-token attention output, as
    the block's own output projection (``attn.to_out[0]``) gives it, read by a hook of our own."""
    settings = (
        {"max_sequence_length": 0}
        if model_id.endswith("shapes-dit")
        else {"image_size": 128, "max_sequence_length": 16}
    )
    config = BackboneConfig(
        model_id=model_id, num_inference_steps=4, capture_step=2, features_from="attention", **settings
    )
    backbone = build_backbone(config)
    joint = [n for n in backbone.block_names if n.startswith("transformer_blocks.")]
    projected = {}
    for name in joint:
        backbone.block_modules[name].attn.to_out[0].register_forward_hook(
            lambda m, a, o, name=name: projected.__setitem__(name, o)
        )
    latents = torch.randn(1, *backbone.latent_shape(), generator=torch.Generator().manual_seed(0))
    timesteps = torch.full((1,), backbone.timestep)
    groups = backbone.features(latents, timesteps, backbone.encode_prompts(["a red circle"]))
    guidance_rows = projected[joint[0]].shape[0]
    for name in joint:
        group = groups[backbone.block_names.index(name)]
        expected = projected[name][-1:].transpose(1, 2).unflatten(-1, group.shape[-2:])  # the conditional row
        torch.testing.assert_close(group, expected)
    assert guidance_rows in (1, 2)


def test_features_from_is_refused_on_a_unet_and_checked():
    with pytest.raises(ConfigError, match="fusion_steps and features_from apply to diffusion transformers"):
        build_backbone(BackboneConfig(num_inference_steps=4, capture_step=2, features_from="attention"))
    with pytest.raises(ConfigError, match="features_from 'attn' is not one of"):
        BackboneConfig(features_from="attn")
