"""What every frozen backbone shares (``FrozenBackbone``), and the values they pass around:
``PromptEmbeds`` (what the denoiser is conditioned on), ``Generation`` (a generated batch and what
was captured on the way)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from torch import Tensor, nn

from grounded_diffusion.errors import ConfigError, check_choice, check_in_range
from grounded_diffusion.models.backbones.config import (
    CATEGORY_TEMPLATE,
    DTYPES,
    BackboneConfig,
    Branches,
    Dtype,
)
from grounded_diffusion.models.backbones.loading import load_pipeline


@dataclass
class PromptEmbeds:
    """What the UNet is conditioned on: cross-attention states [B, 77, D] and, for SDXL, the
    pooled text embedding [B, P] (``None`` for SD-1.x/2.x)."""

    hidden: Tensor
    pooled: Tensor | None = None

    def __getitem__(self, index) -> PromptEmbeds:
        return PromptEmbeds(self.hidden[index], None if self.pooled is None else self.pooled[index])

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def expand(self, batch: int) -> PromptEmbeds:
        """One row repeated ``batch`` times (a view, no copy)."""
        pooled = None if self.pooled is None else self.pooled.expand(batch, -1)
        return PromptEmbeds(self.hidden.expand(batch, -1, -1), pooled)

    def cat(self, other: PromptEmbeds) -> PromptEmbeds:
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled])
        return PromptEmbeds(torch.cat([self.hidden, other.hidden]), pooled)


@dataclass
class Generation:
    """One batch of generated samples and what was captured on the way.

    images: RGB uint8 [B, 3, H, W]; latents: [B, C, h, w] in the UNet's dtype, what the UNet saw
    at the capture step; features: the captured groups, coarse first; heat_maps: DAAM maps of the
    traced words [B, O, h, w] (None when no words were given), or the joint-attention maps on a
    diffusion transformer; concept_maps: ConceptAttention's maps of the words (transformers only).
    """

    images: Tensor
    latents: Tensor
    features: list[Tensor]
    heat_maps: Tensor | None
    concept_maps: Tensor | None = None


def capture_timestep(scheduler_config: dict, num_inference_steps: int, capture_step: int) -> int:
    """The UNet timestep of paper step t (t=1 is the last denoising step)."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps)
    if not 1 <= capture_step <= num_inference_steps:
        raise ConfigError(
            f"capture_step={capture_step} must lie in 1..num_inference_steps={num_inference_steps}"
        )
    return int(scheduler.timesteps[-capture_step])


def compile_in_place(module: nn.Module, backend: str) -> None:
    """``torch.compile`` a module in place (hooks and pipelines keep working), or one line naming
    the backends there are."""
    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ConfigError(
            f"compile_backend '{backend}' is not one of torch.compile's {backends} (null: eager)"
        )
    module.compile(backend=backend)


