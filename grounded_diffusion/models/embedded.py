"""The one registry of embedded models: each ``embedded/…`` id, what kind of model it is, where its
weights come from, and how to make them again. The backbone loader (``load_pipeline``) and the
oracles resolve every embedded id here.

Two sources:

- **built**: a tiny random pipeline the project builds from config on first use, into the cache
  folder (``GROUNDED_DIFFUSION_CACHE``): the offline smoke models and the tests'
  (``tiny_sd.py``: SD-1.x / 2.x / XL layouts; ``tiny_dit.py``: SD3, FLUX.1, FLUX.2).
- **trained**: a model the project trained, shipped in ``grounded_diffusion/shapes_world/weights/<name>``,
  with the Makefile target that retrains it (the shapes worlds', ``shapes_world/models.py``).

Adding one: its id, builder or weights folder and retrain target in ``REGISTRY`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from grounded_diffusion.errors import MissingWeightsError
from grounded_diffusion.models import tiny_dit, tiny_sd
from grounded_diffusion.shapes_world import models as world_models

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "shapes_world" / "weights"
EmbeddedKind = Literal["pipeline", "oracle"]
# What marks a folder of each kind as whole.
MARKERS = {"pipeline": "model_index.json", "oracle": "config.json"}


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model.

    Args:
        model_id: ``embedded/<name>``.
        kind: ``pipeline`` (a diffusers pipeline: a backbone) or ``oracle`` (a segmenter folder
            that ``SemanticSegmentationModule.export`` wrote).
        build: a built model's builder (a diffusers pipeline from config, random weights).
        retrain: a trained model's command that trains and installs its weights.
        pipeline_options: what sampling with it needs beyond the pipeline's defaults.
    """

    model_id: str
    kind: EmbeddedKind
    build: Callable | None = None
    retrain: str | None = None
    pipeline_options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.model_id.removeprefix("embedded/")

    @property
    def trained(self) -> bool:
        return self.build is None

    @property
    def weights_folder(self) -> Path:
        """Where a trained model's weights ship."""
        return WEIGHTS_DIR / self.name

    def folder(self) -> Path:
        """The model's folder: a built model is built on first use; a trained model's weights
        must be there, or one line names the command that retrains them."""
        if not self.trained:
            return tiny_sd.ensure_tiny_stable_diffusion(self.model_id, builder=self.build)
        marker = self.weights_folder / MARKERS[self.kind]
        if not marker.is_file():
            raise MissingWeightsError(
                f"The weights of '{self.model_id}' are missing from {self.weights_folder} ({marker.name} does not "
                f"exist); retrain them with `{self.retrain}`."
            )
        return self.weights_folder


def _built(model_id: str, build: Callable) -> EmbeddedModel:
    return EmbeddedModel(model_id, "pipeline", build=build)


REGISTRY: dict[str, EmbeddedModel] = {
    model.model_id: model
    for model in (
        *(_built(i, b) for i, b in tiny_sd.TINY_BUILDERS.items()),
        *(_built(i, b) for i, b in tiny_dit.TINY_DIT_BUILDERS.items()),
        EmbeddedModel(world_models.SHAPES_SD_ID, "pipeline", retrain="make world"),
        EmbeddedModel(world_models.SHAPES_ORACLE_ID, "oracle", retrain="make world"),
        EmbeddedModel(world_models.SHAPES_WIDE_SD_ID, "pipeline", retrain="make world-wide"),
        EmbeddedModel(world_models.SHAPES_WIDE_ORACLE_ID, "oracle", retrain="make world-wide"),
        # (trained with no T5 tokens: SD3's pipeline would append 256 zero tokens without a T5 encoder)
        EmbeddedModel(
            world_models.SHAPES_DIT_ID,
            "pipeline",
            retrain="make world-dit",
            pipeline_options={"max_sequence_length": 0},
        ),
    )
}


def embedded_model(model_id: str, kind: EmbeddedKind | None = None) -> EmbeddedModel | None:
    """The registry's entry for ``model_id`` (of ``kind``, if given), or None for any other id (a
    Hub id or a local folder). An ``embedded/…`` id that is not registered is one line."""
    model = REGISTRY.get(model_id)
    if model is None and str(model_id).startswith("embedded/"):
        from grounded_diffusion.errors import ConfigError, did_you_mean

        known = [m for m, e in REGISTRY.items() if kind in (None, e.kind)]
        hint = did_you_mean(model_id, known)
        raise ConfigError(
            f"'{model_id}' is not an embedded model ({hint + ' ' if hint else ''}embedded: {', '.join(known)})"
        )
    if model is not None and kind is not None and model.kind != kind:
        from grounded_diffusion.errors import ConfigError

        raise ConfigError(f"'{model_id}' is an embedded {model.kind}, not {kind!r}: give an embedded {kind}")
    return model


def pipeline_options(model_id: str) -> dict:
    """What sampling with ``model_id``'s pipeline needs beyond its defaults ({} for most)."""
    model = REGISTRY.get(model_id)
    return dict(model.pipeline_options) if model is not None else {}
