"""The embedded default backbone: a tiny, randomly initialised Stable Diffusion.

It has SD-1.x's layout (4 UNet levels with 2 layers each, i.e. the authors' 25 block outputs in
4 resolution groups; a VAE that downsamples 8x; a CLIP text encoder with the real BPE tokenizer)
at a width that runs on a laptop CPU. It is built deterministically from config, saved in diffusers
format, and then loaded through the same ``from_pretrained`` path as real weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from grounded_diffusion.data.scenes import render_scene
from grounded_diffusion.models.tokenizer import load_clip_tokenizer, write_clip_tokenizer_files

TINY_SD_ID = "embedded/tiny-sd"
# Bump when the architecture below changes, so stale copies in the cache are rebuilt.
TINY_SD_VERSION = 1


def default_cache_root() -> Path:
    root = os.environ.get("GROUNDED_DIFFUSION_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "grounded_diffusion"


def build_tiny_stable_diffusion(seed: int = 0) -> StableDiffusionPipeline:
    """Build the tiny pipeline in memory (weights depend only on ``seed``)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = sd_vae(sample_size=128, block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    # Like SD's 0.18215: scale latents to unit variance over sample images (procedural scenes),
    # so that noise at the capture step does not drown the image.
    images = torch.stack([torch.from_numpy(render_scene(i, 128)[0]) for i in range(16)])
    with torch.no_grad():
        latents = vae.encode(images.permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return assemble_pipeline(unet, vae, text_encoder)


def sd_vae(**config) -> AutoencoderKL:
    """SD's VAE layout (4 levels: 8x downsampling, 4 latent channels) at the given widths."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, **config
    )


def sd15_scheduler() -> DDIMScheduler:
    """SD-1.x's scheduler configuration, sampling with DDIM."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def assemble_pipeline(unet, vae, text_encoder) -> StableDiffusionPipeline:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_clip_tokenizer(write_clip_tokenizer_files(tmp))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sd15_shaped_stable_diffusion(seed: int = 0) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's architecture (UNet 860 M, CLIP ViT-L/14 text encoder, SD's VAE) with
    random weights: the real shapes and costs, for benchmarks of size and speed."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD-1.x's
    vae = sd_vae(sample_size=512, block_out_channels=(128, 256, 512, 512), layers_per_block=2, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    )  # fmt: skip
    return assemble_pipeline(unet, vae, text_encoder)


def ensure_tiny_stable_diffusion(cache_root: str | Path | None = None) -> Path:
    """Return the folder of the saved tiny pipeline, building it on first use (atomically)."""
    folder = Path(cache_root or default_cache_root()) / f"tiny-sd-v{TINY_SD_VERSION}"
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tiny-sd-"))
    try:
        pipe = build_tiny_stable_diffusion()
        pipe.save_pretrained(tmp)
        # diffusers saves the tokenizer as tokenizer.json; older readers want vocab.json + merges.txt.
        write_clip_tokenizer_files(tmp / "tokenizer")
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            if not (folder / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
