"""Loading a backbone's diffusers pipeline: an embedded model (``models/embedded.py``), a local folder
or a Hub id, with one line naming the three ways to provide weights that are missing."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from diffusers import (
    DiffusionPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from grounded_diffusion.errors import ConfigError, MissingWeightsError
from grounded_diffusion.models.backbones.quantization import check_runs_here, pipeline_quantization_config
from grounded_diffusion.models.embedded import embedded_model

UNET_PIPELINES = (StableDiffusionPipeline, StableDiffusionXLPipeline)
PIPELINES = (*UNET_PIPELINES, StableDiffusion3Pipeline, FluxPipeline, Flux2KleinPipeline, Flux2Pipeline)


def looks_like_local_path(model_id: str) -> bool:
    """A path, not a Hub id (``org/name``): absolute, relative with ./ or ../, ~, or deeper."""
    return model_id.startswith(("/", "./", "../", "~")) or model_id.count("/") > 1 or "\\" in model_id


def load_pipeline(model_id: str, dtype: torch.dtype, quantization: dict | None = None) -> DiffusionPipeline:
    """``from_pretrained`` on disk first, then the Hub; a clear error when neither has it. The
    pipeline class (SD, SDXL, SD3, FLUX.1, FLUX.2) is the one the model's ``model_index.json`` names.
    ``quantization``: ``BackboneConfig.quantization``, handed to diffusers (``quantization.py``)."""
    if quantization:
        check_runs_here(quantization)
    embedded = embedded_model(model_id, "pipeline")  # (built on first use, or shipped: models/embedded.py)
    source = str(embedded.folder()) if embedded is not None else model_id
    if looks_like_local_path(source) and not Path(source).expanduser().exists():
        raise MissingWeightsError(
            f"model_id '{model_id}' is a local folder that does not exist ({Path(source).expanduser().resolve()}); "
            "fix the path, or save a pipeline there with `pipeline.save_pretrained(FOLDER)`."
        )
    if Path(source).exists() and not (Path(source) / "model_index.json").exists():
        raise MissingWeightsError(
            f"'{model_id}' is a folder but holds no diffusers pipeline (no model_index.json). "
            "Point model_id at a folder saved with `pipeline.save_pretrained(...)`."
        )
    errors = []
    for local_only in (True, False):
        try:
            index = DiffusionPipeline.load_config(source, local_files_only=local_only)
            # SD-1.x / 2.x list a safety checker, which we leave out; other pipelines have none.
            extra = (
                {"safety_checker": None, "requires_safety_checker": False}
                if "safety_checker" in index
                else {}
            )
            if quantization:
                extra["quantization_config"] = pipeline_quantization_config(
                    quantization, index, model_id, dtype
                )
            pipe = DiffusionPipeline.from_pretrained(
                source, local_files_only=local_only, dtype=dtype, **{**absent_components(index), **extra}
            )
        except ConfigError:  # (a ValueError too: ours, about the settings, not the weights)
            raise
        except (OSError, ValueError) as err:  # huggingface_hub's errors subclass these
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0]}")
            continue
        if not isinstance(pipe, PIPELINES):
            raise ConfigError(
                f"'{model_id}' is a {type(pipe).__name__}; the backbone supports "
                f"{', '.join(p.__name__ for p in PIPELINES)} (SD-1.x, SD-2.x, SDXL, SD3 / SD3.5, FLUX.1, FLUX.2)."
            )
        return pipe
    raise MissingWeightsError(
        f"Could not load Stable Diffusion weights for model_id '{model_id}': they are not in the "
        "local Hugging Face cache and the Hub could not be reached.\n"
        "Provide them in one of these ways:\n"
        f"  1. on a machine with network access: `hf download {model_id}`, then copy the cache "
        "folder (HF_HOME, default ~/.cache/huggingface) here;\n"
        "  2. save the pipeline with `save_pretrained(FOLDER)` and set "
        "`model.init_args.backbone.model_id: FOLDER`;\n"
        "  3. to try the framework offline, add `--config experiments/offline.yaml` "
        "(tiny embedded model).\n"
        f"Last loader error: {errors[-1]}"
    ) from None


def absent_components(index: dict) -> dict[str, None]:
    """The components a pipeline's class expects that its folder leaves out or saved as none, as
    ``None``: a saved SD3 without T5 has no text_encoder_3, and diffusers refuses to load it unless
    told."""

    pipeline_class = getattr(diffusers, index.get("_class_name", ""), None)
    if pipeline_class is None:
        return {}
    expected, _ = pipeline_class._get_signature_keys(pipeline_class)
    return {name: None for name in expected if (index.get(name) or [None])[0] is None}
