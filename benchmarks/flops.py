"""FLOPs of one UNet forward, counted by PyTorch's ``FlopCounterMode`` on a copy of the UNet built
from its config on the meta device: no weights, no memory, no arithmetic, seconds even at SD-1.5
size. The GPU throughput bound divides the card's matmul rate by this count.

    python benchmarks/flops.py      # the SD-1.5-shaped UNet (0.80 TFLOP) and the embedded tiny one
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from grounded_diffusion.models.tiny_sd import SD15_UNET, TINY_SD_ID, ensure_tiny_stable_diffusion

TEXT_TOKENS = 77  # CLIP's context length: the text an SD-1.x/2.x UNet attends to


def unet_forward_tflop(config: dict) -> float:
    """TFLOP of one forward of the ``UNet2DConditionModel`` of this config (diffusers' defaults fill
    what it leaves out) for one sample at its ``sample_size`` latent, attending to 77 text tokens.
    A multiply-add counts as 2 FLOPs; convolutions, linear layers and attention's matmuls count."""
    if config.get("addition_embed_type"):
        raise ValueError(
            f"unet_forward_tflop counts SD-1.x/2.x UNets; addition_embed_type "
            f"{config['addition_embed_type']!r} (SDXL) needs inputs it does not build"
        )
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        size = unet.config.sample_size
        latent = torch.empty(1, unet.config.in_channels, size, size)
        text = torch.empty(1, TEXT_TOKENS, unet.config.cross_attention_dim)
        with FlopCounterMode(display=False) as counter:
            unet(latent, torch.tensor([500]), encoder_hidden_states=text)
    return counter.get_total_flops() / 1e12


def tiny_sd_unet_config() -> dict:
    return UNet2DConditionModel.load_config(ensure_tiny_stable_diffusion(TINY_SD_ID) / "unet")


def main() -> None:
    tiny = tiny_sd_unet_config()
    print(f"SD-1.5-shaped UNet, 64² latent: {unet_forward_tflop(SD15_UNET):.3f} TFLOP per forward and sample")
    print(f"embedded/tiny-sd UNet, {tiny['sample_size']}² latent: {unet_forward_tflop(tiny) * 1e3:.3f} GFLOP")


if __name__ == "__main__":
    main()
