"""FLUX.2 as a backbone: ``Flux2KleinPipeline`` ([klein], base and step-distilled: Qwen3 text) and
``Flux2Pipeline`` ([dev]: Mistral 3 text behind a multimodal processor, a guidance embedding).

The text is the hidden states of three layers of its language model, over the prompt in its
chat markup (no pooled text). Its latents are what its transformer sees: the VAE's latents
patchified 2x2 and normalised by the VAE's batch-norm statistics, [B, 4C, h/2, w/2], as tokens in
row-major order with 4-axis position ids. Single-stream blocks return the whole [text, image]
sequence. The [klein] base models call the transformer twice per step (conditional, then
unconditional): only the conditional call is captured and traced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import format_input
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from torch import Tensor

from grounded_diffusion.models.backbones.base import PromptEmbeds
from grounded_diffusion.models.backbones.flux import FluxBackbone
from grounded_diffusion.models.concept_attention import flux2_modulation

PROMPT_MARK = "\x00prompt\x00"  # stands for the prompt where the chat markup is rendered


class Flux2Backbone(FluxBackbone):
    family = "flux2"
    concept_modulation = staticmethod(flux2_modulation)  # the text stream's shift, scale, gate
    pipelines = (Flux2KleinPipeline, Flux2Pipeline)
    default_guidance_embedding = 4.0  # (the pipelines' default)
    category_tokenizer = "tokenizer"  # (Qwen3, or the tokenizer inside [dev]'s processor)

    def _prompt_start(self) -> int:
        """Tokens before the prompt's own in the chat markup, rendered as its pipelines do:
        [klein] one Qwen3 user turn, the assistant's turn opened, thinking off; [dev] its system
        message, then the user turn."""
        if self.pipeline_class is Flux2Pipeline:
            conversation = format_input([PROMPT_MARK], self.system_message)[0]
            rendered = self.text_modules["tokenizer"].apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=False
            )
        else:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": PROMPT_MARK}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
        prefix = rendered[: rendered.index(PROMPT_MARK)]
        return len(self.tokenizer(prefix, add_special_tokens=False).input_ids)

    def _transformer(self, latents: Tensor, timesteps: Tensor, embeds: PromptEmbeds) -> Tensor:
        """The patchified latents as tokens (row-major), 4-axis position ids (time, row, column,
        sequence) made on the device, as its pipeline's ``_prepare_*_ids``."""
        hidden = embeds.hidden.to(self.dtype)
        device, (rows, columns) = latents.device, latents.shape[-2:]
        zero = torch.zeros(1, dtype=torch.long, device=device)
        arange = lambda n: torch.arange(n, device=device)  # noqa: E731
        velocity = self.transformer(
            hidden_states=latents.to(self.dtype).flatten(2).transpose(1, 2),
            timestep=timesteps.to(self.dtype) / 1000,
            guidance=self._guidance(latents.shape[0], device),
            encoder_hidden_states=hidden,
            txt_ids=torch.cartesian_prod(zero, zero, zero, arange(hidden.shape[1])),
            img_ids=torch.cartesian_prod(zero, arange(rows), arange(columns), zero),
        ).sample
        return velocity.transpose(1, 2).unflatten(-1, (rows, columns))

    @torch.no_grad()
    def _encode(self, prompts: Sequence[str], unconditional: bool = False) -> PromptEmbeds:
        """The hidden states of three layers of its language model (no pooled text)."""
        pipe, device = self._encoding_pipeline()
        hidden, _ = pipe.encode_prompt(
            list(prompts), device=device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeds(hidden)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> the posterior mean, patchified and normalised by the VAE's
        batch-norm statistics, as its pipeline does."""
        latents = self.vae.encode(images.to(self.dtype)).latent_dist.mean
        patches = Flux2KleinPipeline._patchify_latents(latents)
        mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(patches.dtype)
        std = (self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).sqrt()
        return (patches - mean) / std.to(patches.dtype)

    def _shift(self, scheduler: FlowMatchEulerDiscreteScheduler, num_inference_steps: int) -> float:
        return compute_empirical_mu(self.grid[0] * self.grid[1], num_inference_steps)  # (steps count too)

    def latent_shape(self) -> tuple[int, int, int]:
        """Patchified 2x2."""
        return (4 * self.vae.config.latent_channels, *self.grid)

    def _pack(self, latents: Tensor) -> Tensor:
        return latents  # (its pipelines take them unpacked)

    def _unpack(self, latents: Tensor) -> Tensor:
        return latents.transpose(1, 2).unflatten(-1, self.grid)  # (tokens in row-major order)

    def _calls_per_step(self, pipe, guidance_scale: float) -> int:
        if isinstance(pipe, Flux2KleinPipeline) and guidance_scale > 1 and not pipe.config.is_distilled:
            return 2  # (conditional, then unconditional)
        return 1

    def _guidance_embedded(self) -> bool:
        return bool(self.transformer.config.get("guidance_embeds", False))  # ([dev]; [klein]: guidance)
