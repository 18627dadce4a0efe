"""ConceptAttention on the tiny diffusion transformers (SD3, FLUX.1, FLUX.2 [klein] and [dev]):
its maps against an independent computation written here from the method's equations, the
generated image unchanged bit for bit, two concepts that swap their maps when swapped, and its
settings' and a UNet's errors in one line."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from test_dit_backbone import DITS, PROMPTS, dit

from grounded_diffusion.errors import ConfigError
from grounded_diffusion.models.backbones import BackboneConfig, StableDiffusionBackbone

WORDS = [["dog", "cat"], ["hot dog"]]


@pytest.fixture(scope="module", params=DITS)
def backbone(request):
    return dit(request.param, concept_blocks=None)


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulation(block, stream: str, call: dict, batch: int, family: str):
    """(shift, scale, gate) of attention and of the MLP for ``stream`` ("image" or "text") as
    [B, 1, D] each, from the block's modulation layers applied to the timestep embedding by hand:
    SD3 / FLUX.1's AdaLayerNormZero is linear(silu(temb)) cut in six; FLUX.2's transformer hands
    the block its six (``temb_mod_img`` / ``temb_mod_txt``)."""
    if family == "flux2":
        mod = call["temb_mod_img" if stream == "image" else "temb_mod_txt"][-batch:]
        return [m.reshape(batch, 1, -1) for m in mod.chunk(6, -1)]
    norm = block.norm1 if stream == "image" else block.norm1_context
    emb = norm.linear(F.silu(call["temb"][-batch:]))
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = (m[:, None] for m in emb.chunk(6, -1))
    return shift, scale, gate, shift_mlp, scale_mlp, gate_mlp


def heads(x, attn, norm=None):
    x = x.unflatten(-1, (attn.heads, -1))  # [B, S, heads, d]
    return norm(x) if norm is not None else x


def reference_maps(backbone, calls: list[dict], tokens, real, weights) -> torch.Tensor:
    """The categories' and background concepts' maps [B, C, N] of one transformer call, block by
    block from each joint block's inputs: the model's joint attention written as a full softmax,
    the concepts modulated, projected and normed as the text stream, attending over [concepts;
    image], updated by the text stream's residual and MLP; dot products in the heads' output
    space, mean over each concept's tokens, softmax over the concepts; mean over the traced blocks."""
    family, batch = backbone.family, tokens.shape[0]
    pixels = backbone.grid[0] * backbone.grid[1]
    concepts, maps = tokens.float(), []
    for number, call in enumerate(calls):
        block = backbone.transformer.transformer_blocks[number]
        attn = block.attn
        image, text = call["hidden_states"][-batch:], call["encoder_hidden_states"][-batch:]
        shift, scale, *_ = modulation(block, "image", call, batch, family)
        image_in = layer_norm(image) * (1 + scale) + shift
        text_mod = (
            modulation(block, "text", call, batch, family)
            if not getattr(block, "context_pre_only", False)
            else None
        )
        if text_mod is None:  # SD3's last block: AdaLayerNormContinuous, scale before shift
            emb = block.norm1_context.linear(F.silu(call["temb"][-batch:]))
            c_scale, c_shift = (m[:, None] for m in emb.chunk(2, -1))
            text_in, concepts_in = (layer_norm(x) * (1 + c_scale) + c_shift for x in (text, concepts))
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = text_mod
            text_in, concepts_in = (layer_norm(x) * (1 + c_scale) + c_shift for x in (text, concepts))
        q_i, k_i, v_i = (
            heads(attn.to_q(image_in), attn, attn.norm_q),
            heads(attn.to_k(image_in), attn, attn.norm_k),
            heads(attn.to_v(image_in), attn),
        )
        q_t, k_t, v_t = (
            heads(attn.add_q_proj(text_in), attn, attn.norm_added_q),
            heads(attn.add_k_proj(text_in), attn, attn.norm_added_k),
            heads(attn.add_v_proj(text_in), attn),
        )
        if backbone.text_first:  # FLUX: [text, image], the rotary embedding on both
            q, k, v = (torch.cat(pair, 1) for pair in ((q_t, q_i), (k_t, k_i), (v_t, v_i)))
            q, k = (apply_rotary_emb(x, call["image_rotary_emb"], sequence_dim=1) for x in (q, k))
            image_rows = slice(q.shape[1] - pixels, q.shape[1])
        else:  # SD3: [image, text]
            q, k, v = (torch.cat(pair, 1) for pair in ((q_i, q_t), (k_i, k_t), (v_i, v_t)))
            image_rows = slice(0, pixels)
        d = q.shape[-1]
        q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))  # [B, heads, S, d]
        joint = ((q @ k.transpose(-1, -2)) * d**-0.5).softmax(-1) @ v
        image_out = joint[:, :, image_rows].transpose(1, 2).flatten(2)  # [B, N, heads * d]
        k_img, v_img = k[:, :, image_rows], v[:, :, image_rows]
        q_c = heads(attn.add_q_proj(concepts_in), attn, attn.norm_added_q).transpose(1, 2).float()
        k_c = heads(attn.add_k_proj(concepts_in), attn, attn.norm_added_k).transpose(1, 2).float()
        v_c = heads(attn.add_v_proj(concepts_in), attn).transpose(1, 2).float()
        logits = (q_c @ torch.cat([k_c, k_img], 2).transpose(-1, -2)) * d**-0.5
        hidden = torch.cat([~real, torch.zeros(batch, pixels, dtype=torch.bool)], 1)
        logits = logits.masked_fill(hidden[:, None, None, :], float("-inf"))
        concept_out = (logits.softmax(-1) @ torch.cat([v_c, v_img], 2)).transpose(1, 2).flatten(2)
        if number in backbone.concept_blocks:
            pooled = weights @ (concept_out @ image_out.transpose(1, 2))  # [B, C, N]
            pooled = pooled.masked_fill(weights.sum(-1)[..., None] == 0, float("-inf"))
            maps.append(pooled.softmax(1))
        if text_mod is not None:
            concepts = concepts + c_gate * attn.to_add_out(concept_out)
            concepts = concepts + c_gate_mlp * block.ff_context(
                layer_norm(concepts) * (1 + c_scale_mlp) + c_shift_mlp
            )
    return torch.stack(maps).mean(0)


