"""A frozen Stable Diffusion UNet (SD-1.x, SD-2.x, SDXL) whose block outputs are captured at one
denoising step.

Block names follow the CompVis UNet the authors hooked: ``input_blocks.0`` (conv_in) to
``input_blocks.11``, ``middle_block``, ``output_blocks.0`` to ``output_blocks.11`` for SD-1.x.
In diffusers terms the input blocks are the skip connections (``conv_in`` plus every down-block
layer and downsampler), and an output block is one up-block layer, the last one of a level taken
after its upsampler, exactly as CompVis groups them. Features are grouped by spatial resolution,
coarse to fine, and concatenated on channels within a group.

SD-1.x, SD-2.x (v-prediction too: the scheduler config carries it) and SDXL load alike; SDXL's two
text encoders enter through its pipeline's own ``encode_prompt`` (concatenated hidden states plus a
pooled embedding), and its UNet gets the pooled text and size conditioning with every call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from torch import Tensor, nn

from grounded_diffusion.errors import ConfigError
from grounded_diffusion.models.backbones.base import (
    FrozenBackbone,
    Generation,
    PromptEmbeds,
    capture_timestep,
    check_category_tokens,
    compile_in_place,
)
from grounded_diffusion.models.backbones.config import CATEGORY_TEMPLATE, BackboneConfig
from grounded_diffusion.models.backbones.loading import UNET_PIPELINES
from grounded_diffusion.models.daam import DAAMTracer, WordMatching


class StableDiffusionBackbone(FrozenBackbone):
    """Frozen SD: text embeddings, VAE encoding, and UNet features grouped by resolution."""

    def __init__(
        self, config: BackboneConfig | None = None, pipeline: DiffusionPipeline | None = None
    ) -> None:
        """``pipeline``: an already loaded pipeline to use instead of ``config.model_id``."""
        super().__init__()
        self.config = config = config or BackboneConfig()
        pipe = self._load(
            config,
            pipeline,
            UNET_PIPELINES,
            "a diffusion transformer: build its backbone with grounded_diffusion.models.backbones.build_backbone",
        )
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.tokenizer, self.scheduler_config = pipe.tokenizer, dict(pipe.scheduler.config)
        self.is_xl = isinstance(pipe, StableDiffusionXLPipeline)
        if self.is_xl:  # SDXL's second text encoder (it also gives the pooled embedding)
            self.text_encoder_2, self.tokenizer_2 = pipe.text_encoder_2, pipe.tokenizer_2
            self.force_zeros_for_empty_prompt = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
        self.requires_grad_(False)
        self.eval()
        if config.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if config.compile_backend is not None:
            compile_in_place(self.unet, config.compile_backend)
        if (
            config.image_size not in (None, self.image_size)
            or config.attention_blocks
            or config.max_sequence_length is not None
            or config.fusion_steps
            or config.features_from
        ):
            raise ConfigError(
                "image_size, attention_blocks, max_sequence_length, fusion_steps and features_from apply to "
                f"diffusion transformers (SD3, FLUX.1, FLUX.2); this UNet generates at its native {self.image_size} "
                "px, DAAM reads its fixed layers, and its features come from one step: leave them null"
            )
        self.timestep = capture_timestep(
            self.scheduler_config, config.num_inference_steps, config.capture_step
        )
        # DDIM inversion's steps up to the capture step, as Python ints: the loop then needs no
        # boolean indexing or int(tensor), each a host sync on a GPU.
        inverse = DDIMInverseScheduler.from_config(self.scheduler_config)
        inverse.set_timesteps(config.num_inference_steps)
        self.inversion_timesteps = [t for t in inverse.timesteps.tolist() if t <= self.timestep]
        self.block_modules = self._block_modules()
        unknown = set(config.blocks or []) - set(self.block_modules)
        if unknown:
            raise ConfigError(
                f"Unknown UNet blocks {sorted(unknown)}; this UNet has {list(self.block_modules)}"
            )
        self.block_names = list(config.blocks or self.block_modules)

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @property
    def text_dim(self) -> int:
        """Width of the text states the UNet reads (SDXL: both encoders' concatenated)."""
        return self.unet.config.cross_attention_dim

    @property
    def image_size(self) -> int:
        """The side of the images the model generates (and real images are resized to)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    # -- UNet block outputs -------------------------------------------------------------------

    def _block_modules(self) -> dict[str, nn.Module]:
        return unet_blocks(self.unet)

    def _block_output(self, output) -> Tensor:
        return output[0] if isinstance(output, tuple) else output

    def _unet(self, latents: Tensor, timesteps: Tensor, embeds: PromptEmbeds) -> Tensor:
        """One UNet call as the pipelines make it (SDXL: plus pooled text and size conditioning)."""
        added = None
        if self.is_xl:
            height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
            # original size, crop top-left, target size: the pipeline's defaults, no crop
            time_ids = torch.tensor([height, width, 0, 0, height, width], device=latents.device)
            added = {
                "text_embeds": embeds.pooled.to(self.dtype),
                "time_ids": time_ids.expand(len(latents), 6).to(self.dtype),
            }
        return self.unet(
            latents.to(self.dtype),
            timesteps,
            encoder_hidden_states=embeds.hidden.to(self.dtype),
            added_cond_kwargs=added,
        ).sample

    @torch.no_grad()
    def features(self, latents: Tensor, timesteps: Tensor, prompt_embeds: PromptEmbeds) -> list[Tensor]:
        """Run the UNet once and return the captured blocks grouped by resolution, coarse first.

        With ``branches='uncond+cond'`` each block is [unconditional ‖ conditional] on channels.
        """
        latents, timesteps, prompt_embeds, guidance_batch = self._guidance_batch(
            latents, timesteps, prompt_embeds
        )
        with self._capturing() as captured:
            self._unet(latents, timesteps, prompt_embeds)
        return self._grouped_features(captured, guidance_batch)

    def _grouped_features(self, captured: dict[str, Tensor], guidance_batch: bool) -> list[Tensor]:
        """Captured block outputs -> the configured branches, grouped by resolution. A guidance
        batch [uncond, cond] gives [uncond ‖ cond] on channels, or its cond half."""
        features = [captured[name] for name in self.block_names]
        if guidance_batch and self.config.branches == "uncond+cond":
            features = [torch.cat(f.chunk(2), dim=1) for f in features]
        elif guidance_batch:
            features = [f.chunk(2)[1] for f in features]
        return group_by_resolution(features)

    def feature_channels(self) -> list[int]:
        """Channels of each resolution group (coarse first), read off one dummy forward."""
        size = self.unet.config.sample_size
        latents = torch.zeros(1, self.unet.config.in_channels, size, size, device=self.unet.device)
        timesteps = torch.tensor(
            [self.timestep], device=self.unet.device
        )  # diffusers does not move a 1-D one
        groups = self.features(latents, timesteps, self.encode_prompts([""]))
        return [g.shape[1] for g in groups]

    # -- text ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _encode(self, prompts: Sequence[str], unconditional: bool = False) -> PromptEmbeds:
        """The pipeline's own text encoding (SD: CLIP's last hidden states; SDXL: both encoders'
        penultimate states concatenated, plus the pooled embedding); ``unconditional``: what the
        pipeline puts in the guidance batch for an empty negative prompt."""
        pipe, device = self.pipeline(), self.device
        out = pipe.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=unconditional
        )
        if self.is_xl:
            hidden, uncond, pooled, uncond_pooled = out
            return PromptEmbeds(uncond, uncond_pooled) if unconditional else PromptEmbeds(hidden, pooled)
        return PromptEmbeds(out[1] if unconditional else out[0])

    @torch.no_grad()
    def category_embeddings(self, categories: Sequence[str], template: str = CATEGORY_TEMPLATE) -> Tensor:
        """One embedding per category: its contextualised tokens in the template, averaged [N, D].

        Not the EOS/pooled token: the mean over the class name's own BPE tokens.
        """
        prefix = template.split("{}")[0]
        start = 1 + len(self.tokenizer(prefix, add_special_tokens=False).input_ids)  # after BOS
        lengths = torch.tensor(check_category_tokens(self.tokenizer, categories, template))
        hidden = self.encode_prompts([template.format(c) for c in categories]).hidden
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        span = (positions >= start) & (positions < start + lengths[:, None].to(hidden.device))
        span = span.to(hidden.dtype).unsqueeze(-1)
        return (hidden * span).sum(1) / span.sum(1)

    # -- images --------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1], [B, 3, H, W] -> scaled latents (the posterior mean, deterministic)."""
        latents = self.vae.encode(images.to(self.dtype)).latent_dist.mean
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def latents_at_capture_step(
        self, latents: Tensor, prompt_embeds: PromptEmbeds, noise: Tensor | None = None, mode: str = "noise"
    ) -> Tensor:
        """Bring clean latents to the capture timestep (paper §4.1, real images).

        ``noise``: forward diffusion q(x_t | x_0) with the given noise (one draw per sample, so that
        a sample's result does not depend on its batch). ``ddim_inversion``: deterministic DDIM
        inversion conditioned on the prompt, one UNet call per inverse step up to the capture step.
        """
        if mode == "noise":
            if noise is None:
                raise ConfigError("mode='noise' needs the noise tensor (one draw per sample)")
            alphas = DDIMScheduler.from_config(self.scheduler_config).alphas_cumprod
            alpha = alphas[self.timestep].to(latents.device, torch.float32)
            return (alpha.sqrt() * latents.float() + (1 - alpha).sqrt() * noise.float()).to(latents.dtype)
        if mode == "ddim_inversion":
            inverse = DDIMInverseScheduler.from_config(self.scheduler_config)
            inverse.set_timesteps(self.config.num_inference_steps)
            for t in self.inversion_timesteps:
                t_batch = torch.full((latents.shape[0],), t, device=latents.device)
                prediction = self._unet(latents, t_batch, prompt_embeds)
                latents = inverse.step(prediction, t, latents).prev_sample
            return latents
        raise ConfigError(f"mode '{mode}' is not one of 'noise', 'ddim_inversion'")

    # -- generation -----------------------------------------------------------------------------

    def pipeline(self) -> DiffusionPipeline:
        """A diffusers pipeline over these (shared) modules, sampling with DDIM."""
        modules = dict(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=DDIMScheduler.from_config(self.scheduler_config),
        )
        if self.is_xl:
            pipe = StableDiffusionXLPipeline(
                **modules,
                text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer_2,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                add_watermarker=False,
            )
        else:
            pipe = StableDiffusionPipeline(
                **modules, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        pipe.set_progress_bar_config(disable=True)
        return self._with_offload(pipe)

    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def _timesteps(self, num_inference_steps: int) -> list[int]:
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(num_inference_steps)
        return scheduler.timesteps.tolist()

    def trace_words(
        self, prompts: Sequence[str], words: Sequence[Sequence[str]], matching: WordMatching = "whole"
    ) -> contextlib.AbstractContextManager[DAAMTracer]:
        """Trace the DAAM maps of ``words`` (one list per prompt) over every UNet call inside;
        ``tracer.word_maps()`` then gives them at latent resolution [B, O, h, w]."""
        return DAAMTracer(self.unet).trace(
            self.tokenizer, prompts, words, self.unet.config.sample_size, matching
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        guidance_scale: float = 7.5,
        words: Sequence[Sequence[str]] | None = None,
        word_matching: str = "whole",
        num_inference_steps: int | None = None,
    ) -> Generation:
        """Sample images with classifier-free guidance (DDIM, ``num_inference_steps``, default the
        config's), capturing the UNet features and the latent at the capture timestep, and DAAM
        maps of ``words`` (one list of words per prompt) accumulated over all steps
        (``word_matching``: see models.daam)."""
        steps, step = self._steps_to_capture(guidance_scale, num_inference_steps)  # (step: its loop index)
        pipe, noise = self.pipeline(), self.initial_noise(seeds)
        at_capture: dict = {"latents": noise * pipe.scheduler.init_noise_sigma} if step == 0 else {}

        def on_step_end(pipe, i, t, kwargs):
            if i == step - 1:
                at_capture["latents"] = kwargs["latents"]
            if i == step:
                assert int(t) == self.timestep, (int(t), self.timestep)
                at_capture["features"] = dict(captured)
            return {}

        tracing = self.trace_words(prompts, words, word_matching) if words else contextlib.nullcontext()
        with self._capturing() as captured, tracing as tracer:
            images = pipe(
                list(prompts),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                latents=noise,
                output_type="pt",
                callback_on_step_end=on_step_end,
            ).images
        at_step = at_capture["features"]
        guidance_batch = at_step[self.block_names[0]].shape[0] == 2 * len(prompts)
        return Generation(
            images=(images * 255).round().clamp(0, 255).to(torch.uint8),
            latents=at_capture["latents"].to(self.dtype),
            features=self._grouped_features(at_step, guidance_batch),
            heat_maps=tracer.word_maps() if words else None,
        )


def unet_blocks(unet: nn.Module) -> dict[str, nn.Module]:
    """Map CompVis block names to the diffusers module whose output is that block's output."""
    blocks = {"input_blocks.0": unet.conv_in}
    k = 1
    for down in unet.down_blocks:
        layers = list(down.attentions) if hasattr(down, "attentions") else list(down.resnets)
        for layer in layers + list(down.downsamplers or []):
            blocks[f"input_blocks.{k}"] = layer
            k += 1
    blocks["middle_block"] = unet.mid_block
    k = 0
    for up in unet.up_blocks:
        layers = list(up.attentions) if hasattr(up, "attentions") else list(up.resnets)
        # The last layer of a level is read after its upsampler: the up block's own output.
        for layer in layers[:-1] + [up]:
            blocks[f"output_blocks.{k}"] = layer
            k += 1
    return blocks


def group_by_resolution(features: Sequence[Tensor]) -> list[Tensor]:
    """Concatenate same-resolution maps on channels; groups ordered coarse to fine."""
    groups: dict[int, list[Tensor]] = {}
    for feature in features:
        groups.setdefault(feature.shape[-1], []).append(feature)
    return [torch.cat(groups[size], dim=1) for size in sorted(groups)]
