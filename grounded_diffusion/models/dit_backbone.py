"""A frozen diffusion transformer (SD3 / SD3.5, FLUX.1, FLUX.2) whose blocks' image tokens are captured at one step.

The DiT counterpart of a UNet block output is a transformer block's image-token stream: SD3's
joint blocks and the FLUX double-stream blocks return (text, image) streams, FLUX.1's single-stream
blocks split their joint sequence back into the same pair, FLUX.2's return it whole, [text, image],
and its image part is taken. A tapped block's image tokens [B, N, D] are laid back on the latent
grid, [B, D, rows, columns] (SD3: the latent over its patch size; FLUX: over its 2x2 packing or
patchifying). All taps share that resolution, so each tapped block is one feature group of the
grounding head (``HeadConfig.group_channels`` takes one width per block).

Block names are the transformer's own: ``transformer_blocks.{i}`` (SD3, FLUX double-stream) and
``single_transformer_blocks.{i}`` (FLUX). Sampling is the pipelines' rectified flow
(FlowMatchEulerDiscreteScheduler, with SD3's fixed shift or FLUX's image-size-dependent one);
the capture step counts from the end as for the UNet (t=1: the last step). SD3 samples with a
classifier-free guidance batch [uncond, cond]; FLUX.1-dev is guidance-distilled: one branch, its
guidance scale an input of every transformer call (``BackboneConfig.guidance_embedding``), as is
FLUX.2 [dev]'s; FLUX.2 [klein]'s base models call the transformer twice per step, conditional then
unconditional, and only the conditional call is captured and traced (its distilled models: once).
The latents of FLUX.2 are what its transformer sees: the VAE's latents patchified 2x2 and
normalised by the VAE's batch-norm statistics, [B, 4C, h/2, w/2].
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux2.pipeline_flux2 import format_input
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from torch import Tensor, nn

from grounded_diffusion.errors import ConfigError, check_choice
from grounded_diffusion.models.backbone import (
    CATEGORY_TEMPLATE,
    DTYPES,
    BackboneConfig,
    Branches,
    Dtype,
    FrozenBackbone,
    Generation,
    PromptEmbeds,
    compile_in_place,
    load_pipeline,
)
from grounded_diffusion.models.daam import TextStream, WordMatching, word_token_indices
from grounded_diffusion.models.joint_attention import JointAttentionTracer

Family = Literal["sd3", "flux", "flux2"]
FAMILIES: dict[type, Family] = {
    StableDiffusion3Pipeline: "sd3",
    FluxPipeline: "flux",
    Flux2KleinPipeline: "flux2",  # FLUX.2 [klein]: Qwen3 text
    Flux2Pipeline: "flux2",  # FLUX.2 [dev]: Mistral 3 text behind a multimodal processor
}
DIT_PIPELINES = tuple(FAMILIES)
PROMPT_MARK = "\x00prompt\x00"  # stands for the prompt where FLUX.2's chat markup is rendered


class CallGate:
    """Open for the first of every ``period`` transformer calls: FLUX.2 [klein]'s base models call
    the transformer for the conditional branch, then the unconditional one, at every step."""

    def __init__(self, period: int = 1) -> None:
        self.period, self.calls, self.open = period, 0, True

    @contextlib.contextmanager
    def counting(self, transformer: nn.Module) -> Iterator[CallGate]:
        def before_call(module, args):
            self.open, self.calls = self.calls % self.period == 0, self.calls + 1

        handle = transformer.register_forward_pre_hook(before_call)
        try:
            yield self
        finally:
            handle.remove()


class DiffusionTransformerBackbone(FrozenBackbone):
    """Frozen SD3 / FLUX.1 / FLUX.2 ([klein] and [dev]): text embeddings, VAE encoding, and transformer block
    features. ``family``: ``sd3``, ``flux`` (FLUX.1) or ``flux2``."""

    baseline_name = "joint attention"

    def __init__(self, config: BackboneConfig | None = None, pipeline=None) -> None:
        """``pipeline``: an already loaded SD3 or FLUX pipeline to use instead of ``config.model_id``."""
        super().__init__()
        self.config = config = config or BackboneConfig()
        check_choice("dtype", config.dtype, Dtype)
        check_choice("branches", config.branches, Branches)
        pipeline = pipeline if pipeline is not None else load_pipeline(config.model_id, DTYPES[config.dtype])
        if not isinstance(pipeline, DIT_PIPELINES):
            raise ConfigError(
                f"'{config.model_id}' is a {type(pipeline).__name__}, not an SD3, FLUX.1 or FLUX.2 pipeline"
            )
        if pipeline.transformer.dtype != DTYPES[config.dtype]:
            pipeline = pipeline.to(dtype=DTYPES[config.dtype])
        self.family = next(family for kind, family in FAMILIES.items() if isinstance(pipeline, kind))
        if self.is_flux and config.branches != "cond":
            raise ConfigError(
                "branches 'uncond+cond': FLUX.1 is guidance-distilled and samples without an unconditional "
                "branch (FLUX.2 [klein] runs it as a call of its own, not captured); use 'cond'"
            )
        if config.channels_last:
            raise ConfigError(
                "channels_last speeds up a UNet's convolutions; a diffusion transformer has none: set false"
            )
        self.pipeline_class, self.scheduler_config = type(pipeline), dict(pipeline.scheduler.config)
        self.system_message = getattr(pipeline, "system_message", None)  # FLUX.2 [dev]'s, in its chat markup
        # The pipeline's own settings beside its modules (FLUX.2 [klein]: is_distilled).
        accepted = inspect.signature(self.pipeline_class.__init__).parameters
        self.pipeline_settings = {
            k: v for k, v in pipeline.config.items() if k in accepted and not isinstance(v, (list, tuple))
        }
        self.idle_scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        self.transformer, self.vae = pipeline.transformer, pipeline.vae
        self.text_modules = {
            name: getattr(pipeline, name, None)
            for name in (
                "text_encoder",
                "tokenizer",
                "text_encoder_2",
                "tokenizer_2",
                "text_encoder_3",
                "tokenizer_3",
            )
        }
        for name, module in self.text_modules.items():
            if isinstance(module, nn.Module):
                self.add_module(name, module)
        self.requires_grad_(False)
        self.eval()
        if config.compile_backend is not None:
            compile_in_place(self.transformer, config.compile_backend)
        self.max_sequence_length = config.max_sequence_length
        if self.max_sequence_length is None:
            self.max_sequence_length = 512 if self.is_flux else 256
        default_guidance = 4.0 if self.family == "flux2" else 3.5  # the pipelines' defaults
        self.guidance_embedding = (
            default_guidance if config.guidance_embedding is None else config.guidance_embedding
        )
        # SD3's native size is its config's; the FLUX pipelines assume 128 latent pixels (1024 px).
        self.image_size = config.image_size or pipeline.default_sample_size * self.vae_scale_factor
        patch = self.patch_size
        if self.image_size % (self.vae_scale_factor * patch):
            raise ConfigError(
                f"image_size {self.image_size} must be a multiple of {self.vae_scale_factor * patch} "
                f"(the VAE's {self.vae_scale_factor}x times the {patch}x{patch} patches)"
            )
        self.latent_size = self.image_size // self.vae_scale_factor
        self.grid = (self.latent_size // patch,) * 2
        self.prompt_start = self._prompt_start()
        schedule = self._schedule(config.num_inference_steps)
        timesteps, sigmas = schedule.timesteps.tolist(), schedule.sigmas.tolist()
        self.timestep, self.sigma = timesteps[-config.capture_step], sigmas[-config.capture_step - 1]
        # The inversion's Euler steps as Python floats (timestep, from σ, to σ), σ rising from 0 to
        # the capture step's: the loop then reads nothing back and makes no scheduler.
        rising_t, rising_sigma = [0.0, *timesteps[::-1]], sigmas[::-1]
        self.inversion_steps = [
            (rising_t[k], rising_sigma[k], rising_sigma[k + 1]) for k in range(config.capture_step)
        ]
        self.block_modules = self._block_modules()
        self.block_names = self._chosen("blocks", config.blocks, self._default_blocks())
        self.attention_names = self._chosen(
            "attention_blocks", config.attention_blocks, list(self.block_modules)
        )
        # Fusion steps as (timestep, σ): a flow-matching timestep is σ times the train timesteps.
        self.num_train_timesteps = self.idle_scheduler.config.num_train_timesteps
        self.fusion_points = [
            (timesteps[-k], timesteps[-k] / self.num_train_timesteps) for k in config.fusion_steps or []
        ]
        self._trace_gate: CallGate | None = None  # the open trace's, while one is open

    @property
    def is_flux(self) -> bool:
        """FLUX.1 or FLUX.2: [text, image] token order, no batched guidance branch."""
        return self.family != "sd3"

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    @property
    def text_dim(self) -> int:
        """Width of the text tokens the transformer reads (and the category embeddings)."""
        return self.transformer.config.joint_attention_dim

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def patch_size(self) -> int:
        """Latent pixels per image token along a side: SD3's patch size; FLUX packs (FLUX.2:
        patchifies) 2x2 latents."""
        return 2 if self.is_flux else self.transformer.config.patch_size

    @property
    def tokenizer(self):
        """The tokenizer of the category embeddings' stream: SD3's CLIP, FLUX.1's T5, FLUX.2's
        Qwen3 or Mistral 3 (the tokenizer inside [dev]'s processor)."""
        tokenizer = self.text_modules["tokenizer_2" if self.family == "flux" else "tokenizer"]
        return getattr(tokenizer, "tokenizer", tokenizer)

    def _prompt_start(self) -> int:
        """Tokens before the prompt's own in FLUX.2's chat markup, rendered as its pipelines do:
        [klein] one Qwen3 user turn, the assistant's turn opened, thinking off; [dev] its system
        message, then the user turn."""
        if self.family != "flux2":
            return 0
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

    def text_streams(self) -> list[TextStream]:
        """Where each tokenizer's tokens lie in the transformer's text sequence: SD3's 77 CLIP
        tokens then its T5 tokens; FLUX.1's T5 tokens; FLUX.2's Qwen3 tokens after the chat markup."""
        if self.is_flux:
            start = self.prompt_start
            return [TextStream(self.tokenizer, start, self.max_sequence_length - start)]
        clip = self.text_modules["tokenizer"]
        streams = [TextStream(clip, 0, clip.model_max_length)]
        # Without a T5 encoder the pipeline puts zeros in its place: no words there to trace.
        if self.text_modules["text_encoder_3"] is not None and self.max_sequence_length:
            streams.append(
                TextStream(self.text_modules["tokenizer_3"], clip.model_max_length, self.max_sequence_length)
            )
        return streams

    # -- blocks ---------------------------------------------------------------------------------

    def _block_modules(self) -> dict[str, nn.Module]:
        blocks = {f"transformer_blocks.{i}": b for i, b in enumerate(self.transformer.transformer_blocks)}
        singles = getattr(self.transformer, "single_transformer_blocks", None) or []
        return blocks | {f"single_transformer_blocks.{i}": b for i, b in enumerate(singles)}

    def _default_blocks(self) -> list[str]:
        """Four blocks evenly spaced through the depth, the last included: a spread of the coarse
        layout early blocks carry and the semantics of later ones, at four feature groups (every
        block of a 24-block SD3 at 1536 channels each would be a 37k-channel head input)."""
        names = list(self.block_modules)
        picks = sorted({round((k + 1) * len(names) / 4) - 1 for k in range(4)})
        return [names[i] for i in picks]

    def _chosen(self, key: str, names: list[str] | None, default: list[str]) -> list[str]:
        unknown = [n for n in names or [] if n not in self.block_modules]
        if unknown:
            raise ConfigError(
                f"model.init_args.backbone.{key}: unknown blocks {unknown}; this transformer has "
                f"{list(self.block_modules)[0]} .. {list(self.block_modules)[-1]}"
            )
        return list(names or default)

    @contextlib.contextmanager
    def _capturing(self, gate: CallGate | None = None) -> Iterator[dict[str, Tensor]]:
        """The tapped blocks' image tokens of the last transformer call ``gate`` lets through."""
        captured: dict[str, Tensor] = {}
        pixels = self.grid[0] * self.grid[1]

        def hook(module, args, output, name):
            if gate is not None and not gate.open:
                return
            # (text, image) streams; FLUX.2's single-stream blocks: the whole [text, image] sequence
            captured[name] = output[1] if isinstance(output, tuple) else output[:, -pixels:]

        handles = [
            self.block_modules[name].register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
            for name in self.block_names
        ]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def _grouped_features(self, captured: dict[str, Tensor], guidance_batch: bool) -> list[Tensor]:
        """Image tokens [B', N, D] of each tapped block -> [B, D, rows, columns], one group per
        block; a guidance batch [uncond, cond] gives [uncond ‖ cond] on channels, or its cond half."""
        groups = []
        for name in self.block_names:
            tokens = captured[name]
            if guidance_batch:
                uncond, tokens = tokens.chunk(2)
                if self.config.branches == "uncond+cond":
                    tokens = torch.cat([uncond, tokens], dim=-1)
            groups.append(tokens.transpose(1, 2).unflatten(-1, self.grid))
        return groups

    def feature_channels(self) -> list[int]:
        """Channels of each feature group: the transformer's width per tapped block (twice that
        with ``uncond+cond``), once per step (the capture step, then each fusion step)."""
        width = self.transformer.config.num_attention_heads * self.transformer.config.attention_head_dim
        per_step = [width * (2 if self.config.branches == "uncond+cond" else 1)] * len(self.block_names)
        return per_step * self.config.num_timesteps

    # -- the transformer -------------------------------------------------------------------------

    def _transformer(self, latents: Tensor, timesteps: Tensor, embeds: PromptEmbeds) -> Tensor:
        """One transformer call as the pipelines make it, on unpacked latents [B, C, h, w]: the
        velocity prediction, unpacked."""
        hidden = embeds.hidden.to(self.dtype)
        pooled = None if embeds.pooled is None else embeds.pooled.to(self.dtype)
        if self.family == "flux2":
            return self._flux2_transformer(latents, timesteps, hidden)
        if not self.is_flux:
            return self.transformer(
                hidden_states=latents.to(self.dtype),
                timestep=timesteps,
                encoder_hidden_states=hidden,
                pooled_projections=pooled,
            ).sample
        batch, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(latents.to(self.dtype), batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            batch, height // 2, width // 2, latents.device, self.dtype
        )
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance_embedding, device=latents.device)
        velocity = self.transformer(
            hidden_states=packed,
            timestep=timesteps.to(self.dtype) / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=latents.device, dtype=self.dtype),
            img_ids=image_ids,
        ).sample
        return FluxPipeline._unpack_latents(
            velocity, height * self.vae_scale_factor, width * self.vae_scale_factor, self.vae_scale_factor
        )

    def _flux2_transformer(self, latents: Tensor, timesteps: Tensor, hidden: Tensor) -> Tensor:
        """FLUX.2's call: the patchified latents as tokens (row-major), 4-axis position ids
        (time, row, column, sequence) made on the device, as its pipeline's ``_prepare_*_ids``."""
        device, (rows, columns) = latents.device, latents.shape[-2:]
        zero = torch.zeros(1, dtype=torch.long, device=device)
        arange = lambda n: torch.arange(n, device=device)  # noqa: E731
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((latents.shape[0],), self.guidance_embedding, device=device)
        velocity = self.transformer(
            hidden_states=latents.to(self.dtype).flatten(2).transpose(1, 2),
            timestep=timesteps.to(self.dtype) / 1000,
            guidance=guidance,
            encoder_hidden_states=hidden,
            txt_ids=torch.cartesian_prod(zero, zero, zero, arange(hidden.shape[1])),
            img_ids=torch.cartesian_prod(zero, arange(rows), arange(columns), zero),
        ).sample
        return velocity.transpose(1, 2).unflatten(-1, (rows, columns))

    @torch.no_grad()
    def features(self, latents: Tensor, timesteps: Tensor, prompt_embeds: PromptEmbeds) -> list[Tensor]:
        """Run the transformer and return the tapped blocks' image tokens on the latent grid. With
        ``fusion_steps``, the same blocks follow at each fusion step (the groups step-major), whose
        latent is reached from the capture step's by the Euler jump along the conditional
        velocity predicted there; those calls are not traced (a trace reads the capture step)."""
        groups, velocity = self._features_and_velocity(latents, timesteps, prompt_embeds)
        sigma = (timesteps.float() / self.num_train_timesteps).view(-1, 1, 1, 1)
        for timestep, fusion_sigma in self.fusion_points:
            moved = (latents.float() + (fusion_sigma - sigma) * velocity.float()).to(latents.dtype)
            with self._untraced():
                more, _ = self._features_and_velocity(
                    moved, torch.full_like(timesteps, timestep), prompt_embeds
                )
            groups += more
        return groups

    def _features_and_velocity(
        self, latents: Tensor, timesteps: Tensor, prompt_embeds: PromptEmbeds
    ) -> tuple[list[Tensor], Tensor]:
        """One transformer call: the tapped blocks' groups and the conditional velocity."""
        batch, guidance_batch = len(latents), self.config.branches == "uncond+cond"
        if guidance_batch:
            prompt_embeds = self.unconditional_embeds(len(prompt_embeds)).cat(prompt_embeds)
            latents, timesteps = torch.cat([latents, latents]), torch.cat([timesteps, timesteps])
        with self._capturing() as captured:
            velocity = self._transformer(latents, timesteps, prompt_embeds)
        return self._grouped_features(captured, guidance_batch), velocity[-batch:]

    @contextlib.contextmanager
    def _untraced(self) -> Iterator[None]:
        """Transformer calls inside are left out of the open trace, if any."""
        gate = self._trace_gate
        if gate is not None:
            gate.open = False
        try:
            yield
        finally:
            if gate is not None:
                gate.open = True

    @contextlib.contextmanager
    def trace_words(
        self,
        prompts: Sequence[str],
        words: Sequence[Sequence[str]],
        matching: WordMatching = "whole",
        gate: CallGate | None = None,
    ) -> Iterator[JointAttentionTracer]:
        """Trace the joint-attention maps of ``words`` (one list per prompt) over every transformer
        call inside (that ``gate`` lets through); ``tracer.word_maps()`` then gives them on the
        token grid [B, O, rows, columns]."""
        attentions = [self.block_modules[name].attn for name in self.attention_names]
        gate = gate or CallGate()
        tracer = JointAttentionTracer(attentions, image_first=not self.is_flux, gate=gate)
        clip = 0 if self.is_flux else self.text_modules["tokenizer"].model_max_length  # SD3: CLIP first
        text_length = clip + self.max_sequence_length
        self._trace_gate = gate
        try:
            with tracer.trace(self.text_streams(), prompts, words, text_length, self.grid, matching):
                yield tracer
        finally:
            self._trace_gate = None

    # -- text ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _encode(self, prompts: Sequence[str], unconditional: bool = False) -> PromptEmbeds:
        """The pipeline's own text encoding: SD3's CLIP-L ‖ CLIP-G tokens (zero-padded to the T5
        width) followed by its T5 tokens, with both CLIPs' pooled embeddings; FLUX.1's T5 tokens
        with CLIP's pooled embedding; FLUX.2's Qwen3 hidden states of three layers (no pooled
        text). ``unconditional``: SD3's encoding of the empty negative prompt."""
        # (text encoding never steps the scheduler: one made at start-up serves, and a new one per
        # call would read its sigmas back to the host)
        pipe, device = self.pipeline(self.idle_scheduler), self.transformer.device
        if self.family == "flux2":
            hidden, _ = pipe.encode_prompt(
                list(prompts), device=device, max_sequence_length=self.max_sequence_length
            )
            return PromptEmbeds(hidden)
        if self.is_flux:
            hidden, pooled, _ = pipe.encode_prompt(
                list(prompts), None, device=device, max_sequence_length=self.max_sequence_length
            )
            return PromptEmbeds(hidden, pooled)
        hidden, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            list(prompts),
            None,
            None,
            device=device,
            do_classifier_free_guidance=unconditional,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(uncond, uncond_pooled) if unconditional else PromptEmbeds(hidden, pooled)

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """What the transformer's text stream reads, and the pooled text, one row per prompt."""
        return self._encode(prompts)

    def unconditional_embeds(self, batch: int) -> PromptEmbeds:
        """SD3's guidance batch's unconditional half, encoded once and repeated."""
        return self._encode([""], unconditional=True).expand(batch)

    @torch.no_grad()
    def category_embeddings(self, categories: Sequence[str], template: str = CATEGORY_TEMPLATE) -> Tensor:
        """One embedding per category [N, D]: its contextualised tokens in the template,
        averaged, in the first text stream (SD3: CLIP; FLUX.1: T5; FLUX.2: Qwen3)."""
        stream = self.text_streams()[0]
        prompts = [template.format(c) for c in categories]
        hidden = self.encode_prompts(prompts).hidden
        weights = torch.zeros(hidden.shape[:2], device=hidden.device, dtype=hidden.dtype)
        for row, (prompt, category) in enumerate(zip(prompts, categories)):
            positions = word_token_indices(stream.tokenizer, prompt, category, max_length=stream.length)
            weights[row, [stream.start + p for p in positions]] = 1 / len(positions)
        return torch.einsum("nt,ntd->nd", weights, hidden)

    # -- images and noise ------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1], [B, 3, H, W] -> shifted and scaled latents (the posterior mean);
        FLUX.2: patchified and normalised by the VAE's batch-norm statistics, as its pipeline does."""
        latents = self.vae.encode(images.to(self.dtype)).latent_dist.mean
        if self.family == "flux2":
            patches = Flux2KleinPipeline._patchify_latents(latents)
            mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(patches.dtype)
            std = (self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).sqrt()
            return (patches - mean) / std.to(patches.dtype)
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def _schedule(self, num_inference_steps: int) -> FlowMatchEulerDiscreteScheduler:
        """The sampling schedule exactly as the pipeline sets it at this image size."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        options, tokens = {}, self.grid[0] * self.grid[1]
        if scheduler.config.get("use_dynamic_shifting") and self.family == "flux2":
            options["mu"] = compute_empirical_mu(tokens, num_inference_steps)  # (FLUX.2: steps count too)
        elif scheduler.config.get("use_dynamic_shifting"):
            options["mu"] = calculate_shift(
                tokens,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.15 if self.is_flux else 1.16),
            )
        if self.is_flux:  # the FLUX pipelines pass their own sigmas
            scheduler.set_timesteps(
                sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), **options
            )
        else:
            scheduler.set_timesteps(num_inference_steps, **options)
        return scheduler

    def _timesteps(self, num_inference_steps: int) -> list[float]:
        return self._schedule(num_inference_steps).timesteps.tolist()

    @torch.no_grad()
    def latents_at_capture_step(
        self, latents: Tensor, prompt_embeds: PromptEmbeds, noise: Tensor | None = None, mode: str = "noise"
    ) -> Tensor:
        """Bring clean latents to the capture step. ``noise``: the rectified-flow forward process
        x_σ = (1 - σ) x_0 + σ ε with the given noise. ``ddim_inversion``: its deterministic
        counterpart for a flow model, the sampler's Euler steps run backwards (σ rising from 0
        through the schedule), one transformer call per step, conditioned on the prompt."""
        if mode == "noise":
            if noise is None:
                raise ConfigError("mode='noise' needs the noise tensor (one draw per sample)")
            return ((1 - self.sigma) * latents.float() + self.sigma * noise.float()).to(latents.dtype)
        if mode == "ddim_inversion":
            for t, sigma, next_sigma in self.inversion_steps:
                t_batch = torch.full((latents.shape[0],), t, device=latents.device)
                velocity = self._transformer(latents, t_batch, prompt_embeds)
                latents = (latents.float() + (next_sigma - sigma) * velocity.float()).to(latents.dtype)
            return latents
        raise ConfigError(f"mode '{mode}' is not one of 'noise', 'ddim_inversion'")

    # -- generation -----------------------------------------------------------------------------

    def pipeline(self, scheduler: FlowMatchEulerDiscreteScheduler | None = None):
        """A diffusers pipeline over these (shared) modules, with a fresh flow-matching scheduler
        unless given one."""
        accepted = inspect.signature(self.pipeline_class.__init__).parameters
        modules = {
            name: module for name, module in self.text_modules.items() if name in accepted
        }  # (None too)
        pipe = self.pipeline_class(
            transformer=self.transformer,
            vae=self.vae,
            scheduler=scheduler or FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            **modules,
            **self.pipeline_settings,
        )
        if self.system_message is not None:
            pipe.system_message = self.system_message
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def latent_shape(self) -> tuple[int, int, int]:
        """One sample's latent shape at the configured image size (FLUX.2: patchified 2x2)."""
        if self.family == "flux2":
            return (4 * self.vae.config.latent_channels, *self.grid)
        return (self.vae.config.latent_channels, self.latent_size, self.latent_size)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        guidance_scale: float = 7.0,
        words: Sequence[Sequence[str]] | None = None,
        word_matching: str = "whole",
        num_inference_steps: int | None = None,
    ) -> Generation:
        """Sample images (SD3 and FLUX.2 [klein] base: classifier-free guidance at
        ``guidance_scale``; FLUX.1 and FLUX.2 [dev]: their guidance embedding,
        ``BackboneConfig.guidance_embedding``),
        capturing the block features and the latent at the capture step, and the joint-attention
        maps of ``words`` over all steps (conditional branch)."""
        if self.config.branches == "uncond+cond" and guidance_scale <= 1:
            raise ConfigError(
                "branches 'uncond+cond' needs guidance_scale > 1 (no unconditional branch otherwise)"
            )
        steps = num_inference_steps or self.config.num_inference_steps
        step = steps - self.capture_step_for(steps)  # loop index of the capture step
        pipe, noise = self.pipeline(), self.initial_noise(seeds)
        at_capture: dict = {"latents": noise} if step == 0 else {}

        def unpacked(latents: Tensor) -> Tensor:
            if self.family == "flux2":  # tokens in row-major order, as its pipeline's ids place them
                return latents.transpose(1, 2).unflatten(-1, self.grid)
            if self.family == "flux":
                return FluxPipeline._unpack_latents(
                    latents, self.image_size, self.image_size, self.vae_scale_factor
                )
            return latents

        def on_step_end(pipe, i, t, kwargs):
            if i == step - 1:
                at_capture["latents"] = unpacked(kwargs["latents"])
            if i == step:
                at_capture["features"] = dict(captured)
            return {}

        latents, gate = noise, CallGate()
        if self.family == "flux":
            latents = FluxPipeline._pack_latents(noise, len(noise), *self.latent_shape())
        if isinstance(pipe, Flux2KleinPipeline):  # (the FLUX.2 pipelines take them unpacked)
            gate.period = 2 if guidance_scale > 1 and not pipe.config.is_distilled else 1
        embedded = self.family == "flux" or self.transformer.config.get("guidance_embeds", False)
        guidance = self.guidance_embedding if embedded else guidance_scale
        tracing = self.trace_words(prompts, words, word_matching, gate) if words else contextlib.nullcontext()
        with gate.counting(self.transformer), self._capturing(gate) as captured, tracing as tracer:
            images = pipe(
                prompt=list(prompts),
                height=self.image_size,
                width=self.image_size,
                num_inference_steps=steps,
                latents=latents,
                output_type="pt",
                callback_on_step_end=on_step_end,
                max_sequence_length=self.max_sequence_length,
                guidance_scale=guidance,
            ).images
        latents, at_step = at_capture["latents"].to(self.dtype), at_capture["features"]
        guidance_batch = at_step[self.block_names[0]].shape[0] == 2 * len(prompts)
        features = self._grouped_features(at_step, guidance_batch)
        if self.fusion_points:  # the fusion steps' features: from the capture step's latent, as in replay
            t = torch.full((len(latents),), self.timestep, device=latents.device)
            features = self.features(latents, t, self.encode_prompts(prompts))
        return Generation(
            images=(images * 255).round().clamp(0, 255).to(torch.uint8),
            latents=latents,
            features=features,
            heat_maps=tracer.word_maps() if words else None,
        )
