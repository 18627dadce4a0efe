"""The embedded diffusion transformers: tiny, randomly initialised SD3, FLUX.1 and FLUX.2, built from config.

``embedded/tiny-sd3`` has SD3's layout: an MM-DiT whose joint blocks attend over [image, text]
tokens (the last block context-pre-only), two CLIP text encoders (hidden states concatenated on
channels, pooled embeddings too), a third text stream in T5's slot appended after CLIP's 77
tokens, a 16-channel VAE with a shift factor, and rectified-flow sampling (shift 3).
``embedded/tiny-flux`` has FLUX.1-dev's: double-stream blocks, then single-stream blocks over
[text, image] with rotary position ids, 2x2-packed latents, CLIP's pooled embedding beside the T5
stream, the guidance embedding, and timestep shifting that depends on the image size.
``embedded/tiny-flux2`` has FLUX.2 [klein]'s: double- then single-stream blocks (the single ones
return the joint sequence unsplit), 4-axis rotary ids, a 32-channel VAE whose latents are
patchified 2x2 and normalised by its batch-norm statistics, and one text stream: a Qwen3
language model's hidden states from three of its layers, read from the prompt wrapped in Qwen3's
chat markup; sampled with classifier-free guidance as FLUX.2 [klein]'s base models are.
``embedded/tiny-flux2-dev`` is FLUX.2 [dev]'s: the same transformer with a guidance embedding, and
its text from a Mistral 3 (with a tiny Pixtral vision tower, unused for text) behind a Pixtral
processor, whose chat markup puts a system message before the prompt.

Both generate 128 px images (16x16 latents, an 8x8 token grid) and are saved in diffusers format
and loaded through ``from_pretrained``, as the tiny UNets are. Offline, T5's sentencepiece
vocabulary is not available: the T5 slot holds a T5 encoder over the real CLIP BPE vocabulary
(the pipelines only call the tokenizer and encoder they are given). Real SD3 / FLUX.1 weights bring
their own T5 tokenizer; the word-to-token matching (``models.daam.word_token_indices``) takes
either. Qwen3's vocabulary is not available either: FLUX.2's slot holds Qwen's tokenizer class
over a byte-level BPE learned from the project's category names and captions
(``models.tokenizer.byte_level_chat_tokenizer``); FLUX.2 [dev]'s processor holds the same
tokenizer with Mistral's instruction tokens and a chat template in Mistral's markup.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
)

from grounded_diffusion.data.vocabulary import COCO, PASCAL_VOC
from grounded_diffusion.models.tiny_sd import calibrated_vae, sample_scene_latents, tiny_clip_config
from grounded_diffusion.models.tokenizer import (
    byte_level_chat_tokenizer,
    load_clip_tokenizer,
    write_clip_tokenizer_files,
)
from grounded_diffusion.shapes_world.render import ONE_OBJECT_CAPTION, SHAPES_WIDE, TWO_OBJECT_CAPTION

TINY_SD3_ID = "embedded/tiny-sd3"
TINY_FLUX_ID = "embedded/tiny-flux"
TINY_FLUX2_ID = "embedded/tiny-flux2"
TINY_FLUX2_DEV_ID = "embedded/tiny-flux2-dev"
# Mistral's markup (Tekken's chat template, text only): the system message, then instruction turns.
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "[SYSTEM_PROMPT]{{ message['content'][0]['text'] }}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{{ message['content'][0]['text'] }}[/INST]{% endif %}{% endfor %}"
)
MISTRAL_SPECIAL_TOKENS = [
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[INST]",
    "[/INST]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
]
TINY_DIT_IMAGE_SIZE = 128  # FLUX.1 has no native size in its config (its pipeline assumes 1024)


def tiny_t5(d_model: int) -> T5EncoderModel:
    """A 2-layer T5 encoder over the CLIP BPE vocabulary (see the module's docstring)."""
    config = T5Config(
        vocab_size=49408,
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=d_model // 4,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=49407,
        eos_token_id=49407,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def dit_vae() -> AutoencoderKL:
    """tiny-sd's VAE with SD3 / FLUX.1's 16 latent channels, shifted and scaled to zero mean and
    unit variance on sample scenes (what SD3's shift_factor and scaling_factor do)."""
    return calibrated_vae(sample_size=TINY_DIT_IMAGE_SIZE, latent_channels=16, shift=True)


def clip_tokenizers(*pad_tokens: str | None) -> list:
    """The real CLIP BPE tokenizer, once per text stream (each with its padding token)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_clip_tokenizer_files(tmp)
        return [load_clip_tokenizer(folder, pad_token=pad) for pad in pad_tokens]


def build_tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """Tiny SD3: 4 joint blocks (4 heads of 16), CLIP-L / CLIP-G stand-ins of width 32 each (64
    concatenated), a T5 stream of width 64, patch size 2."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=64,
        pooled_projection_dim=64,
        out_channels=16,
        pos_embed_max_size=32,
    )
    clip_l = CLIPTextModelWithProjection(_clip(projection_dim=32))
    clip_g = CLIPTextModelWithProjection(_clip(projection_dim=32, pad_token_id=0))
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizers(None, "!", None)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=dit_vae(),
        text_encoder=clip_l,
        tokenizer=tokenizer,
        text_encoder_2=clip_g,
        tokenizer_2=tokenizer_2,
        text_encoder_3=tiny_t5(64),
        tokenizer_3=tokenizer_3,
    )


