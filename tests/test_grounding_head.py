import pytest
import torch
import torch.nn.functional as F

from grounded_diffusion.models.grounding_head import GroundingHead, HeadConfig, MixConv

CHANNELS = [48, 40, 24, 16]
SIZES = [2, 4, 8, 16]


def make_inputs(batch=2, objects=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = [torch.randn(batch, c, s, s, generator=g) for c, s in zip(CHANNELS, SIZES)]
    return groups, torch.randn(batch, objects, 32, generator=g)


@pytest.fixture
def head():
    torch.manual_seed(0)
    return GroundingHead(
        CHANNELS, 32, HeadConfig(group_channels=[16, 8, 8, 8], embed_dim=32, num_heads=4, ffn_dim=64)
    )


def test_output_shape_and_fused_width(head):
    groups, text = make_inputs()
    out = head(groups, text, torch.ones(2, 2, dtype=torch.bool), (64, 64))
    assert out.shape == (2, 2, 64, 64)
    assert head.visual_encoder.out_channels == 40
    assert head.visual_encoder(groups).shape == (2, 40, 16, 16)


def test_padding_slots_do_not_change_real_objects(head):
    groups, text = make_inputs(batch=1)
    one = head(groups, text[:, :1], torch.ones(1, 1, dtype=torch.bool))
    padded = head(
        groups, torch.cat([text[:, :1], torch.randn(1, 1, 32) * 100], 1), torch.tensor([[True, False]])
    )
    torch.testing.assert_close(padded[:, :1], one, rtol=1e-5, atol=1e-5)


def test_normalisation_is_the_same_in_train_and_eval():
    block = MixConv(16)
    x = torch.randn(3, 16, 8, 8)
    train_out = block.train()(x)
    eval_out = block.eval()(x)
    torch.testing.assert_close(train_out, eval_out)
    # and one sample's output does not depend on its batch-mates (unlike BatchNorm in training)
    torch.testing.assert_close(block.train()(x[:1]), train_out[:1])


# The authors' Segmodule (Lipurple/Grounded-Diffusion, ldm/models/seg_module.py), parameter by
# parameter from its layer definitions, at SD-1.5's group channels (both branches, 512²).
AUTHORS_PARAMETERS = {
    "1x1 convs, no bias (8²: 16, 16²: 32, 32²: 64, 64²: 128)": 15360 * 16
    + 14080 * 32
    + 8320 * 64
    + 5120 * 128,
    "Mix-Conv blocks: two 3x3 convs with bias at widths 48, 112, 240": sum(
        2 * (w * w * 9 + w) for w in (48, 112, 240)
    ),
    "to_k: 4x4 patches of the 240-ch map -> 512, no bias": 240 * 16 * 512,
    "to_q: 768 -> 512, no bias": 768 * 512,
    "3 decoder layers: 2 bias-free attentions, FFN 2048, 3 LayerNorms": 3
    * (2 * 4 * 512 * 512 + 2 * 512 * 2048 + 2048 + 512 + 3 * 2 * 512),
    "MLP 512 -> 512 -> 512 -> 240": 2 * (512 * 512 + 512) + 512 * 240 + 240,
}
# What ours adds: biases on the 1x1 convs, the patch and text projections and the attentions
# (torch's defaults), GroupNorm's affine weights (the authors' BN is parameter-free), the
# LayerNorm of the visual tokens, and the decoder's final LayerNorm.
OUR_EXTRA_PARAMETERS = {
    "1x1 conv biases": 16 + 32 + 64 + 128,
    "GroupNorm weight + bias, two per Mix-Conv": sum(2 * 2 * w for w in (48, 112, 240)),
    "patch and text projection biases": 512 + 512,
    "attention in/out projection biases": 3 * 2 * (3 * 512 + 512),
    "visual-token LayerNorm": 2 * 512,
    "final LayerNorm": 2 * 512,
}


def test_paper_widths_and_parameters_match_the_authors_head():
    head = GroundingHead([15360, 14080, 8320, 5120], 768)  # SD-1.5 groups 8², 16², 32², 64²
    widths = {conv.in_channels: conv.out_channels for conv in head.visual_encoder.reduce}
    assert widths == {15360: 16, 14080: 32, 8320: 64, 5120: 128}  # the finest group gets the most
    assert [mix.body[2].in_channels for mix in head.visual_encoder.mix] == [48, 112, 240]
    assert head.visual_encoder.out_channels == 240
    authors = sum(AUTHORS_PARAMETERS.values())
    assert authors == 18_796_560  # "~18.8 M"
    ours = sum(p.numel() for p in head.parameters())
    assert ours == authors + sum(OUR_EXTRA_PARAMETERS.values())  # 18,813,760: +17,200 (0.09 %)


def test_group_count_mismatch_is_named():
    with pytest.raises(ValueError, match="4 resolution groups but group_channels has 3"):
        GroundingHead(CHANNELS, 32, HeadConfig(group_channels=[8, 8, 8]))


def test_timesteps_are_fused_per_group_with_learned_softmax_weights():
    """Two steps of the same groups, step-major: at first each group is the mean of its steps;
    the weights get gradients, and a head with weights moved mixes the steps as their softmax."""
    torch.manual_seed(0)
    config = HeadConfig(group_channels=[16, 8, 8, 8], embed_dim=32, num_heads=4, ffn_dim=64)
    head = GroundingHead(CHANNELS * 2, 32, config, num_timesteps=2)
    (first, text), (second, _) = make_inputs(seed=0), make_inputs(seed=1)
    for fused, a, b in zip(head.fuse_timesteps(first + second), first, second):
        torch.testing.assert_close(fused, (a + b) / 2)
    head(first + second, text, torch.ones(2, 2, dtype=torch.bool)).square().mean().backward()
    assert head.timestep_weights.grad.abs().min() > 0  # every group's weights are learned
    with torch.no_grad():
        head.timestep_weights[2] = torch.tensor([0.0, torch.log(torch.tensor(3.0))])  # weights 1/4, 3/4
    torch.testing.assert_close(head.fuse_timesteps(first + second)[2], first[2] / 4 + 3 * second[2] / 4)
    assert (
        sum(p.numel() for p in head.parameters())
        == sum(p.numel() for p in GroundingHead(CHANNELS, 32, config).parameters()) + 4 * 2
    )


def test_groups_that_are_not_whole_steps_are_refused():
    with pytest.raises(ValueError, match="are not 2 steps of the same groups"):
        GroundingHead(CHANNELS + CHANNELS[::-1], 32, HeadConfig(group_channels=[8, 8, 8, 8]), num_timesteps=2)


def two_object_batch(signatures, generator, batch, scale=100.0):
    """Two objects of different categories per sample, each a 5x5 square on a 16² map. Every
    feature group marks an object's pixels with its category's signature, at UNet-like magnitudes
    (at initialisation the visual tokens come out 4x the text queries' norm)."""
    categories = torch.stack(
        [torch.randperm(len(signatures[0]), generator=generator)[:2] for _ in range(batch)]
    )
    masks = torch.zeros(batch, 2, 16, 16)
    corners = torch.randint(0, 12, (batch, 2, 2), generator=generator).tolist()
    for b, objects in enumerate(corners):
        for o, (y, x) in enumerate(objects):
            masks[b, o, y : y + 5, x : x + 5] = 1
    masks[:, 0] *= 1 - masks[:, 1]  # the second object in front
    groups = [
        scale * torch.einsum("bohw,boc->bchw", F.adaptive_avg_pool2d(masks, size), signature[categories])
        + torch.randn(batch, signature.shape[1], size, size, generator=generator)
        for signature, size in zip(signatures, SIZES)
    ]
    return groups, categories, masks


def test_the_text_tells_two_objects_apart_when_unet_features_are_large():
    """Only the text query says which of the two objects to segment, and the category embeddings
    share most of their norm (as CLIP's do). Unnormalised visual tokens used to drown the queries:
    after 150 steps that head gave each object nearly the same mask (IoU 0.37-0.72 over seeds 0-2);
    with the visual tokens normalised it reaches 0.94-0.98."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    signatures = [torch.randn(8, c, generator=g) for c in CHANNELS]
    text = 3 * torch.randn(1, 32, generator=g) + 0.5 * torch.randn(8, 32, generator=g)
    head = GroundingHead(
        CHANNELS,
        32,
        HeadConfig(group_channels=[8, 8, 8, 8], embed_dim=32, num_heads=4, num_layers=2, ffn_dim=64),
    )
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    both = torch.ones(16, 2, dtype=torch.bool)
    for _ in range(150):
        groups, categories, masks = two_object_batch(signatures, g, batch=16)
        loss = F.binary_cross_entropy_with_logits(head(groups, text[categories], both), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    groups, categories, masks = two_object_batch(signatures, g, batch=64)
    with torch.no_grad():
        predicted = head(groups, text[categories], both.new_ones(64, 2)) > 0
    truth = masks.bool()
    iou = (predicted & truth).flatten(2).sum(-1) / (predicted | truth).flatten(2).sum(-1).clamp(min=1)
    assert iou.mean() >= 0.85, f"mean IoU {iou.mean():.3f}"
