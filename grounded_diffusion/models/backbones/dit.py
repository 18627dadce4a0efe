"""A frozen diffusion transformer whose blocks' image tokens are captured at one step: what the
families (SD3 / SD3.5 in ``sd3.py``, FLUX.1 in ``flux.py``, FLUX.2 in ``flux2.py``) share.

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

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor, nn

from grounded_diffusion.errors import ConfigError
from grounded_diffusion.models.backbones.base import (
    FrozenBackbone,
    Generation,
    PromptEmbeds,
    compile_in_place,
)
from grounded_diffusion.models.backbones.config import CATEGORY_TEMPLATE, BackboneConfig
from grounded_diffusion.models.concept_attention import ConceptAttentionTracer, ada_norm_zero_modulation
from grounded_diffusion.models.daam import TextStream, WordMatching, word_token_indices
from grounded_diffusion.models.joint_attention import JointAttentionTracer


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
    """A frozen diffusion transformer: text embeddings, VAE encoding, and transformer block
    features. What differs between families is in one subclass per family, a file each
    (``sd3.py``, ``flux.py``, ``flux2.py``), registered by pipeline class in ``FAMILIES``
    (``backbones/__init__.py``); this class holds what they share.

    A family sets ``family`` (its name in messages and tests), ``pipelines`` (the diffusers
    pipeline classes it runs), the class settings below, and overrides ``_transformer`` and
    ``_encode`` (and, where it differs, the hooks after them)."""

    baseline_method = "joint_attention"
    concept_attention = True
    # The text stream's modulation of the concept tokens in a joint block (FLUX.2: its own).
    concept_modulation = staticmethod(ada_norm_zero_modulation)
    family: str
    pipelines: tuple[type, ...] = ()
    text_first = False  # the joint sequence is [text, image] (FLUX), not [image, text] (SD3)
    guidance_batch_possible = True  # whether branches 'uncond+cond' can be captured
    default_max_sequence_length = 256
    default_guidance_embedding = 3.5  # the pipeline's guidance input, where the transformer has one
    default_max_shift = 1.16  # the schedule's dynamic shift, where the scheduler config lacks it
    explicit_sigmas = False  # the pipeline sets the schedule from its own sigmas (FLUX)
    category_tokenizer = "tokenizer"  # the text stream the category embeddings come from

    def __init__(self, config: BackboneConfig | None = None, pipeline=None) -> None:
        """``pipeline``: an already loaded SD3 or FLUX pipeline to use instead of ``config.model_id``."""
        super().__init__()
        self.config = config = config or BackboneConfig()
        expected = " or ".join(p.__name__ for p in self.pipelines)
        pipeline = self._load(
            config, pipeline, self.pipelines, f"not a {expected} ({self.family}'s backbone)"
        )
        if not self.guidance_batch_possible and config.branches != "cond":
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
            self.max_sequence_length = self.default_max_sequence_length
        self.guidance_embedding = (
            self.default_guidance_embedding
            if config.guidance_embedding is None
            else config.guidance_embedding
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
        self.concept_blocks = self._concept_blocks(config.concept_blocks)
        # Fusion steps as (timestep, σ): a flow-matching timestep is σ times the train timesteps.
        self.num_train_timesteps = self.idle_scheduler.config.num_train_timesteps
        self.fusion_points = [
            (timesteps[-k], timesteps[-k] / self.num_train_timesteps) for k in config.fusion_steps or []
        ]
        self._trace_gate: CallGate | None = None  # the open trace's, while one is open

    @property
    def is_flux(self) -> bool:
        """FLUX.1 or FLUX.2: [text, image] token order, no batched guidance branch."""
        return self.text_first

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    @property
    def text_dim(self) -> int:
        """Width of the text tokens the transformer reads (and the category embeddings)."""
        return self.transformer.config.joint_attention_dim

    @property
    def patch_size(self) -> int:
        """Latent pixels per image token along a side (SD3: its patch size; FLUX packs 2x2)."""
        return self.transformer.config.patch_size

    @property
    def tokenizer(self):
        """The tokenizer of the category embeddings' stream (``category_tokenizer``; the one inside
        a multimodal processor)."""
        tokenizer = self.text_modules[self.category_tokenizer]
        return getattr(tokenizer, "tokenizer", tokenizer)

    def _prompt_start(self) -> int:
        """Tokens before the prompt's own in the text stream (FLUX.2: its chat markup)."""
        return 0

    def text_streams(self) -> list[TextStream]:
        """Where each tokenizer's tokens lie in the transformer's text sequence (FLUX: one stream,
        after the prompt's start; SD3 overrides it)."""
        start = self.prompt_start
        return [TextStream(self.tokenizer, start, self.max_sequence_length - start)]

    def _text_offset(self) -> int:
        """Where the first text stream's tokens start in the joint attention's text sequence."""
        return 0

    # -- blocks ---------------------------------------------------------------------------------

    def _block_modules(self) -> dict[str, nn.Module]:
        return transformer_blocks(self.transformer)

    def _default_blocks(self) -> list[str]:
        return evenly_spaced_blocks(list(self.block_modules))

    def _chosen(self, key: str, names: list[str] | None, default: list[str]) -> list[str]:
        unknown = [n for n in names or [] if n not in self.block_modules]
        if unknown:
            raise ConfigError(
                f"model.init_args.backbone.{key}: unknown blocks {unknown}; this transformer has "
                f"{list(self.block_modules)[0]} .. {list(self.block_modules)[-1]}"
            )
        return list(names or default)

    def _block_output(self, output) -> Tensor:
        if self.config.features_from == "attention":
            # An attention's (image, text) outputs; a single-stream one's whole [text, image] sequence.
            return output[0] if isinstance(output, tuple) else output[:, -self.grid[0] * self.grid[1] :]
        return image_tokens(output, self.grid[0] * self.grid[1])

    def _tapped_module(self, name: str) -> nn.Module:
        block = self.block_modules[name]
        return block.attn if self.config.features_from == "attention" else block

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
        """One transformer call as the family's pipeline makes it, on unpacked latents [B, C, h, w]:
        the velocity prediction, unpacked."""
        raise NotImplementedError

    def _guidance(self, batch: int, device) -> Tensor | None:
        """The guidance-embedding input of a transformer that has one (FLUX.1-dev, FLUX.2 [dev])."""
        if not self.transformer.config.get("guidance_embeds", False):
            return None
        return torch.full((batch,), self.guidance_embedding, device=device)

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
        batch = len(latents)
        latents, timesteps, prompt_embeds, guidance_batch = self._guidance_batch(
            latents, timesteps, prompt_embeds
        )
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

    def _concept_blocks(self, names: list[str] | None) -> list[int]:
        """Positions among the joint blocks (``transformer_blocks``) of ``names``; by default
        the second half of them."""
        joint = [f"transformer_blocks.{i}" for i in range(len(self.transformer.transformer_blocks))]
        unknown = [n for n in names or [] if n not in joint]
        if unknown or names == []:
            what = f"{unknown} are not joint blocks" if unknown else "names no block"
            raise ConfigError(
                f"model.init_args.backbone.concept_blocks: {what}; ConceptAttention runs in "
                f"{joint[0]} .. {joint[-1]} (null: the second half)"
            )
        return sorted(joint.index(n) for n in names) if names else list(range(len(joint) // 2, len(joint)))

    @torch.no_grad()
    def concept_tokens(self, words: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor, Tensor, int]:
        """ConceptAttention's concepts for each prompt: its categories (``words``), then the
        background concepts. Each concept's tokens are its name's tokens, encoded alone by the
        pipeline's text path (every text stream: SD3's CLIP and T5 alike), then the transformer's
        context embedder. Returns the tokens [B, K, D] (padded), the real ones [B, K], each
        concept's mean over its tokens [B, C, K], and the number of category concepts."""
        background = list(self.config.concept_background)
        names = sorted({name for prompt in words for name in prompt} | set(background))
        hidden = self.encode_prompts(names).hidden
        streams = self.text_streams()
        pieces = {}
        for row, name in enumerate(names):
            positions = [
                stream.start + p
                for stream in streams
                for p in word_token_indices(stream.tokenizer, name, name, max_length=stream.length)
            ]
            pieces[name] = hidden[row, positions]
        categories = max(len(prompt) for prompt in words)
        concepts = [[*prompt, *[None] * (categories - len(prompt)), *background] for prompt in words]
        length = max(sum(len(pieces[c]) for c in row if c is not None) for row in concepts)
        tokens = hidden.new_zeros(len(words), length, hidden.shape[-1])
        real = torch.zeros(len(words), length, dtype=torch.bool, device=hidden.device)
        weights = torch.zeros(len(words), len(concepts[0]), length, device=hidden.device)
        for b, row in enumerate(concepts):
            start = 0
            for c, name in enumerate(row):
                if name is None or not len(pieces[name]):
                    continue
                end = start + len(pieces[name])
                tokens[b, start:end], real[b, start:end], weights[b, c, start:end] = (
                    pieces[name],
                    True,
                    1 / (end - start),
                )
                start = end
        return self.transformer.context_embedder(tokens), real, weights, categories

    @contextlib.contextmanager
    def trace_concepts(
        self, words: Sequence[Sequence[str]], gate: CallGate | None = None
    ) -> Iterator[ConceptAttentionTracer]:
        """ConceptAttention over every transformer call inside (that ``gate`` lets through), for
        the categories ``words`` (one list per prompt) and the background concepts;
        ``tracer.word_maps()`` then gives the categories' maps on the token grid [B, O, rows,
        columns] (``models/concept_attention.py``). Without ``gate``, the open word trace's, if any
        (so that both leave out the same calls)."""
        gate = gate or self._trace_gate
        tokens, real, weights, categories = self.concept_tokens(words)
        tracer = ConceptAttentionTracer(
            self.transformer.transformer_blocks,
            self.concept_blocks,
            self.concept_modulation,
            image_first=not self.text_first,
            gate=gate,
        )
        with tracer.trace(tokens, real, weights, categories, self.grid):
            yield tracer

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
        tracer = JointAttentionTracer(attentions, image_first=not self.text_first, gate=gate)
        text_length = self._text_offset() + self.max_sequence_length
        self._trace_gate = gate
        try:
            with tracer.trace(self.text_streams(), prompts, words, text_length, self.grid, matching):
                yield tracer
        finally:
            self._trace_gate = None

    # -- text ----------------------------------------------------------------------------------

    def _encode(self, prompts: Sequence[str], unconditional: bool = False) -> PromptEmbeds:
        """The family pipeline's own text encoding (``unconditional``: of the empty negative
        prompt, for a guidance batch)."""
        raise NotImplementedError

    def _encoding_pipeline(self):
        """A pipeline to encode text with, and its device: text encoding never steps the
        scheduler, so one made at start-up serves (a new one per call would read its sigmas back
        to the host)."""
        return self.pipeline(self.idle_scheduler), self.device

    @torch.no_grad()
    def category_embeddings(self, categories: Sequence[str], template: str = CATEGORY_TEMPLATE) -> Tensor:
        """One embedding per category [N, D]: its contextualised tokens in the template,
        averaged, in the first text stream (SD3: CLIP; FLUX.1: T5; FLUX.2: Qwen3 or Mistral 3)."""
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
        """Images in [-1, 1], [B, 3, H, W] -> shifted and scaled latents (the posterior mean)."""
        latents = self.vae.encode(images.to(self.dtype)).latent_dist.mean
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def _schedule(self, num_inference_steps: int) -> FlowMatchEulerDiscreteScheduler:
        """The sampling schedule exactly as the pipeline sets it at this image size."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        options = {}
        if scheduler.config.get("use_dynamic_shifting"):
            options["mu"] = self._shift(scheduler, num_inference_steps)
        if self.explicit_sigmas:  # the FLUX pipelines pass their own sigmas
            scheduler.set_timesteps(
                sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), **options
            )
        else:
            scheduler.set_timesteps(num_inference_steps, **options)
        return scheduler

    def _shift(self, scheduler: FlowMatchEulerDiscreteScheduler, num_inference_steps: int) -> float:
        """The schedule's dynamic shift at this image size, as the pipeline computes it."""
        return calculate_shift(
            self.grid[0] * self.grid[1],
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", self.default_max_shift),
        )

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
        pipe = self._with_offload(pipe)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def latent_shape(self) -> tuple[int, int, int]:
        """One sample's latent shape at the configured image size."""
        return (self.vae.config.latent_channels, self.latent_size, self.latent_size)

    def _pack(self, latents: Tensor) -> Tensor:
        """Unpacked latents [B, C, h, w] -> what the pipeline's sampling loop takes."""
        return latents

    def _unpack(self, latents: Tensor) -> Tensor:
        """The pipeline's sampling-loop latents -> unpacked [B, C, h, w]."""
        return latents

    def _calls_per_step(self, pipe, guidance_scale: float) -> int:
        """Transformer calls per sampling step, the captured (conditional) one first."""
        return 1

    def _guidance_embedded(self) -> bool:
        """Whether the pipeline's ``guidance_scale`` is the transformer's guidance embedding
        (guidance-distilled models) rather than classifier-free guidance."""
        return bool(self.transformer.config.get("guidance_embeds", False))

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        guidance_scale: float = 7.0,
        words: Sequence[Sequence[str]] | None = None,
        word_matching: str = "whole",
        num_inference_steps: int | None = None,
        concept_attention: bool = True,
    ) -> Generation:
        """Sample images (SD3 and FLUX.2 [klein] base: classifier-free guidance at
        ``guidance_scale``; FLUX.1 and FLUX.2 [dev]: their guidance embedding,
        ``BackboneConfig.guidance_embedding``),
        capturing the block features and the latent at the capture step, and the joint-attention
        and (unless ``concept_attention`` is false) ConceptAttention maps of ``words`` over all
        steps (conditional branch)."""
        steps, step = self._steps_to_capture(guidance_scale, num_inference_steps)  # (step: its loop index)
        pipe, noise = self.pipeline(), self.initial_noise(seeds)
        at_capture: dict = {"latents": noise} if step == 0 else {}

        def on_step_end(pipe, i, t, kwargs):
            if i == step - 1:
                at_capture["latents"] = self._unpack(kwargs["latents"])
            if i == step:
                at_capture["features"] = dict(captured)
            return {}

        latents, gate = self._pack(noise), CallGate(self._calls_per_step(pipe, guidance_scale))
        guidance = self.guidance_embedding if self._guidance_embedded() else guidance_scale
        tracing = self.trace_words(prompts, words, word_matching, gate) if words else contextlib.nullcontext()
        traced_concepts = words and concept_attention
        concepts = self.trace_concepts(words, gate) if traced_concepts else contextlib.nullcontext()
        with (
            gate.counting(self.transformer),
            self._capturing(gate) as captured,
            tracing as tracer,
            concepts as concept_tracer,
        ):
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
            concept_maps=concept_tracer.word_maps() if traced_concepts else None,
        )


def transformer_blocks(transformer: nn.Module) -> dict[str, nn.Module]:
    """A diffusion transformer's joint (double-stream) blocks, then its single-stream ones, by name."""
    blocks = {f"transformer_blocks.{i}": b for i, b in enumerate(transformer.transformer_blocks)}
    singles = getattr(transformer, "single_transformer_blocks", None) or []
    return blocks | {f"single_transformer_blocks.{i}": b for i, b in enumerate(singles)}


def image_tokens(output, count: int) -> Tensor:
    """A block's image tokens: the image stream of a (text, image) output; of FLUX.2's
    single-stream blocks' whole [text, image] sequence, the last ``count`` tokens."""
    return output[1] if isinstance(output, tuple) else output[:, -count:]


def evenly_spaced_blocks(names: list[str], count: int = 4) -> list[str]:
    """``count`` blocks evenly spaced through the depth, the last included: a spread of the coarse
    layout early blocks carry and the semantics of later ones, at four feature groups (every
    block of a 24-block SD3 at 1536 channels each would be a 37k-channel head input)."""
    picks = sorted({round((k + 1) * len(names) / count) - 1 for k in range(count)})
    return [names[i] for i in picks]
