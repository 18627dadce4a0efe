"""The shapes world's Stable Diffusion: SD-1.x's layout at a size a 2-core CPU trains in an hour.

The architecture (built here, from config) is tiny-sd's UNet and CLIP text encoder over the real
BPE vocabulary, with a 3-level VAE (4x downsampling: 64 px images, 16x16x4 latents). The weights
are trained by the project (``make world``: lightning_modules/autoencoder.py, then
lightning_modules/text_to_image.py) and ship in diffusers format under
``grounded_diffusion/weights/``, loaded through ``from_pretrained`` like any real checkpoint.
The wide world's models (48 categories) have the same architectures (``make world-wide``).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from grounded_diffusion.models.tiny_sd import tiny_clip_config, tiny_sd1_unet

SHAPES_SD_ID = "embedded/shapes-sd"
SHAPES_ORACLE_ID = "embedded/shapes-oracle"
# The wide world's (48 categories, data/shapes_world.py), trained the same way by `make world-wide`.
SHAPES_WIDE_SD_ID = "embedded/shapes-wide-sd"
SHAPES_WIDE_ORACLE_ID = "embedded/shapes-wide-oracle"
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
# Embedded ids of the trained models -> their folders in the package.
EMBEDDED_WEIGHTS = {
    model_id: WEIGHTS_DIR / model_id.removeprefix("embedded/")
    for model_id in (SHAPES_SD_ID, SHAPES_ORACLE_ID, SHAPES_WIDE_SD_ID, SHAPES_WIDE_ORACLE_ID)
}
# Each world's models: Stable Diffusion, oracle, and the split whose unseen categories the
# world's found rates group (`python -m grounded_diffusion.world --world NAME`).
WORLD_MODELS = {
    "shapes": (SHAPES_SD_ID, SHAPES_ORACLE_ID, 1),
    "shapes_wide": (SHAPES_WIDE_SD_ID, SHAPES_WIDE_ORACLE_ID, "word_green"),
}


def retrain_command(model_id: str) -> str:
    return "make world-wide" if "wide" in model_id else "make world"


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
