"""Offload from config (``backbone.offload``): diffusers' hooks bring each model (or each block)
to the device while it runs. The capture hooks and the training-free baselines' tracers must see
the same blocks and give the same features and maps. Run here with the CPU as the onload device:
the hooks are the real ones, only the transfer is a no-op."""

import pytest
import torch

from grounded_diffusion.errors import ConfigError
from grounded_diffusion.models.backbones import BackboneConfig, StableDiffusionBackbone, build_backbone
from grounded_diffusion.shapes_world.models import SHAPES_DIT_ID

UNET = dict(num_inference_steps=4, capture_step=2)
DIT = dict(model_id=SHAPES_DIT_ID, max_sequence_length=0, num_inference_steps=4, capture_step=2)


def generate(config: BackboneConfig, offload_to: torch.device | None = None):
    backbone = build_backbone(config)
    if offload_to is not None:
        backbone._enable_offload(offload_to)
    return backbone.generate(
        ["a red circle and a blue square"], seeds=[0], words=[["red circle", "blue square"]]
    )


@pytest.mark.parametrize("settings", [UNET, DIT], ids=["unet", "dit"])
@pytest.mark.parametrize("offload", ["model", "group"])
def test_offloaded_backbones_capture_and_trace_the_same_blocks(settings, offload):
    reference = generate(BackboneConfig(**settings))
    got = generate(BackboneConfig(**settings, offload=offload), torch.device("cpu"))
    for a, b in zip(got.features, reference.features):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got.heat_maps, reference.heat_maps)
    if got.concept_maps is not None:
        torch.testing.assert_close(got.concept_maps, reference.concept_maps)
    torch.testing.assert_close(got.images, reference.images, atol=1, rtol=0)


def test_sequential_offload_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="offload 'sequential' is not one of"):
        BackboneConfig(offload="sequential")


def test_moving_an_offloaded_backbone_enables_offload_instead(monkeypatch):
    """Lightning's ``.to(device)`` of the module: the models stay where they are, and offload is
    enabled for that device; a move to the CPU is an ordinary move."""
    backbone = StableDiffusionBackbone(BackboneConfig(**UNET, offload="model"))
    targets = []
    monkeypatch.setattr(backbone, "_enable_offload", targets.append)
    backbone.to("meta")
    assert targets == [torch.device("meta")]
    assert next(backbone.unet.parameters()).device.type == "cpu"
    backbone.to("cpu")
    assert targets == [torch.device("meta")]
