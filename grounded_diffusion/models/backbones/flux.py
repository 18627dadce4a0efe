"""FLUX.1 as a backbone: ``FluxPipeline`` (dev, schnell).

Its blocks read [text, image] sequences (double-stream blocks return the pair, single-stream
blocks split their joint sequence back into it); the text is T5 tokens with CLIP's pooled
embedding. Latents are packed 2x2 into tokens. FLUX.1-dev is guidance-distilled: one branch, its
guidance scale an input of every transformer call (``BackboneConfig.guidance_embedding``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import FluxPipeline
from torch import Tensor

from grounded_diffusion.models.backbones.base import PromptEmbeds
from grounded_diffusion.models.backbones.dit import DiffusionTransformerBackbone


class FluxBackbone(DiffusionTransformerBackbone):
    family = "flux"
    pipelines = (FluxPipeline,)
    text_first = True
    guidance_batch_possible = False
    default_max_sequence_length = 512
    default_max_shift = 1.15
    explicit_sigmas = True
    category_tokenizer = "tokenizer_2"  # (T5)

    @property
    def patch_size(self) -> int:
        return 2  # (the pipeline packs 2x2 latents into a token)

    def _transformer(self, latents: Tensor, timesteps: Tensor, embeds: PromptEmbeds) -> Tensor:
        hidden = embeds.hidden.to(self.dtype)
        batch, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(latents.to(self.dtype), batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            batch, height // 2, width // 2, latents.device, self.dtype
        )
        velocity = self.transformer(
            hidden_states=packed,
            timestep=timesteps.to(self.dtype) / 1000,
            guidance=self._guidance(batch, latents.device),
            pooled_projections=embeds.pooled.to(self.dtype),
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=latents.device, dtype=self.dtype),
            img_ids=image_ids,
        ).sample
        return FluxPipeline._unpack_latents(
            velocity, height * self.vae_scale_factor, width * self.vae_scale_factor, self.vae_scale_factor
        )

    @torch.no_grad()
    def _encode(self, prompts: Sequence[str], unconditional: bool = False) -> PromptEmbeds:
        """FLUX.1's T5 tokens with CLIP's pooled embedding."""
        pipe, device = self._encoding_pipeline()
        hidden, pooled, _ = pipe.encode_prompt(
            list(prompts), None, device=device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeds(hidden, pooled)

    def _pack(self, latents: Tensor) -> Tensor:
        return FluxPipeline._pack_latents(latents, len(latents), *self.latent_shape())

    def _unpack(self, latents: Tensor) -> Tensor:
        return FluxPipeline._unpack_latents(latents, self.image_size, self.image_size, self.vae_scale_factor)

    def _guidance_embedded(self) -> bool:
        return True  # (the pipeline's guidance_scale is the embedding's; schnell has none and ignores it)
