"""benchmarks/flops.py: the UNet FLOP count behind the GPU throughput bound."""

import importlib.util
from pathlib import Path

import pytest

from grounded_diffusion.models.tiny_sd import SD15_UNET

spec = importlib.util.spec_from_file_location("flops", Path(__file__).parents[1] / "benchmarks" / "flops.py")
flops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(flops)


def test_sd15_unet_forward_is_the_published_0_80_tflop():
    """The figure issue 10 and the SD literature give for one SD-1.5 UNet forward at a 64² latent."""
    assert flops.unet_forward_tflop(SD15_UNET) == pytest.approx(0.80, abs=0.005)


def test_a_one_block_unet_by_hand():
    """One 32-channel level without attention at an 8² latent (64 positions), counted by hand:
    2 FLOPs per multiply-add of each convolution and linear layer, in the order of the forward."""
    unet = {
        "sample_size": 8,
        "block_out_channels": (32,),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "down_block_types": ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",),
        "mid_block_type": None,
    }
    conv3 = lambda c_in, c_out: 2 * c_in * c_out * 9 * 64  # noqa: E731
    time_embedding = 2 * 32 * 128 + 2 * 128 * 128  # the sinusoid's 32 channels -> 128 -> 128
    conv_in = conv3(4, 32)
    down_resnet = conv3(32, 32) + 2 * 128 * 32 + conv3(32, 32)  # conv, time projection, conv
    # two up resnets, each over its input and a skip (32 + 32 channels), with a 1x1 shortcut
    up_resnets = 2 * (conv3(64, 32) + 2 * 128 * 32 + conv3(32, 32) + 2 * 64 * 32 * 64)
    conv_out = conv3(32, 4)
    by_hand = time_embedding + conv_in + down_resnet + up_resnets + conv_out
    assert flops.unet_forward_tflop(unet) * 1e12 == by_hand == 10_321_920


def test_an_sdxl_unet_is_refused_by_name():
    with pytest.raises(ValueError, match="addition_embed_type 'text_time'"):
        flops.unet_forward_tflop({"addition_embed_type": "text_time"})