def build_tiny_flux(seed: int = 0) -> FluxPipeline:
    """Tiny FLUX.1-dev: 2 double-stream and 2 single-stream blocks (4 heads of 16, rotary axes
    4 + 6 + 6), guidance embedding, a CLIP of width 32 (pooled) and a T5 stream of width 64."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels, packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096
    )
    tokenizer, tokenizer_2 = clip_tokenizers(None, None)
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=dit_vae(),
        text_encoder=CLIPTextModel(_clip()),
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5(64),
        tokenizer_2=tokenizer_2,
    )


def build_tiny_flux2(seed: int = 0) -> Flux2KleinPipeline:
    """Tiny FLUX.2 [klein] base: 2 double-stream and 2 single-stream blocks (4 heads of 16, rotary
    axes 4 x 4), no guidance embedding, a 27-layer Qwen3 of width 16 (the pipeline reads layers 9,
    18 and 27: a 48-wide text stream), a 32-channel VAE."""
    torch.manual_seed(seed)
    transformer = tiny_flux2_transformer(guidance_embeds=False)
    tokenizer = byte_level_chat_tokenizer(caption_corpus())
    text_encoder = Qwen3ForCausalLM(Qwen3Config(**tiny_llm_config(tokenizer, num_hidden_layers=27)))
    return Flux2KleinPipeline(
        scheduler=flux2_scheduler(),
        vae=flux2_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )


def build_tiny_flux2_dev(seed: int = 0) -> Flux2Pipeline:
    """Tiny FLUX.2 [dev]: tiny FLUX.2's transformer with a guidance embedding, and a 30-layer
    Mistral 3 of width 16 (the pipeline reads layers 10, 20 and 30) behind a Pixtral processor."""
    torch.manual_seed(seed)
    transformer = tiny_flux2_transformer(guidance_embeds=True)
    tokenizer = byte_level_chat_tokenizer(caption_corpus())
    tokenizer.add_special_tokens({"additional_special_tokens": MISTRAL_SPECIAL_TOKENS})
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(), tokenizer=tokenizer, chat_template=MISTRAL_CHAT_TEMPLATE
    )
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8
    )
    config = Mistral3Config(
        text_config=MistralConfig(**tiny_llm_config(tokenizer, num_hidden_layers=30)),
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=1,
    )
    return Flux2Pipeline(
        scheduler=flux2_scheduler(),
        vae=flux2_vae(),
        text_encoder=Mistral3ForConditionalGeneration(config),
        tokenizer=processor,
        transformer=transformer,
    )


def tiny_flux2_transformer(guidance_embeds: bool) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,  # 32 latent channels, patchified 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=48,  # three layers' hidden states of a 16-wide language model
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def tiny_llm_config(tokenizer, num_hidden_layers: int) -> dict:
    """A language model of width 16 over ``tokenizer``'s vocabulary, deep enough for the layers
    the FLUX.2 pipelines read."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )


def flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)


def flux2_vae() -> AutoencoderKLFlux2:
    """FLUX.2's VAE layout at tiny widths (32 latent channels), its batch-norm statistics (which
    normalise the 2x2-patchified latents) measured on sample scenes."""
    vae = AutoencoderKLFlux2(
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=32
    )
    patches = Flux2KleinPipeline._patchify_latents(sample_scene_latents(vae))
    vae.bn.running_mean.copy_(patches.mean((0, 2, 3)))
    vae.bn.running_var.copy_(patches.var((0, 2, 3)))
    return vae


def caption_corpus() -> list[str]:
    """What the tiny FLUX.2 tokenizer learns its merges from: every category of the datasets and
    worlds, in the captions' template."""
    names = [*PASCAL_VOC, *COCO, *SHAPES_WIDE]
    return [ONE_OBJECT_CAPTION.format(c1=n) for n in names] + [
        TWO_OBJECT_CAPTION.format(c1=a, c2=b) for a, b in zip(names, names[1:])
    ]


def _clip(**overrides) -> CLIPTextConfig:
    return tiny_clip_config(32, hidden_act="gelu", **overrides)


TINY_DIT_BUILDERS = {
    TINY_SD3_ID: build_tiny_sd3,
    TINY_FLUX_ID: build_tiny_flux,
    TINY_FLUX2_ID: build_tiny_flux2,
    TINY_FLUX2_DEV_ID: build_tiny_flux2_dev,
}