class FrozenBackbone(nn.Module):
    """What the frozen UNet and transformer backbones share, written once: loading the pipeline
    they are built on, inference mode, prompt encoding, per-seed noise, block capture hooks, the
    guidance batch, cache replay, and where a sampling schedule meets the capture step.

    Subclasses (``unet.py``; ``dit.py`` and a file per transformer family) define ``denoiser``
    (the UNet or transformer), ``timestep``, ``_encode``, ``features``, ``latent_shape``,
    ``_timesteps`` and ``_block_output``.
    """

    config: BackboneConfig
    timestep: float
    block_modules: dict[str, nn.Module]
    block_names: list[str]
    # The training-free baseline that tracing gives: the key of its maps and scores (reports.TRAINING_FREE).
    baseline_method = "daam"
    # ConceptAttention (``trace_concepts``): diffusion transformers only; its maps sit beside.
    concept_attention = False

    def trace_concepts(self, words, gate=None):
        """ConceptAttention (diffusion transformers: ``dit.py``)."""
        raise ConfigError(
            f"ConceptAttention runs on diffusion transformers (SD3, FLUX.1, FLUX.2); {self.config.model_id} "
            "is a UNet, whose training-free baseline is DAAM"
        )

    def _load(self, config: BackboneConfig, pipeline, kinds: tuple[type, ...], other: str):
        """The pipeline this backbone is built on (``pipeline``, or loaded from
        ``config.model_id``) in the configured dtype, or one line when it is not of ``kinds``
        (``other``: what to do then)."""
        check_choice("dtype", config.dtype, Dtype)
        check_choice("branches", config.branches, Branches)
        pipeline = (
            pipeline
            if pipeline is not None
            else load_pipeline(config.model_id, DTYPES[config.dtype], config.quantization)
        )
        if not isinstance(pipeline, kinds):
            raise ConfigError(f"'{config.model_id}' is a {type(pipeline).__name__}, {other}")
        denoiser = pipeline.unet if hasattr(pipeline, "unet") else pipeline.transformer
        if denoiser.dtype != DTYPES[config.dtype]:
            pipeline = pipeline.to(dtype=DTYPES[config.dtype])
        return pipeline

    def train(self, mode: bool = True) -> FrozenBackbone:
        return super().train(False)  # frozen: dropout and norms always in inference mode

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def device(self) -> torch.device:
        """Where the models run: the denoiser's device, or with offload the device they are
        brought to while they run."""
        return self._offload_device or self.denoiser.device

    # -- offload ---------------------------------------------------------------------------------

    _offload_device: torch.device | None = None
    _offload_pipeline = None

    def _apply(self, fn, recurse: bool = True):
        """With ``offload``, a move to an accelerator (``.to("cuda")``, Lightning's placement)
        leaves the models on the CPU and has diffusers bring each to that device while it runs."""
        if self.config.offload == "none":
            return super()._apply(fn, recurse)
        target = fn(torch.empty(0)).device
        if target.type == "cpu":
            return super()._apply(fn, recurse)
        if self._offload_device != target:
            self._enable_offload(target)
        return self

    def _enable_offload(self, device: torch.device) -> None:
        pipe = self.pipeline()
        if self.config.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_group_offload(
                onload_device=device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
            )
        self._offload_device, self._offload_pipeline = torch.device(device), pipe

    def _with_offload(self, pipe):
        """A pipeline over the shared modules that offloads them again after its call, as the one
        offload was enabled on (diffusers keeps that state on the pipeline object)."""
        if self._offload_pipeline is not None:
            for name in ("_all_hooks", "_offload_device", "_offload_gpu_id"):
                if hasattr(self._offload_pipeline, name):
                    setattr(pipe, name, getattr(self._offload_pipeline, name))
        return pipe

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -- text ------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """What the denoiser's text input reads (and the pooled text), one row per prompt."""
        return self._encode(prompts)

    def unconditional_embeds(self, batch: int) -> PromptEmbeds:
        """The guidance batch's unconditional half, as the pipeline makes it for an empty negative
        prompt: the same row for every sample, encoded once."""
        return self._encode([""], unconditional=True).expand(batch)

    # -- capture -----------------------------------------------------------------------------------

    def _block_output(self, output) -> Tensor:
        """What a tapped block's forward returns -> the feature it contributes."""
        raise NotImplementedError

    def _tapped_module(self, name: str) -> nn.Module:
        """The module whose output block ``name`` contributes (the block itself; a diffusion
        transformer may read its attention instead: ``features_from``)."""
        return self.block_modules[name]

    @contextlib.contextmanager
    def _capturing(self, gate=None) -> Iterator[dict[str, Tensor]]:
        """The chosen blocks' outputs of the last denoiser call (that ``gate``, if given, lets
        through), by block name."""
        captured: dict[str, Tensor] = {}

        def hook(module, args, output, name):
            if gate is None or gate.open:
                captured[name] = self._block_output(output)

        handles = [
            self._tapped_module(name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
            for name in self.block_names
        ]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def _guidance_batch(
        self, latents: Tensor, timesteps: Tensor, prompt_embeds: PromptEmbeds
    ) -> tuple[Tensor, Tensor, PromptEmbeds, bool]:
        """With ``branches='uncond+cond'``, the inputs of one call over both guidance branches
        [uncond, cond]; else as given. The last item says which."""
        if self.config.branches != "uncond+cond":
            return latents, timesteps, prompt_embeds, False
        uncond = self.unconditional_embeds(len(prompt_embeds))
        return (
            torch.cat([latents, latents]),
            torch.cat([timesteps, timesteps]),
            uncond.cat(prompt_embeds),
            True,
        )

    def _steps_to_capture(self, guidance_scale: float, num_inference_steps: int | None) -> tuple[int, int]:
        """A generation's step count (default the config's) and the loop index of its capture step."""
        if self.config.branches == "uncond+cond" and guidance_scale <= 1:
            raise ConfigError(
                "branches 'uncond+cond' needs guidance_scale > 1 (no unconditional branch otherwise)"
            )
        steps = num_inference_steps or self.config.num_inference_steps
        return steps, steps - self.capture_step_for(steps)

    def replay_features(self, latents: Tensor, timesteps: Tensor, prompts: Sequence[str]) -> list[Tensor]:
        """Features of a ``latents`` cache: the stored capture-step latents through the model again."""
        return self.features(latents, timesteps, self.encode_prompts(prompts))

    def initial_noise(self, seeds: Sequence[int], shape: Sequence[int] | None = None) -> Tensor:
        """One draw per seed on the CPU: a sample's noise depends on its seed alone, not on its
        batch, its device or the number of GPUs. ``shape``: one sample's latent shape (default:
        the generated images')."""
        shape = tuple(shape or self.latent_shape())
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device, self.dtype)

    def timestep_of(self, num_inference_steps: int, capture_step: int) -> float:
        """The timestep of step ``capture_step`` (counted from the end) of a ``num_inference_steps`` schedule."""
        return self._timesteps(num_inference_steps)[-capture_step]

    def _capture_index(self, num_inference_steps: int) -> int | None:
        """The index of the capture timestep in a ``num_inference_steps`` schedule, if it has it."""
        schedule = self._timesteps(num_inference_steps)
        return next((i for i, t in enumerate(schedule) if math.isclose(t, self.timestep, rel_tol=1e-6)), None)

    def step_counts_through_capture(self, limit: int = 200) -> list[int]:
        """The numbers of sampling steps (up to ``limit``) whose schedule samples the capture timestep."""
        return [n for n in range(1, limit + 1) if self._capture_index(n) is not None]

    def capture_step_for(self, num_inference_steps: int) -> int:
        """The step of a ``num_inference_steps`` schedule that samples the capture timestep
        (the features the head was trained on); a clear error when that schedule skips it."""
        if num_inference_steps == self.config.num_inference_steps:
            return self.config.capture_step
        check_in_range("num_inference_steps", num_inference_steps, 1, 1000, self.config.num_inference_steps)
        index = self._capture_index(num_inference_steps)
        if index is None:
            raise ConfigError(
                f"num_inference_steps={num_inference_steps}: no step of that schedule is at the capture timestep "
                f"{self.timestep:g} (step {self.config.capture_step} of {self.config.num_inference_steps}), where the "
                f"head's features come from; use one of {self.step_counts_through_capture(limit=100)}"
            )
        return num_inference_steps - index


