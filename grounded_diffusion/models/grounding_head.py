"""The grounding head (paper §4.2): visual encoder, fusion decoder, per-object mask logits.

Pure ``nn.Module``s. Inputs are UNet features grouped by resolution (coarse first), or a
diffusion transformer's, one group per tapped block, and one text embedding per object; the
output is one mask logit map per object. Features of several denoising steps (a backbone's
``fusion_steps``) come step-major, and each group's steps are fused with learned weights first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import gcd

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grounded_diffusion.errors import ConfigError, whole_number


@dataclass
class HeadConfig:
    """Widths of the grounding head; defaults are the paper's / authors' code.

    Args:
        group_channels: 1x1-conv output channels per resolution group, coarse to fine. The
            authors' code (seg_module.py) gives 16 / 32 / 64 / 128 to the 8² / 16² / 32² / 64²
            groups of a 512² image: the finest, boundary-carrying features get the most; the
            fused map has 240 channels.
        embed_dim: width of text queries and visual tokens in the fusion decoder (paper: 512).
        patch_size: visual tokens are patch_size x patch_size patches of the fused map (authors: 4).
        num_layers / num_heads / ffn_dim: the transformer decoder (paper: 3 layers; code: 8, 2048).

    At SD-1.5's sizes the defaults give 18,813,760 parameters: the authors' 18,796,560 plus the
    biases of torch's layers, GroupNorm's affine weights, the LayerNorm of the visual tokens and
    the decoder's final LayerNorm (counted layer by layer in tests/test_grounding_head.py).
    """

    group_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    embed_dim: int = 512
    patch_size: int = 4
    num_layers: int = 3
    num_heads: int = 8
    ffn_dim: int = 2048

    def __post_init__(self) -> None:
        # At config time (and when a head folder is read), before any layer is built.
        key = "model.init_args.head"
        if isinstance(self.group_channels, (str, bytes)) or not hasattr(self.group_channels, "__iter__"):
            raise ConfigError(
                f"{key}.group_channels is {self.group_channels!r}: give a list of widths, e.g. [16, 32]"
            )
        self.group_channels = [whole_number(f"{key}.group_channels", c, 1) for c in self.group_channels]
        if not self.group_channels:
            raise ConfigError(f"{key}.group_channels is empty: give one width per feature group")
        for name in ("embed_dim", "patch_size", "num_layers", "num_heads", "ffn_dim"):
            setattr(self, name, whole_number(f"{key}.{name}", getattr(self, name), 1))
        if self.embed_dim % self.num_heads:
            nearest = next(h for h in range(self.num_heads, 0, -1) if self.embed_dim % h == 0)
            raise ConfigError(
                f"{key}.embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads} (each attention "
                f"head takes an equal share): e.g. num_heads {nearest}"
            )


def group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, unlike the authors' BatchNorm, computes the same thing in train and eval mode.
    return nn.GroupNorm(gcd(channels, 32), channels)


class MixConv(nn.Module):
    """Residual block of two 3x3 convs (BigGAN-style pre-activation), blending the concatenated
    resolutions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            group_norm(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            group_norm(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class VisualEncoder(nn.Module):
    """Per-group 1x1 conv; from coarse to fine: upsample, concat with the next group, Mix-Conv."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]) -> None:
        super().__init__()
        if len(in_channels) != len(out_channels):
            raise ConfigError(
                f"The backbone gives {len(in_channels)} resolution groups but group_channels has "
                f"{len(out_channels)} entries ({list(out_channels)}); give one per group."
            )
        self.reduce = nn.ModuleList(nn.Conv2d(i, o, 1) for i, o in zip(in_channels, out_channels))
        widths = [sum(out_channels[: k + 1]) for k in range(1, len(out_channels))]
        self.mix = nn.ModuleList(MixConv(w) for w in widths)
        self.out_channels = sum(out_channels)

    def forward(self, groups: Sequence[Tensor]) -> Tensor:
        x = self.reduce[0](groups[0])
        for reduce, mix, group in zip(self.reduce[1:], self.mix, groups[1:]):
            x = F.interpolate(x, size=group.shape[-2:], mode="bilinear", align_corners=False)
            x = mix(torch.cat([x, reduce(group)], dim=1))
        return x


class GroundingHead(nn.Module):
    """Text queries attend to visual tokens; an MLP turns each into a mask embedding whose dot
    product with the fused per-pixel features gives that object's mask logits.

    ``num_timesteps``: the denoising steps the features come from (``BackboneConfig.num_timesteps``);
    ``feature_channels`` then lists every step's groups, step after step, and the head learns
    softmax weights over the steps of each group (starting equal).
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        text_dim: int,
        config: HeadConfig | None = None,
        num_timesteps: int = 1,
    ) -> None:
        super().__init__()
        self.config = config = config or HeadConfig()
        self.feature_channels, self.text_dim = list(feature_channels), text_dim  # (what a saved head records)
        per_step = len(feature_channels) // num_timesteps
        steps = [list(feature_channels[k * per_step : (k + 1) * per_step]) for k in range(num_timesteps)]
        if per_step * num_timesteps != len(feature_channels) or any(step != steps[0] for step in steps):
            raise ConfigError(
                f"feature groups {list(feature_channels)} are not {num_timesteps} steps of the same groups: "
                "build the head with the backbone's feature_channels() and num_timesteps"
            )
        # [groups, steps]: each group's mix of its steps (features of a step, unlike its blocks,
        # share their channels, so a weighted sum keeps the visual encoder as it is).
        self.timestep_weights = (
            nn.Parameter(torch.zeros(per_step, num_timesteps)) if num_timesteps > 1 else None
        )
        self.visual_encoder = VisualEncoder(steps[0], config.group_channels)
        pixel_dim = self.visual_encoder.out_channels
        self.patch_embed = nn.Conv2d(pixel_dim, config.embed_dim, config.patch_size, stride=config.patch_size)
        # UNet features are large (visual tokens ~30x the text queries' norm in the shapes world).
        # Unnormalised, the cross-attention's values swamp the residual stream. The queries then lose
        # which category they stand for, and every object gets the same mask.
        self.token_norm = nn.LayerNorm(config.embed_dim)
        self.text_proj = nn.Linear(text_dim, config.embed_dim)
        layer = nn.TransformerDecoderLayer(
            config.embed_dim,
            config.num_heads,
            config.ffn_dim,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, config.num_layers, norm=nn.LayerNorm(config.embed_dim))
        self.mask_mlp = nn.Sequential(
            nn.Linear(config.embed_dim, config.embed_dim),
            nn.ReLU(),
            nn.Linear(config.embed_dim, config.embed_dim),
            nn.ReLU(),
            nn.Linear(config.embed_dim, pixel_dim),
        )

    def forward(
        self,
        groups: Sequence[Tensor],
        text_embeds: Tensor,
        object_mask: Tensor,
        output_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """Mask logits [B, O, H, W].

        Args:
            groups: features per group (UNet: per resolution, coarse first), each [B, C_g, h_g, w_g];
                with several timesteps, every step's groups, step after step.
            text_embeds: one category embedding per object slot, [B, O, D_text].
            object_mask: [B, O] bool, False for padding slots (their logits are meaningless).
            output_size: upsample logits to this size (the mask resolution); default: features'.
        """
        pixels = self.visual_encoder(self.fuse_timesteps(groups))  # [B, C, h, w]
        tokens = self.token_norm(self.patch_embed(pixels).flatten(2).transpose(1, 2))  # [B, N, D]
        queries = self.text_proj(text_embeds)
        queries = self.decoder(queries, tokens, tgt_key_padding_mask=~object_mask)
        logits = torch.einsum("boc,bchw->bohw", self.mask_mlp(queries), pixels)
        if output_size is not None and tuple(output_size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
        return logits

    def fuse_timesteps(self, groups: Sequence[Tensor]) -> list[Tensor]:
        """Step-major groups -> one per group: its steps weighted by the softmax of its weights."""
        if self.timestep_weights is None:
            return list(groups)
        weights = self.timestep_weights.softmax(-1)
        count, steps = weights.shape
        return [sum(weights[g, k] * groups[k * count + g] for k in range(steps)) for g in range(count)]
