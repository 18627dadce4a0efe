"""The memory planner (grounded_diffusion/memory_plan.py) against published figures: the real
backbones' parameter counts from their shipped architecture configs, FLUX.1-dev's measured peak on
an H100, and the storage of weights a backend really quantized."""

import json

import pytest
import torch

from grounded_diffusion import memory_plan
from grounded_diffusion.cli import main
from grounded_diffusion.errors import ConfigError
from grounded_diffusion.memory_plan import (
    ARCHITECTURES,
    GB,
    architecture,
    build_on_meta,
    count_parameters,
    format_plan,
    parse_memory,
    plan_memory,
    smallest_change,
    with_memory_settings,
)
from grounded_diffusion.models.backbones import BackboneConfig, build_backbone
from grounded_diffusion.models.backbones.quantization import stored_bytes
from grounded_diffusion.shapes_world.models import SHAPES_DIT_ID

# (model id, denoiser, published parameters, tolerance): 1 %, or the rounding of a figure published
# with two significant digits (SDXL's "2.6B").
PUBLISHED = [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "unet", 860e6, 0.01),  # model card: "860M UNet"
    ("stabilityai/stable-diffusion-xl-base-1.0", "unet", 2.6e9, 0.05 / 2.6),  # SDXL paper, Tab. 1: 2.6B
    ("stabilityai/stable-diffusion-3.5-large", "transformer", 8.1e9, 0.01),  # model card: 8.1 billion
    ("black-forest-labs/FLUX.1-dev", "transformer", 11.9e9, 0.01),  # diffusers' count of the 12B model
    ("black-forest-labs/FLUX.2-dev", "transformer", 32e9, 0.01),  # model card: 32 billion
    ("black-forest-labs/FLUX.2-dev", "text_encoder", 24e9, 0.01),  # Mistral Small 3.1: 24B
]
# diffusers' quantization benchmark (huggingface.co/blog/diffusers-quantization, its CSV): FLUX.1-dev
# in BF16 without offload on an H100, peak 36.166 as torch.cuda.max_memory_allocated / 2**30.
FLUX_DEV_PEAK = 36.166 * 2**30


@pytest.mark.parametrize(("model_id", "component", "published", "tolerance"), PUBLISHED)
def test_parameter_counts_of_the_shipped_architectures_match_the_published_ones(
    model_id, component, published, tolerance
):
    spec = architecture(model_id)["components"][component]
    count = count_parameters(build_on_meta(spec, torch.bfloat16))
    assert abs(count / published - 1) <= tolerance, count


def test_every_shipped_architecture_names_its_source():
    for model_id, arch in json.loads(ARCHITECTURES.read_text()).items():
        if not model_id.startswith("_"):
            assert all(c["source"].startswith("https://huggingface.co/") for c in arch["components"].values())


def test_flux_dev_peak_at_1024_px_is_within_20_percent_of_the_measured_one():
    plan = plan_memory(
        BackboneConfig(model_id="black-forest-labs/FLUX.1-dev", dtype="bfloat16"), batch_size=1
    )
    assert plan.image_size == 1024
    peak = plan.peak("predict")
    assert abs(peak / FLUX_DEV_PEAK - 1) < 0.2, peak / FLUX_DEV_PEAK
    # its weights alone, as the benchmark's "memory after loading" (31.447 GiB)
    weights = sum(c.weight_bytes for c in plan.components.values())
    assert abs(weights / (31.447 * 2**30) - 1) < 0.01


DIT = {"model_id": SHAPES_DIT_ID, "max_sequence_length": 0}
INT8 = {"transformer": {"backend": "torchao", "type": "int8wo"}}


@pytest.fixture(scope="module")
def dit_plan():
    """The shapes world's MM-DiT planned once (batch 1); the tests below vary its memory settings."""
    return plan_memory(BackboneConfig(**DIT))


def test_a_quantized_tiny_backbone_plans_the_storage_the_backend_really_uses(dit_plan):
    """int8 weight-only: the transformer's planned weights a quarter of float32's (the plan of the
    quantized config, measured), and within 5 % of what torchao stores once it has quantized the
    real weights."""
    plain = dit_plan.components["transformer"].weight_bytes
    planned = plan_memory(BackboneConfig(**DIT, quantization=INT8)).components["transformer"].weight_bytes
    real = stored_bytes(build_backbone(BackboneConfig(**DIT, quantization=INT8)).denoiser)
    assert 3.3 < plain / planned < 4.0
    assert abs(planned / real - 1) < 0.05, (planned, real)
    variant = with_memory_settings(dit_plan, BackboneConfig(**DIT, quantization=INT8))
    assert variant.components["transformer"].weight_bytes == planned


def test_offload_lowers_the_planned_peak_in_order(dit_plan):
    peaks = [
        with_memory_settings(dit_plan, BackboneConfig(**DIT, offload=o)).peak("predict")
        for o in ("none", "model", "group")
    ]
    assert peaks[0] > peaks[1] > peaks[2]
    assert peaks[0] == dit_plan.peak("predict")


@pytest.mark.parametrize(("text", "expected"), [("80GB", 80e9), ("24 GB", 24e9), ("16GiB", 16 * 2**30)])
def test_gpu_memory_sizes(text, expected):
    assert parse_memory(text) == expected


def test_a_bad_size_and_an_unknown_model_fail_in_one_line():
    with pytest.raises(ConfigError, match="--gpu-memory 'lots' is not a size"):
        parse_memory("lots")
    with pytest.raises(ConfigError, match="plan: no architecture for 'org/unknown'"):
        architecture("org/unknown")


def test_the_plan_command_reads_the_run_config_and_says_what_does_not_fit(dit_plan, capsys, monkeypatch):
    """The command's own parts: the run's config read as ``fit`` reads it (shapes.yaml's batch of
    16), the table and the verdict. (The plan itself, measured above, is handed in.)"""
    asked = []
    monkeypatch.setattr(
        memory_plan,
        "plan_memory",
        lambda config, batch, head, size: asked.append((config, batch, head)) or dit_plan,
    )
    configs = ["--config", "experiments/shapes.yaml", "--config", "experiments/shapes_dit.yaml"]
    main(["plan", *configs, "--gpu-memory", "0.001GB"])
    out = capsys.readouterr().out
    (config, batch, head), *_ = asked
    assert (config.model_id, config.max_sequence_length, batch, head.patch_size) == (SHAPES_DIT_ID, 0, 16, 2)
    assert "| transformer |" in out and "| predict |" in out and "| fit |" in out and "| generate |" in out
    assert "does NOT fit in 0.00 GB" in out and "No single change fits" in out


def test_a_fit_is_said_and_the_smallest_change_found(dit_plan):
    assert "fits in 16.00 GB" in format_plan(dit_plan, 16 * GB)
    # a GPU between the int8 plan and the full one: quantizing is the smallest change that fits
    int8 = {
        name: {"backend": "torchao", "type": "int8wo"}
        for name in ("transformer", "text_encoder", "text_encoder_2")
    }
    quantized = with_memory_settings(dit_plan, BackboneConfig(**DIT, quantization=int8))
    gpu = quantized.largest()[1] + 1
    assert gpu < dit_plan.largest()[1]
    assert smallest_change(BackboneConfig(**DIT), 1, None, gpu, plan=dit_plan).startswith(
        "backbone.quantization: {text_encoder: {backend: torchao, type: int8wo}, text_encoder_2: {backend: torchao, "
        "type: int8wo}, transformer: {backend: torchao, type: int8wo}}"
    )
