"""The embedded backbones: tiny, randomly initialised Stable Diffusions of each architecture.

``embedded/tiny-sd`` (the default) has SD-1.x's layout (4 UNet levels with 2 layers each, i.e. the
authors' 25 block outputs in 4 resolution groups; a VAE that downsamples 8x; a CLIP text encoder
with the real BPE tokenizer) at a width that runs on a laptop CPU. ``embedded/tiny-sd2`` is SD-2.x's
(linear projections in the transformers, v-prediction, a larger native size like 768 px, the
OpenCLIP tokenizer's "!" padding) and ``embedded/tiny-sdxl`` SDXL's (3 levels, the first without
attention, two text encoders whose hidden states are concatenated, pooled text and size
conditioning). Each is built deterministically from config, saved in diffusers format, and then
loaded through the same ``from_pretrained`` path as real weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from grounded_diffusion.data.procedural_scenes import render_scene
from grounded_diffusion.models.tokenizer import load_clip_tokenizer, write_clip_tokenizer_files

TINY_SD_ID = "embedded/tiny-sd"
TINY_SD2_ID = "embedded/tiny-sd2"
TINY_SDXL_ID = "embedded/tiny-sdxl"
# Bump when an architecture below changes, so stale copies in the cache are rebuilt.
TINY_SD_VERSION = 1
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768}  # over diffusers' defaults, which are SD-1.x's


def default_cache_root() -> Path:
    root = os.environ.get("GROUNDED_DIFFUSION_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "grounded_diffusion"


def build_tiny_stable_diffusion(seed: int = 0) -> StableDiffusionPipeline:
    """Build the tiny SD-1.x pipeline in memory (weights depend only on ``seed``)."""
    torch.manual_seed(seed)
    return assemble_pipeline(
        tiny_sd1_unet(sample_size=16), tiny_vae(sample_size=128), CLIPTextModel(tiny_clip_config(64))
    )


def tiny_sd1_unet(sample_size: int) -> UNet2DConditionModel:
    """SD-1.x's UNet layout (4 levels, 2 layers each: the authors' 25 block outputs), narrow."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_tiny_sd2(seed: int = 0) -> StableDiffusionPipeline:
    """Tiny SD-2.x: linear transformer projections, per-level head counts, v-prediction, a native
    size 1.5x SD-1.x's (768 vs 512 px), GELU text encoder, "!" padding."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=24,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=(2, 4, 8, 8),
        use_linear_projection=True,
        norm_num_groups=8,
    )
    vae = tiny_vae(sample_size=192)
    text_encoder = CLIPTextModel(tiny_clip_config(64, hidden_act="gelu", pad_token_id=0))
    scheduler = sd15_scheduler(prediction_type="v_prediction")
    return assemble_pipeline(unet, vae, text_encoder, scheduler=scheduler, pad_token="!")


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """Tiny SDXL: 3 UNet levels (the finest without attention, deeper transformers below), two
    text encoders (hidden states concatenated: 32 + 32 = 64), pooled text + size conditioning."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 size/crop numbers + pooled text
        norm_num_groups=8,
    )
    vae = tiny_vae(sample_size=128)
    text_encoder = CLIPTextModel(tiny_clip_config(32, hidden_act="gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        tiny_clip_config(32, hidden_act="gelu", projection_dim=32, pad_token_id=0)
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_clip_tokenizer(write_clip_tokenizer_files(tmp))
        tokenizer_2 = load_clip_tokenizer(tmp, pad_token="!")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=sd15_scheduler(),
        add_watermarker=False,
    )


TINY_BUILDERS = {
    TINY_SD_ID: build_tiny_stable_diffusion,
    TINY_SD2_ID: build_tiny_sd2,
    TINY_SDXL_ID: build_tiny_sdxl,
}


def tiny_clip_config(hidden_size: int, **overrides) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder over the real 49408-token vocabulary."""
    config = dict(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextConfig(**{**config, **overrides})


def tiny_vae(sample_size: int) -> AutoencoderKL:
    """A narrow SD VAE whose scaling factor is calibrated like SD's 0.18215: latents of sample
    images (procedural scenes) scaled to unit variance, so that noise at the capture step does not
    drown the image."""
    return calibrated_vae(sample_size)


def calibrated_vae(sample_size: int, latent_channels: int = 4, shift: bool = False) -> AutoencoderKL:
    """tiny_vae with ``latent_channels``; ``shift``: also centre the latents (SD3 / FLUX.1's
    ``shift_factor``)."""
    vae = sd_vae(
        sample_size=sample_size,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
    )
    latents = sample_scene_latents(vae)
    if shift:
        vae.register_to_config(shift_factor=float(latents.mean()))
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return vae


def sample_scene_latents(vae) -> torch.Tensor:
    """The VAE's latents (posterior means) of 16 procedural scenes at 128 px: what the tiny VAEs'
    latent statistics are calibrated on."""
    images = torch.stack([torch.from_numpy(render_scene(i, 128)[0]) for i in range(16)])
    with torch.no_grad():
        return vae.encode(images.permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean


def sd_vae(**config) -> AutoencoderKL:
    """SD's VAE layout (4 levels: 8x downsampling, 4 latent channels unless given) at the given widths."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **config
    )


def sd15_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """SD's scheduler configuration (1.x, 2.x and XL share it), sampling with DDIM."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def assemble_pipeline(unet, vae, text_encoder, scheduler=None, pad_token=None) -> StableDiffusionPipeline:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_clip_tokenizer(write_clip_tokenizer_files(tmp), pad_token=pad_token)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler or sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sd15_shaped_stable_diffusion(seed: int = 0) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's architecture (UNet 860 M, CLIP ViT-L/14 text encoder, SD's VAE) with
    random weights: the real shapes and costs, for benchmarks of size and speed."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = sd_vae(
        sample_size=512, block_out_channels=(128, 256, 512, 512), layers_per_block=2, scaling_factor=0.18215
    )
    text_encoder = CLIPTextModel(
        tiny_clip_config(768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    )
    return assemble_pipeline(unet, vae, text_encoder)


def ensure_tiny_stable_diffusion(
    model_id: str = TINY_SD_ID,
    cache_root: str | Path | None = None,
    builder: Callable[[], DiffusionPipeline] | None = None,
) -> Path:
    """Return the folder of a saved tiny pipeline, building it on first use (atomically) with
    ``builder`` (default: the one ``TINY_BUILDERS`` names)."""
    name = model_id.split("/")[-1]
    folder = Path(cache_root or default_cache_root()) / f"{name}-v{TINY_SD_VERSION}"
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tiny-sd-"))
    try:
        pipe: DiffusionPipeline = (builder or TINY_BUILDERS[model_id])()
        pipe.save_pretrained(tmp)
        # diffusers saves the tokenizer as tokenizer.json; older readers want vocab.json + merges.txt.
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            tokenizer = getattr(pipe, name, None)
            if isinstance(tokenizer, CLIPTokenizer) and (tmp / name).is_dir():
                write_clip_tokenizer_files(tmp / name, pad_token=tokenizer.pad_token)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            if not (folder / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