def test_maps_match_an_independent_computation_from_the_equations(backbone):
    prompts = PROMPTS
    embeds = backbone.encode_prompts(prompts)
    latents = backbone.initial_noise([3, 4])
    timesteps = torch.full((2,), backbone.timestep)
    blocks = backbone.transformer.transformer_blocks
    calls = [None] * (max(backbone.concept_blocks) + 1)

    def recorder(number):
        def hook(module, args, kwargs):
            calls[number] = dict(kwargs)

        return hook

    handles = [blocks[i].register_forward_pre_hook(recorder(i), with_kwargs=True) for i in range(len(calls))]
    try:
        with backbone.trace_concepts(WORDS) as tracer:
            backbone.features(latents, timesteps, embeds)
    finally:
        for handle in handles:
            handle.remove()
    tokens, real, weights, categories = backbone.concept_tokens(WORDS)
    assert categories == 2 and weights.shape[1] == 3  # two categories at most, then "background"
    expected = reference_maps(backbone, calls, tokens, real, weights)
    torch.testing.assert_close(tracer.concept_maps().flatten(2), expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(
        tracer.concept_maps().sum(1), torch.ones(1)
    )  # a softmax over each sample's concepts
    assert tracer.word_maps().shape == (2, 2, *backbone.grid)


def test_concepts_leave_the_generated_image_unchanged_bit_for_bit(backbone):
    plain = backbone.generate(PROMPTS, [1, 2], guidance_scale=4.0)
    traced = backbone.generate(PROMPTS, [1, 2], guidance_scale=4.0, words=WORDS)
    assert plain.concept_maps is None and traced.concept_maps.shape == (2, 2, *backbone.grid)
    assert torch.equal(plain.images, traced.images) and torch.equal(plain.latents, traced.latents)
    for ours, theirs in zip(plain.features, traced.features):
        assert torch.equal(ours, theirs)
    assert torch.isfinite(traced.concept_maps).all() and traced.concept_maps.amax() > 0


def test_swapping_two_concepts_swaps_their_maps(backbone):
    embeds = backbone.encode_prompts(PROMPTS[:1])
    latents, timesteps = backbone.initial_noise([5]), torch.full((1,), backbone.timestep)
    maps = []
    for words in (["dog", "cat"], ["cat", "dog"]):
        with backbone.trace_concepts([words]) as tracer:
            backbone.features(latents, timesteps, embeds)
        maps.append(tracer.word_maps()[0])
    torch.testing.assert_close(maps[0][0], maps[1][1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps[0][1], maps[1][0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(maps[0][0], maps[0][1])  # (the two maps differ)


def test_concept_settings_and_a_unet_are_refused_in_one_line():
    from test_dit_backbone import TINY_SD3_ID

    with pytest.raises(ConfigError, match=r"concept_blocks: \['single_transformer_blocks.0'\] are not joint"):
        dit(TINY_SD3_ID, concept_blocks=["single_transformer_blocks.0"])
    with pytest.raises(ConfigError, match="ConceptAttention runs on diffusion transformers .* UNet"):
        StableDiffusionBackbone(BackboneConfig()).trace_concepts([["dog"]])
