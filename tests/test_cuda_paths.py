"""Every path on a fake CUDA device, without a GPU: modules moved to ``cuda`` inside PyTorch's
``FakeTensorMode`` hold fake CUDA tensors, every tensor made inside the mode is fake too, and any
op that mixes a CPU tensor with a CUDA one raises ``FakeTensorDeviceMismatchError``, as a GPU run
would. Steps whose result needs real values (``int(t)``, ``.any()`` in Python, numpy, dynamic
shapes as in Mask R-CNN's NMS or bincount) cannot run fake; the pieces around them are tested."""

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from grounded_diffusion.models.backbones import BackboneConfig, StableDiffusionBackbone
from grounded_diffusion.models.daam import DAAMTracer
from grounded_diffusion.models.grounding_head import GroundingHead, HeadConfig

CUDA = torch.device("cuda", 0)
SMALL_HEAD = HeadConfig(group_channels=[16, 16, 8, 8], embed_dim=32, num_heads=4, ffn_dim=64)


@contextlib.contextmanager
def fake_cuda(*modules: torch.nn.Module):
    """The modules on a fake CUDA device (a fresh copy of the weights per test: moving a module
    into the mode replaces its tensors with fake ones)."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        for module in modules:
            module.to(CUDA)
        yield mode


def on_cuda(tensor: torch.Tensor) -> bool:
    return tensor.device == CUDA


@pytest.fixture
def backbone():
    return StableDiffusionBackbone(
        BackboneConfig(num_inference_steps=4, capture_step=2, branches="uncond+cond")
    )


def test_feature_channels_and_cache_metadata_on_cuda(backbone):
    """The first GPU run stopped here: a 1-D timestep made on the CPU (diffusers does not move it)."""
    real = backbone.feature_channels()
    with fake_cuda(backbone):
        assert backbone.feature_channels() == real


def test_feature_capture_replay_and_real_image_conversion_on_cuda(backbone):
    with fake_cuda(backbone):
        embeds = backbone.encode_prompts(["a photograph of a dog", "a photograph of a cat"])
        assert on_cuda(embeds.hidden)
        images = torch.zeros(2, 3, 64, 64, device=CUDA)
        latents = backbone.encode_images(images)
        noise = backbone.initial_noise([1, 2], latents.shape[1:])
        for mode in ("noise", "ddim_inversion"):
            at_t = backbone.latents_at_capture_step(latents, embeds, noise, mode)
            assert on_cuda(at_t)
        timesteps = torch.full((2,), backbone.timestep, device=CUDA)
        features = backbone.features(at_t, timesteps, embeds)
        assert all(on_cuda(f) for f in features)
        assert all(on_cuda(f) for f in backbone.replay_features(at_t, timesteps, ["a dog", "a cat"]))
        assert on_cuda(backbone.category_embeddings(["dog", "hot dog"]))


def test_generation_inputs_on_cuda(backbone):
    """diffusers' DDIM step indexes its schedule with the timestep tensor (real values), so the
    sampling loop cannot run fake; what generate() itself makes is checked: the seeded noise and
    every UNet call's inputs (the one-call tests below run the same UNet, hooks and DAAM)."""
    with fake_cuda(backbone):
        assert on_cuda(backbone.initial_noise([7, 8]))


def test_daam_tracing_of_one_unet_call_on_cuda(backbone):
    with fake_cuda(backbone):
        embeds = backbone.encode_prompts(["a dog"])
        latents = torch.zeros(1, 4, 8, 8, device=CUDA)
        tracer = DAAMTracer(backbone.unet)
        with tracer.trace(backbone.tokenizer, ["a dog"], [["dog"]], 8):
            backbone.features(latents, torch.full((1,), backbone.timestep, device=CUDA), embeds)
        assert on_cuda(tracer.word_maps()) and on_cuda(tracer.token_index)


