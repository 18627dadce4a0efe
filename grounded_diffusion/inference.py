"""What ``predict`` makes, as functions of the frozen models (no Lightning): triplets synthesised
from prompts (SD + oracle + DAAM), triplets converted from images with masks (paper §4.1), and
grounded images (generation + the trained head, or a training-free method's maps).
GroundingModule's ``predict_step`` and the Python API (``grounded_diffusion.GroundedGenerator``)
call them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from grounded_diffusion.data.sources import sample_seed
from grounded_diffusion.errors import check_choice
from grounded_diffusion.models.backbones import FrozenBackbone
from grounded_diffusion.models.concept_attention import argmax_masks
from grounded_diffusion.models.daam import normalized_heat_maps
from grounded_diffusion.models.grounding_head import GroundingHead

RealImageMode = Literal["noise", "ddim_inversion"]  # how real images reach the capture step
REAL_IMAGE_MODES = get_args(RealImageMode)


def category_slots(categories: Sequence[Sequence[str]]) -> tuple[list[str], Tensor]:
    """The distinct names (each embedded once) and, per sample, the index of each of its names
    among them, -1 in the empty slots of samples with fewer names: [B, max names]."""
    names = list(dict.fromkeys(c for cs in categories for c in cs))
    slots = max(len(cs) for cs in categories)
    index = [[names.index(c) for c in cs] + [-1] * (slots - len(cs)) for cs in categories]
    return names, torch.tensor(index)


@torch.no_grad()
def head_probabilities(
    backbone: FrozenBackbone,
    head: GroundingHead,
    features: Sequence[Tensor],
    categories: Sequence[Sequence[str]],
    output_size: tuple[int, int],
) -> Tensor:
    """Mask probabilities [B, O, H, W] (float32) of each sample's named categories, 0 in empty
    slots. Open vocabulary: any name is embedded by the text encoder."""
    names, index = category_slots(categories)
    embeds = backbone.category_embeddings(names).float()
    index = index.to(embeds.device)
    logits = head([f.float() for f in features], embeds[index.clamp(min=0)], index >= 0, output_size)
    return logits.sigmoid().masked_fill((index < 0)[..., None, None], 0)


def ground_generated(
    backbone: FrozenBackbone,
    head: GroundingHead,
    prompts: Sequence[str],
    categories: Sequence[Sequence[str]],
    seeds: Sequence[int],
    guidance_scale: float,
    num_inference_steps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Generate from ``prompts`` (one noise seed each), then segment every named category with
    the head: RGB uint8 images [B, 3, H, W] and their mask probabilities [B, O, H, W]."""
    generation = backbone.generate(prompts, seeds, guidance_scale, num_inference_steps=num_inference_steps)
    probs = head_probabilities(backbone, head, generation.features, categories, generation.images.shape[-2:])
    return generation.images, probs


HEAD = "head"


def training_free_methods(backbone: FrozenBackbone) -> list[str]:
    """The backbone's training-free baseline (``daam`` on a UNet, ``joint_attention`` on a
    diffusion transformer), then ``concept_attention`` where it runs (diffusion transformers)."""
    return [backbone.baseline_method, *(["concept_attention"] if backbone.concept_attention else [])]


def check_method(backbone: FrozenBackbone, method: str) -> str:
    """``head`` or one of ``training_free_methods``, or one line."""
    if method == "concept_attention" and not backbone.concept_attention:
        backbone.trace_concepts([])  # (its one-line error: ConceptAttention runs on diffusion transformers)
    check_choice("method", method, [HEAD, *training_free_methods(backbone)])
    return method


def training_free_probabilities(
    maps: Tensor, method: str, size: tuple[int, int], threshold: float | None
) -> tuple[Tensor, float]:
    """A training-free method's maps [B, O, h, w] -> per-pixel scores [B, O, H, W] and the
    threshold that makes its masks, as Protocol I scores it: DAAM and joint attention, the map
    min-max normalised, above τ (default DAAM's 0.4); ConceptAttention, by default the argmax
    over the categories' and background concepts (1 where a category wins, else 0), or with
    ``threshold`` its normalised map above τ."""
    if method == "concept_attention" and threshold is None:
        return argmax_masks(maps, size).float(), 0.5
    return normalized_heat_maps(maps, size), 0.4 if threshold is None else threshold


