import pytest
import torch

from grounded_diffusion.models.grounding_head import HeadConfig
from lightning_modules.grounding import GroundingModule

SMALL = HeadConfig(group_channels=[8, 8, 8, 8], embed_dim=16, num_heads=2, ffn_dim=32)


def test_nan_loss_stops_with_the_samples_named():
    module = GroundingModule(head=SMALL)
    module.category_embeds = torch.zeros(3, 64)
    features = [torch.full((1, c, s, s), float("nan")) for c, s in zip([384, 352, 224, 224], [2, 4, 8, 16])]
    batch = {
        "id": ["scene-train-000042"],
        "features": features,
        "masks": torch.ones(1, 2, 16, 16, dtype=torch.bool),
        "categories": torch.tensor([[0, -1]]),
    }
    with pytest.raises(FloatingPointError, match="scene-train-000042.*--ckpt_path last"):
        module.training_step(batch, 0)


def test_unknown_real_image_mode_fails_at_construction():
    with pytest.raises(ValueError, match="real_image_mode 'inversion'"):
        GroundingModule(head=SMALL, real_image_mode="inversion")