def test_head_training_and_evaluation_steps_on_cuda():
    from grounded_diffusion.losses import grounding_loss

    head = GroundingHead([64, 64, 32, 32], 32, SMALL_HEAD)
    with fake_cuda(head):
        features = [torch.randn(2, c, s, s, device=CUDA) for c, s in zip([64, 64, 32, 32], [2, 4, 8, 16])]
        embeds = torch.randn(2, 2, 32, device=CUDA)
        categories = torch.tensor([[0, 3], [2, -1]], device=CUDA)
        logits = head(features, embeds, categories >= 0, (32, 32))
        masks = torch.zeros(2, 2, 32, 32, dtype=torch.bool, device=CUDA)
        loss = grounding_loss(logits, masks, categories)  # (backward needs a real CUDA context)
        assert on_cuda(logits) and on_cuda(loss)


def test_segmentation_of_real_images_by_the_python_api_path_on_cuda(backbone):
    """What GroundedGenerator.segment runs per batch (grounded_diffusion.inference): uint8 images
    on the GPU, noise drawn on the CPU per seed, category slots built on the CPU."""
    from grounded_diffusion.inference import REAL_IMAGE_MODES, segment_real

    head = GroundingHead(backbone.feature_channels(), backbone.text_dim, SMALL_HEAD)
    with fake_cuda(backbone, head):
        images = torch.zeros(2, 3, 64, 64, dtype=torch.uint8, device=CUDA)
        for mode in REAL_IMAGE_MODES:
            probs = segment_real(
                backbone, head, images, ["a dog", "a cat and a dog"], [["dog"], ["cat", "dog"]], [1, 2], mode
            )
            assert on_cuda(probs) and probs.shape == (2, 2, 64, 64)


def test_deeplab_segmenter_step_on_cuda():
    from datamodules.segmentation import flip_horizontally
    from grounded_diffusion.models.segmenters import DeepLabV3

    segmenter = DeepLabV3(5, "mobilenet_v3_large", None)
    with fake_cuda(segmenter):
        batch = {
            "image": torch.zeros(2, 3, 64, 64, dtype=torch.uint8, device=CUDA),
            "labels": torch.zeros(2, 64, 64, dtype=torch.uint8, device=CUDA),
        }
        batch = flip_horizontally(batch)  # the datamodule's, on the batch's device
        images, labels = batch["image"], batch["labels"].long()
        loss = segmenter.loss(images, labels)
        assert on_cuda(loss) and on_cuda(segmenter.scores(images.float() / 255))


def test_segmenter_oracle_labels_on_cuda():
    from grounded_diffusion.models.oracle import SegmenterOracle

    oracle = SegmenterOracle()  # the shipped shapes-world oracle
    oracle.build()
    with fake_cuda(oracle):
        images = torch.zeros(2, 3, 64, 64, dtype=torch.uint8, device=CUDA)
        masks, scores = oracle(images, [["red circle"], ["blue ring", "green cross"]])
        assert on_cuda(masks) and on_cuda(scores) and masks.shape == (2, 2, 64, 64)


def test_evaluation_metrics_update_on_cuda():
    """Metric updates use no boolean indexing and no int(): they stay on the device."""
    from grounded_diffusion.metrics import CategoryIoU, GroupedIoU, PairConfusion, SemanticIoU

    metrics = torch.nn.ModuleList(
        [CategoryIoU(4), GroupedIoU(4, ["ours", "daam"]), SemanticIoU(5), PairConfusion(4)]
    )
    with fake_cuda(metrics):
        preds = torch.zeros(2, 2, 16, 16, dtype=torch.bool, device=CUDA)
        categories = torch.tensor([[0, 3], [2, -1]], device=CUDA)
        metrics[0].update(preds, preds, categories)
        metrics[1].update("ours", preds, preds, categories, ["two_seen", "one_unseen"])
        metrics[2].update(
            torch.zeros(16, 16, dtype=torch.long, device=CUDA),
            torch.zeros(16, 16, dtype=torch.long, device=CUDA),
        )
        assert on_cuda(metrics[0].intersection) and on_cuda(metrics[1].image_noun_iou["ours__all"].count)
        assert on_cuda(metrics[1].on_other_object["ours__all"].on_other)
        assert on_cuda(metrics[2].confusion)
        metrics[3].update(preds, preds, categories, categories)
        assert on_cuda(metrics[3].on_other) and on_cuda(metrics[3].predicted)
