"""Quantized backbones through diffusers' quantizers (models/backbones/quantization.py): the config
is checked before anything loads, what cannot run here fails in one line, torchao int8 weight-only
and quanto int8 run on the CPU on the shapes world's MM-DiT, and the quantization is part of the
features' identity (caches, head folders)."""

from types import SimpleNamespace

import pytest
import torch

from grounded_diffusion.errors import ConfigError
from grounded_diffusion.models.backbones import BackboneConfig, build_backbone
from grounded_diffusion.models.backbones import quantization as q
from grounded_diffusion.models.backbones.quantization import check_runs_here, stored_bytes
from grounded_diffusion.shapes_world.models import SHAPES_DIT_ID
from lightning_modules.grounding import GroundingModule

INT8 = {"transformer": {"backend": "torchao", "type": "int8wo"}}
DIT = {"model_id": SHAPES_DIT_ID, "max_sequence_length": 0, "num_inference_steps": 6, "capture_step": 2}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"transformer": {"backend": "torchao", "type": "int3"}}, "type 'int3' is not a torchao type"),
        ({"transformer": {"backend": "gptq", "type": "int4"}}, "backend 'gptq' is not one of"),
        ({"transformer": "int8"}, "must give exactly 'backend' and 'type'"),
        ({"transformer": {"backend": "quanto"}}, "must give exactly 'backend' and 'type'"),
        ({}, "is not a mapping of components"),
    ],
)
def test_bad_settings_fail_at_config_time_in_one_line(setting, message):
    with pytest.raises(ConfigError, match=message) as error:
        BackboneConfig(quantization=setting)
    assert "\n" not in str(error.value)


def test_what_cannot_run_here_names_the_backend_and_what_it_needs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"text_encoder_2 \(bitsandbytes nf4\) runs on a CUDA GPU only"):
        check_runs_here({"text_encoder_2": {"backend": "bitsandbytes", "type": "nf4"}})
    with pytest.raises(ConfigError, match=r"\(torchao fp8wo\) runs on a CUDA GPU only"):
        check_runs_here({"transformer": {"backend": "torchao", "type": "fp8wo"}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # an A100
    with pytest.raises(
        ConfigError, match=r"needs a GPU of compute capability 8.9 or more .* this one has 8.0"
    ):
        check_runs_here({"transformer": {"backend": "torchao", "type": "fp8dq"}})
    monkeypatch.setattr(q.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs the optimum-quanto package: pip install optimum-quanto"):
        check_runs_here({"transformer": {"backend": "quanto", "type": "int8"}})


def test_a_component_the_pipeline_lacks_is_named_with_the_ones_it_has():
    setting = {"text_encoder_3": {"backend": "torchao", "type": "int8wo"}}
    with pytest.raises(
        ConfigError, match=r"has no model named text_encoder_3; its models are \['text_encoder', "
    ):
        build_backbone(BackboneConfig(**DIT, quantization=setting))


@pytest.fixture(scope="module")
def generations():
    """The same seed and prompt through the MM-DiT as stored, torchao int8 and quanto int8."""
    settings = {
        "float32": None,
        "torchao int8wo": INT8,
        "quanto int8": {"transformer": {"backend": "quanto", "type": "int8"}},
    }
    out = {}
    for name, setting in settings.items():
        backbone = build_backbone(BackboneConfig(**DIT, quantization=setting))
        generation = backbone.generate(["a red circle and a blue square"], seeds=[0], words=[["red circle"]])
        out[name] = (stored_bytes(backbone.denoiser), generation)
    return out


def test_int8_backbones_run_on_the_cpu_with_a_quarter_of_the_weights(generations):
    plain, _ = generations["float32"]
    for name in ("torchao int8wo", "quanto int8"):
        size, _ = generations[name]
        assert 3.3 < plain / size < 4.0, (name, plain / size)  # fp32 -> int8 linear weights, plus scales


def test_int8_features_stay_close_to_the_float_ones(generations):
    """Measured: torchao 1.0-1.7 %, quanto 1.5-2.8 % relative difference per block (docs/gpus.md)."""
    _, reference = generations["float32"]
    for name in ("torchao int8wo", "quanto int8"):
        _, generation = generations[name]
        for got, want in zip(generation.features, reference.features):
            difference = ((got - want).norm() / want.norm()).item()
            assert 0 < difference < 0.05, (name, difference)


def test_quantization_is_part_of_the_features_identity():
    plain, quantized = BackboneConfig(**DIT), BackboneConfig(**DIT, quantization=INT8)
    assert quantized.identity()["quantization"] == INT8
    assert BackboneConfig(**DIT, offload="model").identity() == plain.identity()  # offload: memory only
    module = SimpleNamespace(backbone_config=quantized)
    with pytest.raises(ConfigError, match=r"quantization: cache None, model \{'transformer'"):
        GroundingModule.check_cache(module, {"backbone": plain.identity()})
    GroundingModule.check_cache(SimpleNamespace(backbone_config=plain), {"backbone": {**plain.identity()}})
    old_cache = {k: v for k, v in plain.identity().items() if k != "quantization"}  # written before the key
    GroundingModule.check_cache(SimpleNamespace(backbone_config=plain), {"backbone": old_cache})
