"""The shapes world's Stable Diffusion: SD-1.x's layout at a size a 2-core CPU trains in an hour.

The architecture (built here, from config) is tiny-sd's UNet and CLIP text encoder over the real
BPE vocabulary, with a 3-level VAE (4x downsampling: 64 px images, 16x16x4 latents). The weights
are trained by the project (``make world``: lightning_modules/world_autoencoder.py, then
lightning_modules/world_text_to_image.py) and ship in diffusers format under
``grounded_diffusion/shapes_world/weights/``, loaded through ``from_pretrained`` like any real checkpoint.
The wide world's models (48 categories) have the same architectures (``make world-wide``).

``embedded/shapes-dit`` is the same world's text-to-image model with SD3's layout instead: an
MM-DiT of 6 joint blocks (width 128) on 2x2 patches of the same 16x16x4 latents, two CLIP text
encoders (the CLIP-L and CLIP-G slots, width 32 each), no T5 stream, trained from scratch with
rectified flow over the shipped shapes-sd VAE (``make world-dit``).
"""

from __future__ import annotations

from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from grounded_diffusion.models.tiny_sd import tiny_clip_config, tiny_sd1_unet

SHAPES_SD_ID = "embedded/shapes-sd"
SHAPES_ORACLE_ID = "embedded/shapes-oracle"
# The wide world's (48 categories, shapes_world/render.py), trained the same way by `make world-wide`.
SHAPES_WIDE_SD_ID = "embedded/shapes-wide-sd"
SHAPES_WIDE_ORACLE_ID = "embedded/shapes-wide-oracle"
# The 20-category world's MM-DiT (SD3 layout), trained by `make world-dit`.
SHAPES_DIT_ID = "embedded/shapes-dit"
# (Where each model's weights ship and the command that retrains them: models/embedded.py.)
# Each world's models: Stable Diffusion, oracle, and the split whose unseen categories the
# world's found rates group (`python -m grounded_diffusion.shapes_world --world NAME`).
WORLD_MODELS = {
    "shapes": (SHAPES_SD_ID, SHAPES_ORACLE_ID, 1),
    "shapes_wide": (SHAPES_WIDE_SD_ID, SHAPES_WIDE_ORACLE_ID, "word_green"),
}


def shapes_vae() -> AutoencoderKL:
    """SD's VAE blocks, 3 levels (4x downsampling), narrow: flat-coloured shapes need little."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def shapes_unet() -> UNet2DConditionModel:
    """tiny-sd's UNet (SD-1.x's layout: the authors' 25 block outputs) on 16x16 latents."""
    return tiny_sd1_unet(sample_size=16)


def shapes_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(tiny_clip_config(64))


def shapes_mmdit(patch_size: int = 2) -> SD3Transformer2DModel:
    """SD3's MM-DiT at the shapes world's size: 6 joint blocks of 4 heads x 32 on the patch grid
    of 16x16x4 latents (8x8 at ``patch_size`` 2, 16x16 at 1, the UNet's finest feature grid);
    text tokens are the two CLIPs' states concatenated (32 + 32)."""
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )


def shapes_mmdit_text_encoders() -> tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection]:
    """SD3's two CLIP slots (hidden states and projected pooled embeddings), width 32 each."""
    return tuple(CLIPTextModelWithProjection(tiny_clip_config(32, projection_dim=32)) for _ in range(2))
