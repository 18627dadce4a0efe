"""Our batched DAAM against the reference ``daam`` package (Tang et al.), same pipeline, same seed.

The reference traces one prompt at a time and assumes a 64² or 96² latent; its latent size is set
to the embedded model's 16² here, which is what our tracer reads from the model.
"""

import daam  # `make install` adds it with `pip install --no-deps daam` (its pins are obsolete)
import pytest
import torch

from grounded_diffusion.models.backbones import BackboneConfig, StableDiffusionBackbone
from grounded_diffusion.models.daam import DAAMTracer, daam_masks

PROMPTS = ["a photograph of a dog and a hot dog", "a photograph of a cat and a sofa"]
WORDS = [["dog", "hot dog"], ["cat", "sofa"]]


@pytest.fixture(scope="module")
def backbone():
    return StableDiffusionBackbone(
        BackboneConfig(branches="uncond+cond", num_inference_steps=10, capture_step=2)
    )


def reference_maps(backbone, prompt, seed, words, factors=None):
    """The package's word heat maps and masks; ``factors``: only the layers whose maps are that
    many times smaller than the latent (the package's own filter)."""
    pipe = backbone.pipeline()
    latent = backbone.unet.config.sample_size
    with daam.trace(pipe) as tracer:
        tracer.latent_hw = latent * latent
        for hooker in tracer.module:
            if hasattr(hooker, "latent_hw"):
                hooker.latent_hw = latent * latent
        image = pipe(
            prompt, num_inference_steps=10, guidance_scale=7.5, latents=backbone.initial_noise([seed])
        ).images[0]
        global_map = tracer.compute_global_heat_map(factors=factors)
        maps = [global_map.compute_word_heat_map(w) for w in words]
        return torch.stack([m.heatmap for m in maps]), torch.stack(
            [m.expand_as(image, threshold=0.4).bool() for m in maps]
        )


def test_heat_maps_and_masks_match_the_reference_package(backbone):
    # The reference pools every occurrence of a word ("dog" takes the "dog" of "hot dog").
    ours = backbone.generate(PROMPTS, [3, 4], guidance_scale=7.5, words=WORDS, word_matching="reference")
    ours_masks = daam_masks(ours.heat_maps, (128, 128), threshold=0.4)
    for b, (prompt, seed, words) in enumerate(zip(PROMPTS, [3, 4], WORDS)):
        heat, masks = reference_maps(backbone, prompt, seed, words)
        # Stated tolerance: heat maps within 1e-5 (float32 summation order, batch of 2 vs 1);
        # masks may differ only on pixels that sit on the threshold: at most 0.1 %.
        torch.testing.assert_close(ours.heat_maps[b].float(), heat.float(), atol=1e-5, rtol=1e-4)
        assert (ours_masks[b] != masks).float().mean() <= 1e-3


def test_maps_of_each_resolution_match_the_reference_package(backbone):
    """The maps of one latent resolution's layers alone (``python -m grounded_diffusion.shapes_world
    --daam-by-resolution``) against the package's ``factors`` filter."""
    pipe, noise = backbone.pipeline(), backbone.initial_noise([3, 4])
    tracer = DAAMTracer(backbone.unet)
    with (
        torch.no_grad(),
        tracer.trace(backbone.tokenizer, PROMPTS, WORDS, noise.shape[-1], matching="reference"),
    ):
        pipe(PROMPTS, num_inference_steps=10, guidance_scale=7.5, latents=noise)
    sides = tracer.layer_sides()
    assert len(set(sides.values())) >= 2  # a filter to test
    for side in set(sides.values()):
        ours = tracer.word_maps([layer for layer, s in sides.items() if s == side])
        for b, (prompt, seed, words) in enumerate(zip(PROMPTS, [3, 4], WORDS)):
            heat, _ = reference_maps(backbone, prompt, seed, words, factors={noise.shape[-1] // side})
            torch.testing.assert_close(ours[b].float(), heat.float(), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="None of the layers \\[99\\] was traced"):
        tracer.word_maps([99])
