"""Frozen diffusion backbones: what the grounding head reads, and the training-free baselines' maps.

- ``config.py``: ``BackboneConfig``, the one config every backbone reads;
- ``loading.py``: a model id (embedded, local folder, Hub) -> its diffusers pipeline;
- ``base.py``: ``FrozenBackbone``, what every backbone shares (prompt encoding, noise, capture
  hooks, the guidance batch, the capture step's place in a schedule);
- ``unet.py``: Stable Diffusion's UNets (SD-1.x, SD-2.x, SDXL);
- ``dit.py``: what diffusion transformers share, and one file per family: ``sd3.py`` (SD3 / SD3.5),
  ``flux.py`` (FLUX.1), ``flux2.py`` (FLUX.2 [klein] and [dev]).

``build_backbone`` picks the backbone class by the pipeline the model id loads (``FAMILIES``).
Adding a family: one file with its subclass of ``DiffusionTransformerBackbone``, its entry in
``FAMILIES``, a tiny builder (``models/tiny_dit.py``) and its id in ``tests/test_dit_backbone.py``.
"""

from __future__ import annotations

from diffusers import DiffusionPipeline

from grounded_diffusion.errors import MissingWeightsError
from grounded_diffusion.models.backbones.base import (
    FrozenBackbone,
    Generation,
    PromptEmbeds,
    capture_timestep,
    check_category_tokens,
    compile_in_place,
)
from grounded_diffusion.models.backbones.config import (
    CATEGORY_TEMPLATE,
    DTYPES,
    BackboneConfig,
    Branches,
    Dtype,
)
from grounded_diffusion.models.backbones.dit import CallGate, DiffusionTransformerBackbone
from grounded_diffusion.models.backbones.flux import FluxBackbone
from grounded_diffusion.models.backbones.flux2 import Flux2Backbone
from grounded_diffusion.models.backbones.loading import (
    PIPELINES,
    UNET_PIPELINES,
    absent_components,
    load_pipeline,
    looks_like_local_path,
)
from grounded_diffusion.models.backbones.sd3 import SD3Backbone
from grounded_diffusion.models.backbones.unet import StableDiffusionBackbone, group_by_resolution

# Each pipeline class -> the backbone class that runs it.
FAMILIES: dict[type, type[FrozenBackbone]] = {
    pipeline: backbone
    for backbone in (StableDiffusionBackbone, SD3Backbone, FluxBackbone, Flux2Backbone)
    for pipeline in (UNET_PIPELINES if backbone is StableDiffusionBackbone else backbone.pipelines)
}
DIT_PIPELINES = tuple(p for p, b in FAMILIES.items() if issubclass(b, DiffusionTransformerBackbone))


def build_backbone(
    config: BackboneConfig | None = None, pipeline: DiffusionPipeline | None = None
) -> FrozenBackbone:
    """The frozen backbone of ``config.model_id`` (or of a loaded ``pipeline``): a UNet's
    (SD-1.x / 2.x / XL) or a diffusion transformer's (SD3 / SD3.5, FLUX.1, FLUX.2), as its pipeline is."""
    config = config or BackboneConfig()
    pipeline = pipeline or load_pipeline(config.model_id, DTYPES[config.dtype], config.quantization)
    backbone = next(b for kind, b in FAMILIES.items() if isinstance(pipeline, kind))
    return backbone(config, pipeline=pipeline)


__all__ = [
    "CATEGORY_TEMPLATE",
    "DIT_PIPELINES",
    "DTYPES",
    "FAMILIES",
    "PIPELINES",
    "UNET_PIPELINES",
    "BackboneConfig",
    "Branches",
    "CallGate",
    "DiffusionTransformerBackbone",
    "Dtype",
    "Flux2Backbone",
    "FluxBackbone",
    "FrozenBackbone",
    "Generation",
    "MissingWeightsError",
    "PromptEmbeds",
    "SD3Backbone",
    "StableDiffusionBackbone",
    "absent_components",
    "build_backbone",
    "capture_timestep",
    "check_category_tokens",
    "compile_in_place",
    "group_by_resolution",
    "load_pipeline",
    "looks_like_local_path",
]
