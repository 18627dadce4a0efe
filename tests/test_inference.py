"""What predict makes, as pieces (grounded_diffusion.inference), each against a plainly written
per-sample reference: batched results equal one-by-one ones, padded category slots included."""

import torch

from grounded_diffusion.inference import convert_images, ground_generated, head_probabilities
from grounded_diffusion.models.grounding_head import GroundingHead, HeadConfig

SMALL_HEAD = HeadConfig(group_channels=[8, 8, 8, 8], embed_dim=32, num_heads=4, ffn_dim=64)


def small_head(backbone) -> GroundingHead:
    torch.manual_seed(0)
    return GroundingHead(backbone.feature_channels(), backbone.text_dim, SMALL_HEAD).eval()


def test_grounded_generation_equals_the_head_on_each_sample_alone(backbone):
    """Two prompts, one naming two categories and one naming one (a padded slot): each sample's
    probabilities equal the head run on that sample alone with its own category embeddings."""
    head = small_head(backbone)
    prompts, categories, seeds = (
        ["a photograph of a dog and a cat", "a photograph of a car"],
        [["dog", "cat"], ["car"]],
        [3, 4],
    )
    images, probs = ground_generated(backbone, head, prompts, categories, seeds, guidance_scale=5.0)
    assert probs.shape == (2, 2, *images.shape[-2:]) and (probs[1, 1] == 0).all()  # the empty slot
    features = backbone.generate(prompts, seeds, 5.0).features
    for i, names in enumerate(categories):
        embeds = torch.stack([backbone.category_embeddings([name])[0] for name in names])[None].float()
        logits = head(
            [f[i : i + 1].float() for f in features],
            embeds,
            torch.ones(1, len(names), dtype=torch.bool),
            images.shape[-2:],
        )
        torch.testing.assert_close(probs[i, : len(names)], logits.sigmoid()[0], atol=1e-5, rtol=1e-4)


def test_head_probabilities_put_each_name_in_its_own_slot(backbone):
    head = small_head(backbone)
    features = backbone.generate(["a dog", "a cat"], [1, 2], 5.0).features
    both = head_probabilities(backbone, head, features, [["dog", "cat"], ["cat", "dog"]], (32, 32))
    swapped = head_probabilities(backbone, head, features, [["cat", "dog"], ["dog", "cat"]], (32, 32))
    torch.testing.assert_close(both.flip(1), swapped)


def test_converted_images_do_not_depend_on_their_batch(backbone):
    """Noise is drawn per sample id: a sample converted in a batch equals it converted alone."""
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    batch = {
        "id": ["a", "b"],
        "image": images,
        "prompt": ["a dog", "a cat and a dog"],
        "categories": [["dog"], ["cat", "dog"]],
    }
    together = convert_images(backbone, batch, "noise", "whole")
    for i in range(2):
        alone = convert_images(backbone, {k: v[i : i + 1] for k, v in batch.items()}, "noise", "whole")
        torch.testing.assert_close(together["latents"][i : i + 1], alone["latents"], atol=1e-5, rtol=1e-4)
        for ours, reference in zip(together["features"], alone["features"]):
            torch.testing.assert_close(ours[i : i + 1], reference, atol=1e-4, rtol=1e-4)
        n = len(batch["categories"][i])
        torch.testing.assert_close(
            together["daam"][i : i + 1, :n],
            alone["daam"][:, :n],
            atol=1e-5,
            rtol=1e-4,  # a UNet: DAAM
        )
