"""Quantized backbones through diffusers' own quantization support: ``backbone.quantization`` maps
pipeline components to a backend and a type, e.g.
``{transformer: {backend: torchao, type: int8wo}, text_encoder_2: {backend: bitsandbytes, type: nf4}}``,
which becomes one ``PipelineQuantizationConfig(quant_mapping=...)`` for ``from_pretrained``.
Diffusers' models get diffusers' config class, transformers' models (the text encoders)
transformers' own; the weights are rewritten by the backend, never by us.

What each backend needs is checked before anything loads, in one line naming the backend, the
type and the missing piece (a package, a CUDA GPU, fp8 hardware)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

import torch

from grounded_diffusion.errors import ConfigError

FIELD = "model.init_args.backbone.quantization"

# backend -> type -> (what the weights become, bits per weight, needs a CUDA GPU, least compute capability)
QUANT_TYPES: dict[str, dict[str, tuple[str, int, bool, tuple[int, int] | None]]] = {
    "torchao": {
        "int8wo": ("int8 weights, activations in the model dtype", 8, False, None),
        "int8dq": ("int8 weights and dynamically quantized int8 activations", 8, False, None),
        "int4wo": ("int4 weights (tinygemm kernels)", 4, True, (8, 0)),
        "fp8wo": ("float8 e4m3 weights", 8, True, (8, 9)),
        "fp8dq": ("float8 weights and activations", 8, True, (8, 9)),
    },
    "bitsandbytes": {
        "nf4": ("4-bit NormalFloat weights", 4, True, None),
        "fp4": ("4-bit float weights", 4, True, None),
        "int8": ("LLM.int8() weights", 8, True, None),
    },
    "quanto": {
        "int8": ("int8 weights", 8, False, None),
        "int4": ("int4 weights", 4, False, None),
        "float8": ("float8 weights", 8, False, None),
    },
}
PACKAGES = {"torchao": "torchao", "bitsandbytes": "bitsandbytes", "quanto": "optimum.quanto"}
PIP_NAMES = {"torchao": "torchao", "bitsandbytes": "bitsandbytes", "quanto": "optimum-quanto"}


def check_quantization(spec: Mapping | None) -> dict[str, dict[str, str]] | None:
    """The quantization setting as plain dicts, or one line naming the first bad entry (at config
    time: backend and type names only; what the machine needs is checked at load)."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(
            f"{FIELD} {spec!r} is not a mapping of components to settings; e.g. "
            "{transformer: {backend: torchao, type: int8wo}}, or null for none"
        )
    checked = {}
    for component, setting in spec.items():
        keys = set(setting) if isinstance(setting, Mapping) else None
        if keys != {"backend", "type"}:
            raise ConfigError(
                f"{FIELD}.{component} {setting!r} must give exactly 'backend' and 'type', e.g. "
                "{backend: torchao, type: int8wo}"
            )
        backend, kind = setting["backend"], setting["type"]
        if backend not in QUANT_TYPES:
            raise ConfigError(f"{FIELD}.{component}.backend '{backend}' is not one of {sorted(QUANT_TYPES)}")
        if kind not in QUANT_TYPES[backend]:
            raise ConfigError(
                f"{FIELD}.{component}.type '{kind}' is not a {backend} type; use one of {sorted(QUANT_TYPES[backend])}"
            )
        checked[str(component)] = {"backend": backend, "type": kind}
    return checked


def check_runs_here(spec: Mapping[str, Mapping[str, str]], device: torch.device | None = None) -> None:
    """One line when a backend cannot run on this machine: it needs a CUDA GPU and there is none,
    it needs fp8 hardware (compute capability 8.9, Ada / Hopper), or its package is absent."""
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    for component, setting in spec.items():
        backend, kind = setting["backend"], setting["type"]
        _, _, needs_cuda, capability = QUANT_TYPES[backend][kind]
        where = f"{FIELD}.{component} ({backend} {kind})"
        if needs_cuda and not cuda:
            also = "; on a CPU use torchao int8wo or quanto int8" if backend != "quanto" else ""
            raise ConfigError(f"{where} runs on a CUDA GPU only, and this run has none{also}")
        if capability and torch.cuda.get_device_capability() < capability:
            raise ConfigError(
                f"{where} needs a GPU of compute capability {capability[0]}.{capability[1]} or more "
                f"(fp8: Ada, Hopper); this one has {'.'.join(map(str, torch.cuda.get_device_capability()))}; "
                "use int8wo or bitsandbytes nf4"
            )
        if importlib.util.find_spec(PACKAGES[backend].split(".")[0]) is None:
            raise ConfigError(
                f"{where} needs the {PIP_NAMES[backend]} package: pip install {PIP_NAMES[backend]} "
                "(or pip install 'grounded-diffusion[quantization]')"
            )


def _torchao_config(kind: str):
    from torchao import quantization as ao

    return {
        "int8wo": ao.Int8WeightOnlyConfig,
        "int8dq": ao.Int8DynamicActivationInt8WeightConfig,
        "int4wo": ao.Int4WeightOnlyConfig,
        "fp8wo": ao.Float8WeightOnlyConfig,
        "fp8dq": ao.Float8DynamicActivationFloat8WeightConfig,
    }[kind]()


def component_config(library: str, backend: str, kind: str, dtype: torch.dtype):
    """The quantization config of one component in its own library's class (``diffusers`` for the
    denoiser, ``transformers`` for a text encoder)."""
    import diffusers
    import transformers

    lib = diffusers if library == "diffusers" else transformers
    if backend == "torchao":
        return lib.TorchAoConfig(_torchao_config(kind))
    if backend == "quanto":
        return lib.QuantoConfig(weights_dtype=kind) if lib is diffusers else lib.QuantoConfig(weights=kind)
    if kind == "int8":
        return lib.BitsAndBytesConfig(load_in_8bit=True)
    return lib.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=dtype)


def pipeline_quantization_config(
    spec: Mapping[str, Mapping[str, str]], model_index: dict, model_id: str, dtype: torch.dtype
):
    """``PipelineQuantizationConfig`` for a pipeline's ``model_index.json``, or one line naming a
    component the pipeline does not have or that is not a model (a tokenizer, a scheduler)."""
    from diffusers import PipelineQuantizationConfig

    mapping = {}
    models = {
        name: entry[0]
        for name, entry in model_index.items()
        if isinstance(entry, list)
        and entry[0] in ("diffusers", "transformers")
        and entry[1] is not None
        and not entry[1].endswith(("Tokenizer", "TokenizerFast", "Scheduler", "Processor"))
        and not entry[1].startswith(("CLIPImageProcessor", "AutoProcessor", "PixtralProcessor"))
    }
    for component, setting in spec.items():
        if component not in models:
            raise ConfigError(
                f"{FIELD}.{component}: '{model_id}' has no model named {component}; "
                f"its models are {sorted(models)}"
            )
        mapping[component] = component_config(models[component], setting["backend"], setting["type"], dtype)
    return PipelineQuantizationConfig(quant_mapping=mapping)


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters and buffers hold, quantized ones included: a tensor subclass
    (torchao, quanto) is counted by the plain tensors it is made of, so an int8 weight counts one
    byte per value plus its scales. (``get_memory_footprint`` counts a subclass at its outer dtype.)"""

    def size(t: torch.Tensor) -> int:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, name)) for name in names)
        return t.numel() * t.element_size()

    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(size(t) for t in tensors.values())
