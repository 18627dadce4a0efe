"""SD3 / SD3.5 as a backbone: ``StableDiffusion3Pipeline``.

Its joint blocks read [image, text] sequences; the text is CLIP-L ‖ CLIP-G tokens (zero-padded to
the T5 width) followed by T5 tokens, with both CLIPs' pooled embeddings. It samples with a
classifier-free guidance batch [uncond, cond], so both branches can be captured.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import StableDiffusion3Pipeline
from torch import Tensor

from grounded_diffusion.models.backbones.base import PromptEmbeds
from grounded_diffusion.models.backbones.dit import DiffusionTransformerBackbone
from grounded_diffusion.models.daam import TextStream


class SD3Backbone(DiffusionTransformerBackbone):
    family = "sd3"
    pipelines = (StableDiffusion3Pipeline,)

    def text_streams(self) -> list[TextStream]:
        """SD3's 77 CLIP tokens, then its T5 tokens."""
        clip = self.text_modules["tokenizer"]
        streams = [TextStream(clip, 0, clip.model_max_length)]
        # Without a T5 encoder the pipeline puts zeros in its place: no words there to trace.
        if self.text_modules["text_encoder_3"] is not None and self.max_sequence_length:
            streams.append(
                TextStream(self.text_modules["tokenizer_3"], clip.model_max_length, self.max_sequence_length)
            )
        return streams

    def _text_offset(self) -> int:
        return self.text_modules["tokenizer"].model_max_length  # (CLIP's tokens first)

    def _transformer(self, latents: Tensor, timesteps: Tensor, embeds: PromptEmbeds) -> Tensor:
        return self.transformer(
            hidden_states=latents.to(self.dtype),
            timestep=timesteps,
            encoder_hidden_states=embeds.hidden.to(self.dtype),
            pooled_projections=embeds.pooled.to(self.dtype),
        ).sample

    @torch.no_grad()
    def _encode(self, prompts: Sequence[str], unconditional: bool = False) -> PromptEmbeds:
        """SD3's CLIP-L ‖ CLIP-G tokens (zero-padded to the T5 width) followed by its T5 tokens,
        with both CLIPs' pooled embeddings; ``unconditional``: its encoding of the empty negative
        prompt."""
        pipe, device = self._encoding_pipeline()
        hidden, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            list(prompts),
            None,
            None,
            device=device,
            do_classifier_free_guidance=unconditional,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(uncond, uncond_pooled) if unconditional else PromptEmbeds(hidden, pooled)
