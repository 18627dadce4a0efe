"""No host syncs in the per-step loops, so that a GPU never waits for its host between steps.

Counted on the CPU with ``HostSyncs`` (tests/host_syncs.py): every ``.item()``, ``int(t)``,
``if tensor:``, ``nonzero`` and boolean-mask index, which on a GPU would make the host wait. The
sampling loop is diffusers' own, whose DDIM scheduler reads its timestep every step; what ours
adds to it (feature capture, DAAM tracing) must add no sync per step. Everything else on the hot
path (DDIM inversion, noising, replay, the head's forward, loss and backward, DAAM over one UNet
call, the metric updates) reads nothing back at all. ``tests/test_gpu.py`` counts the same on CUDA."""

import pytest
import torch

from grounded_diffusion.losses import grounding_loss
from grounded_diffusion.metrics import CategoryIoU, GroupedIoU, PairConfusion
from grounded_diffusion.models.backbones import BackboneConfig, StableDiffusionBackbone
from grounded_diffusion.models.daam import DAAMTracer
from grounded_diffusion.models.grounding_head import GroundingHead, HeadConfig
from host_syncs import HostSyncs

PROMPTS = ["a photograph of a dog", "a photograph of a cat and a dog"]
WORDS = [["dog"], ["cat", "dog"]]


def sampling_syncs(steps: int, device: str, counter) -> tuple:
    """Host syncs of the plain diffusers pipeline and of our synthesis step (capture + DAAM),
    the same modules, prompts and noise, ``steps`` DDIM steps with guidance."""
    backbone = StableDiffusionBackbone(BackboneConfig(num_inference_steps=steps, capture_step=1)).to(device)
    with counter(device) as plain:
        noise = backbone.initial_noise([1, 2])
        backbone.pipeline()(
            PROMPTS, num_inference_steps=steps, guidance_scale=5.0, latents=noise, output_type="pt"
        )
    with counter(device) as ours:
        backbone.generate(PROMPTS, [1, 2], 5.0, words=WORDS)
    return plain, ours


def assert_sampling_adds_no_sync_per_step(device: str = "cpu", counter=HostSyncs) -> tuple:
    """``counter``: HostSyncs, or on a GPU CudaSyncWarnings (PyTorch's own count). Returns the
    counts of the plain pipeline and of ours at 5 steps."""
    (plain2, ours2), (plain5, ours5) = sampling_syncs(2, device, counter), sampling_syncs(5, device, counter)
    per_step_plain, per_step_ours = (plain5.count - plain2.count) / 3, (ours5.count - ours2.count) / 3
    assert per_step_ours == per_step_plain, (per_step_ours, per_step_plain, ours5.where - plain5.where)
    return plain5, ours5


def test_sampling_with_capture_and_daam_adds_no_sync_per_step_to_diffusers_own():
    plain, ours = assert_sampling_adds_no_sync_per_step()
    # Once per generation: the check that the capture step is the configured timestep.
    assert ours.count - plain.count <= 1, ours.where - plain.where


@pytest.mark.parametrize("mode", ["noise", "ddim_inversion"])
def test_real_image_conversion_and_replay_read_nothing_back(mode):
    backbone = StableDiffusionBackbone(BackboneConfig(num_inference_steps=6, capture_step=4))
    assert len(backbone.inversion_timesteps) > 1
    with HostSyncs() as syncs:
        embeds = backbone.encode_prompts(PROMPTS)
        latents = backbone.encode_images(torch.zeros(2, 3, 64, 64))
        at_t = backbone.latents_at_capture_step(latents, embeds, torch.randn_like(latents), mode)
        backbone.replay_features(at_t, torch.full((2,), backbone.timestep), PROMPTS)
    assert syncs.count == 0, syncs.where


def test_head_training_step_and_metric_updates_read_nothing_back(backbone):
    with HostSyncs() as syncs:
        latents = torch.randn(2, 4, 8, 8)
        features = backbone.replay_features(latents, torch.full((2,), backbone.timestep), PROMPTS)
    head = GroundingHead(
        [f.shape[1] for f in features],
        backbone.text_dim,
        HeadConfig(group_channels=[16, 16, 8, 8], embed_dim=32, num_heads=4, ffn_dim=64),
    )
    categories = torch.tensor([[0, 3], [2, -1]])
    masks = torch.zeros(2, 2, 32, 32, dtype=torch.bool)
    masks[0, 0, :8] = True  # the other masks are empty: ignored as zero masks
    metrics = [CategoryIoU(4), GroupedIoU(4, ["ours"]), PairConfusion(4)]
    with syncs:
        embeds = backbone.category_embeddings(["dog", "cat", "hot dog", "bear"])
        logits = head(features, embeds[categories.clamp(min=0)], categories >= 0, (32, 32))
        grounding_loss(logits, masks, categories, ignore_zero_masks=True).backward()
        preds = logits.detach() > 0
        metrics[0].update(preds, masks, categories)
        metrics[1].update("ours", preds, masks, categories, ["one_seen", "two_seen"])
        metrics[2].update(preds, masks, categories, categories)
    assert syncs.count == 0, syncs.where


def test_daam_over_a_unet_call_reads_nothing_back(backbone):
    tracer = DAAMTracer(backbone.unet)
    with HostSyncs() as syncs:
        embeds = backbone.encode_prompts(PROMPTS)
        with tracer.trace(backbone.tokenizer, PROMPTS, WORDS):
            backbone.features(torch.randn(2, 4, 8, 8), torch.full((2,), backbone.timestep), embeds)
        tracer.word_maps()
    assert syncs.count == 0, syncs.where


def test_the_counter_sees_what_would_sync():
    """The ops that make a GPU wait are counted, on the device asked about only."""
    x = torch.arange(6.0)
    with HostSyncs() as syncs:
        x.sum().item(), int(x[0]), bool(x.any()), x.nonzero(), x[x > 2]
        y = x * 2 + 1  # no value read: not counted
    assert syncs.count == 5 and y.shape == x.shape
    with HostSyncs("cuda") as on_a_gpu:
        x.sum().item()
    assert on_a_gpu.count == 0