def ground_generated_training_free(
    backbone: FrozenBackbone,
    method: str,
    prompts: Sequence[str],
    categories: Sequence[Sequence[str]],
    seeds: Sequence[int],
    guidance_scale: float,
    num_inference_steps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Generate from ``prompts`` and trace the named categories: RGB uint8 images and the
    method's maps [B, O, h, w] (joint attention or DAAM over every step; ConceptAttention's
    averaged over its blocks and steps)."""
    # (a diffusion transformer traces ConceptAttention only when it is the method asked for)
    concepts = {"concept_attention": method == "concept_attention"} if backbone.concept_attention else {}
    generation = backbone.generate(
        prompts, seeds, guidance_scale, categories, num_inference_steps=num_inference_steps, **concepts
    )
    maps = generation.concept_maps if method == "concept_attention" else generation.heat_maps
    return generation.images, maps


def real_image_latents(
    backbone: FrozenBackbone, images: Tensor, prompt_embeds, seeds: Sequence[int], mode: str
) -> Tensor:
    """RGB uint8 images [B, 3, H, W] -> their latents at the capture step: VAE encoding, then
    forward noise (one draw per seed, so that a sample's result does not depend on its batch) or
    DDIM inversion (``mode``: ``noise`` or ``ddim_inversion``)."""
    latents = backbone.encode_images(images.float() / 127.5 - 1)
    noise = backbone.initial_noise(seeds, latents.shape[1:])
    return backbone.latents_at_capture_step(latents, prompt_embeds, noise, mode)


def real_image_features(
    backbone: FrozenBackbone,
    images: Tensor,
    prompts: Sequence[str],
    categories: Sequence[Sequence[str]],
    seeds: Sequence[int],
    mode: str,
    methods: Sequence[str] = (),
    word_matching: str = "whole",
) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
    """Real images (uint8 [B, 3, H, W], sides the backbone accepts) through one denoiser call at
    the capture step: their latents there, the features, and the maps [B, O, h, w] of the named
    training-free ``methods`` (its view of a real image), traced in that one call."""
    prompt_embeds = backbone.encode_prompts(prompts)
    latents = real_image_latents(backbone, images, prompt_embeds, seeds, mode)
    timesteps = torch.full((len(latents),), backbone.timestep, device=latents.device)
    tracers = {}
    with contextlib.ExitStack() as stack:
        for method in methods:
            tracing = (
                backbone.trace_concepts(categories)
                if method == "concept_attention"
                else backbone.trace_words(prompts, categories, word_matching)
            )
            tracers[method] = stack.enter_context(tracing)
        features = backbone.features(latents, timesteps, prompt_embeds)
    return latents, features, {method: tracer.word_maps() for method, tracer in tracers.items()}


def segment_real(
    backbone: FrozenBackbone,
    head: GroundingHead,
    images: Tensor,
    prompts: Sequence[str],
    categories: Sequence[Sequence[str]],
    seeds: Sequence[int],
    mode: str,
) -> Tensor:
    """Open-vocabulary segmentation of real images (uint8 [B, 3, H, W], sides the backbone
    accepts): mask probabilities [B, O, H, W] of each image's named categories."""
    _, features, _ = real_image_features(backbone, images, prompts, categories, seeds, mode)
    return head_probabilities(backbone, head, features, categories, images.shape[-2:])


def synthesise_triplets(
    backbone: FrozenBackbone, oracle, batch: dict, guidance_scale: float, word_matching: str
) -> dict:
    """A batch of prompts (``prompt``, ``seed``, ``categories``) -> the batch with the generated
    ``image``, the oracle's ``masks`` and ``oracle_scores``, the training-free baselines' maps of
    the category words over all steps (keyed by ``backbone.baseline_method``; on a diffusion
    transformer ConceptAttention's too, under ``concept_attention``), and the capture step's
    ``latents`` and ``features``: the triplet cache's samples."""
    generation = backbone.generate(
        batch["prompt"], batch["seed"], guidance_scale, batch["categories"], word_matching
    )
    masks, scores = oracle(generation.images, batch["categories"])
    return {
        **batch,
        "image": generation.images,
        "masks": masks,
        "oracle_scores": scores,
        backbone.baseline_method: generation.heat_maps,
        **({"concept_attention": generation.concept_maps} if generation.concept_maps is not None else {}),
        "latents": generation.latents,
        "features": generation.features,
    }


def convert_images(backbone: FrozenBackbone, batch: dict, mode: str, word_matching: str) -> dict:
    """A batch of real images with masks (``image``, ``prompt``, ``categories``, ``id``) -> the batch
    with the capture step's ``latents`` and ``features`` and the training-free baseline's maps of one
    denoiser call at that step (its view of a real image; keyed by ``backbone.baseline_method``).
    Each sample's noise is drawn from its id, so that its features do not depend on its batch or
    rank."""
    seeds = [sample_seed(i) for i in batch["id"]]
    latents, features, maps = real_image_features(
        backbone,
        batch["image"],
        batch["prompt"],
        batch["categories"],
        seeds,
        mode,
        training_free_methods(backbone),  # (a diffusion transformer: ConceptAttention's maps beside)
        word_matching,
    )
    return {**batch, "latents": latents.to(backbone.dtype), "features": features, **maps}
