import pytest
import torch

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
    return GroundingHead(CHANNELS, 32, HeadConfig(group_channels=[16, 8, 8, 8], embed_dim=32, num_heads=4, ffn_dim=64))


def test_output_shape_and_fused_width(head):
    groups, text = make_inputs()
    out = head(groups, text, torch.ones(2, 2, dtype=torch.bool), (64, 64))
    assert out.shape == (2, 2, 64, 64)
    assert head.visual_encoder.out_channels == 40
    assert head.visual_encoder(groups).shape == (2, 40, 16, 16)


def test_padding_slots_do_not_change_real_objects(head):
    groups, text = make_inputs(batch=1)
    one = head(groups, text[:, :1], torch.ones(1, 1, dtype=torch.bool))
    padded = head(groups, torch.cat([text[:, :1], torch.randn(1, 1, 32) * 100], 1), torch.tensor([[True, False]]))
    torch.testing.assert_close(padded[:, :1], one, rtol=1e-5, atol=1e-5)


def test_normalisation_is_the_same_in_train_and_eval():
    block = MixConv(16)
    x = torch.randn(3, 16, 8, 8)
    train_out = block.train()(x)
    eval_out = block.eval()(x)
    torch.testing.assert_close(train_out, eval_out)
    # and one sample's output does not depend on its batch-mates (unlike BatchNorm in training)
    torch.testing.assert_close(block.train()(x[:1]), train_out[:1])


def test_paper_widths():
    head = GroundingHead([15360, 14080, 8320, 5120], 768)  # SD-1.5, both branches, 512^2
    assert head.visual_encoder.out_channels == 240
    assert 15e6 < sum(p.numel() for p in head.parameters()) < 25e6  # authors' head: ~18.8 M


def test_group_count_mismatch_is_named():
    with pytest.raises(ValueError, match="4 resolution groups but group_channels has 3"):
        GroundingHead(CHANNELS, 32, HeadConfig(group_channels=[8, 8, 8]))