def check_category_tokens(
    tokenizer, categories: Sequence[str], template: str = CATEGORY_TEMPLATE
) -> list[int]:
    """The number of tokens of each category name, or one line naming a name the text encoder
    cannot embed: empty, unknown to the tokenizer, or too long for its context in ``template``."""
    if not categories:
        raise ConfigError("no category names given: name at least one category to segment, e.g. ['dog']")
    lengths = []
    unknown = {tokenizer.unk_token_id} - {tokenizer.eos_token_id, tokenizer.pad_token_id, None}
    room = tokenizer.model_max_length - len(tokenizer(template.format(""), add_special_tokens=True).input_ids)
    for name in categories:
        ids = (
            tokenizer(name, add_special_tokens=False, verbose=False).input_ids
            if isinstance(name, str)
            else []
        )
        if not ids or unknown & set(ids):
            what = "is not text" if not isinstance(name, str) else "has no token the text encoder knows"
            raise ConfigError(
                f"category {name!r} {what}: name each category in words, e.g. 'dog' or 'traffic light'"
            )
        if len(ids) > room:
            raise ConfigError(
                f"category {name[:40]!r}... is {len(ids)} tokens, more than the {room} that fit the text encoder's "
                f"context in {template!r}: give a shorter name"
            )
        lengths.append(len(ids))
    return lengths
