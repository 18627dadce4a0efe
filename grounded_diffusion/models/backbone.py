"""A frozen Stable Diffusion whose UNet block outputs can be captured at one denoising step.

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
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    DiffusionPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from torch import Tensor, nn

from grounded_diffusion.errors import (
    ConfigError,
    MissingWeightsError,
    check_choice,
    check_in_range,
)
from grounded_diffusion.models.daam import DAAMTracer, WordMatching
from grounded_diffusion.models.embedded import embedded_model
from grounded_diffusion.models.tiny_sd import TINY_SD_ID

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Dtype = Literal["float32", "float16", "bfloat16"]
Branches = Literal["cond", "uncond+cond"]
UNET_PIPELINES = (StableDiffusionPipeline, StableDiffusionXLPipeline)
PIPELINES = (*UNET_PIPELINES, StableDiffusion3Pipeline, FluxPipeline, Flux2KleinPipeline, Flux2Pipeline)
CATEGORY_TEMPLATE = "a photograph of a {}"


@dataclass
class BackboneConfig:
    """What the frozen diffusion model is and where its features come from.

    Args:
        model_id: Hub id (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``,
            ``stabilityai/stable-diffusion-2-1``, ``stabilityai/stable-diffusion-xl-base-1.0``,
            ``stabilityai/stable-diffusion-3.5-medium``, ``black-forest-labs/FLUX.1-dev``,
            ``black-forest-labs/FLUX.2-klein-base-4B``), a local folder in diffusers format, the
            shapes world's trained tiny SD-1.x and MM-DiT (``embedded/shapes-sd``,
            ``embedded/shapes-dit``, shipped), or an offline tiny random model: ``embedded/tiny-sd``
            (SD-1.x layout), ``embedded/tiny-sd2`` (SD-2.x, v-prediction), ``embedded/tiny-sdxl``,
            ``embedded/tiny-sd3``, ``embedded/tiny-flux``, ``embedded/tiny-flux2``,
            ``embedded/tiny-flux2-dev``.
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the frozen model.
        blocks: block names to capture; ``None`` captures all of them (25 for SD-1.x; for a
            diffusion transformer, four evenly spaced blocks: see models/dit_backbone.py).
        branches: ``cond`` (the prompt's branch) or ``uncond+cond`` (both classifier-free
            guidance branches concatenated on channels, as the authors did).
        capture_step: denoising step t counted as in the paper, t=1 being the last of
            ``num_inference_steps`` DDIM steps (paper: t=5; authors' code: t=1).
        num_inference_steps: DDIM steps of the sampling schedule that defines ``capture_step``.
        channels_last: keep the UNet's activations in channels-last memory order, which GPU
            convolutions run faster on (diffusers' own advice); the features are the same.
        compile_backend: ``torch.compile`` the UNet with this backend (``inductor`` for speed on
            a GPU; ``aot_eager`` checks it without a compiler); ``None``: eager. The first batch
            pays the compilation. Feature capture hooks are traced; turning DAAM tracing on or
            off (another attention processor class) compiles once more, then graphs are reused.

    Diffusion transformers (SD3 / SD3.5, FLUX.1, FLUX.2; models/dit_backbone.py) read these too:

    Args:
        image_size: side of the generated (and real, resized) images; ``None``: the model's native
            size (SD3: its config's; FLUX.1 and FLUX.2: 1024). UNets generate at their native size only.
        max_sequence_length: T5 (FLUX.2: Qwen3) tokens of the text stream; ``None``: the
            pipeline's default (SD3: 256, FLUX.1 and FLUX.2: 512); 0: none, for an SD3 trained
            without T5 (``embedded/shapes-dit``).
        attention_blocks: the blocks whose joint attention makes the training-free baseline's
            word maps; ``None``: all. (UNets: DAAM's layers, fixed by the reference.)
        guidance_embedding: FLUX.1-dev's and FLUX.2 [dev]'s guidance input, given to every
            transformer call (generation, capture, replay, real images); ``None``: the
            pipeline's default (FLUX.1: 3.5; FLUX.2: 4.0).
        fusion_steps: more steps, counted as ``capture_step``, whose block features join the
            capture step's; the head fuses each block's steps with learned weights. Their latents
            come from the capture step's by the Euler jump along the predicted velocity,
            x_σk = x_σ + (σk − σ) v, so generation, replay and real images compute them alike
            from the one stored latent. ``None``: the capture step alone.
    """

    model_id: str = TINY_SD_ID
    dtype: Dtype = "float32"
    blocks: list[str] | None = None
    branches: Branches = "cond"
    capture_step: int = 5
    num_inference_steps: int = 50
    channels_last: bool = False
    compile_backend: str | None = None
    image_size: int | None = None
    max_sequence_length: int | None = None
    attention_blocks: list[str] | None = None
    guidance_embedding: float | None = None
    fusion_steps: list[int] | None = None

    def __post_init__(self) -> None:
        # At config time, before any weights load.
        check_in_range("model.init_args.backbone.num_inference_steps", self.num_inference_steps, 1, None, 50)
        check_in_range(
            "model.init_args.backbone.capture_step", self.capture_step, 1, self.num_inference_steps, 5
        )
        for step in self.fusion_steps or []:
            check_in_range("model.init_args.backbone.fusion_steps", step, 1, self.num_inference_steps, 10)
        steps = [self.capture_step, *(self.fusion_steps or [])]
        if len(set(steps)) < len(steps):
            raise ConfigError(
                f"model.init_args.backbone.fusion_steps {self.fusion_steps} repeats a step (the capture step is "
                f"{self.capture_step}): give each step once"
            )

    @property
    def num_timesteps(self) -> int:
        """Steps whose features the head reads: the capture step and the fusion steps."""
        return 1 + len(self.fusion_steps or [])

    def identity(self) -> dict:
        """The settings the features depend on (what a cache records); speed switches left out."""
        return {k: v for k, v in asdict(self).items() if k not in ("channels_last", "compile_backend")}


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
    traced words [B, O, h, w] (None when no words were given).
    """

    images: Tensor
    latents: Tensor
    features: list[Tensor]
    heat_maps: Tensor | None


def looks_like_local_path(model_id: str) -> bool:
    """A path, not a Hub id (``org/name``): absolute, relative with ./ or ../, ~, or deeper."""
    return model_id.startswith(("/", "./", "../", "~")) or model_id.count("/") > 1 or "\\" in model_id


def load_pipeline(model_id: str, dtype: torch.dtype) -> DiffusionPipeline:
    """``from_pretrained`` on disk first, then the Hub; a clear error when neither has it. The
    pipeline class (SD, SDXL, SD3, FLUX.1, FLUX.2) is the one the model's ``model_index.json`` names."""
    embedded = embedded_model(model_id, "pipeline")  # (built on first use, or shipped: models/embedded.py)
    source = str(embedded.folder()) if embedded is not None else model_id
    if looks_like_local_path(source) and not Path(source).expanduser().exists():
        raise MissingWeightsError(
            f"model_id '{model_id}' is a local folder that does not exist ({Path(source).expanduser().resolve()}); "
            "fix the path, or save a pipeline there with `pipeline.save_pretrained(FOLDER)`."
        )
    if Path(source).exists() and not (Path(source) / "model_index.json").exists():
        raise MissingWeightsError(
            f"'{model_id}' is a folder but holds no diffusers pipeline (no model_index.json). "
            "Point model_id at a folder saved with `pipeline.save_pretrained(...)`."
        )
    errors = []
    for local_only in (True, False):
        try:
            index = DiffusionPipeline.load_config(source, local_files_only=local_only)
            # SD-1.x / 2.x list a safety checker, which we leave out; other pipelines have none.
            no_checker = (
                {"safety_checker": None, "requires_safety_checker": False}
                if "safety_checker" in index
                else {}
            )
            pipe = DiffusionPipeline.from_pretrained(
                source, local_files_only=local_only, dtype=dtype, **{**absent_components(index), **no_checker}
            )
        except (OSError, ValueError) as err:  # huggingface_hub's errors subclass these
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0]}")
            continue
        if not isinstance(pipe, PIPELINES):
            raise ConfigError(
                f"'{model_id}' is a {type(pipe).__name__}; the backbone supports "
                f"{', '.join(p.__name__ for p in PIPELINES)} (SD-1.x, SD-2.x, SDXL, SD3 / SD3.5, FLUX.1, FLUX.2)."
            )
        return pipe
    raise MissingWeightsError(
        f"Could not load Stable Diffusion weights for model_id '{model_id}': they are not in the "
        "local Hugging Face cache and the Hub could not be reached.\n"
        "Provide them in one of these ways:\n"
        f"  1. on a machine with network access: `hf download {model_id}`, then copy the cache "
        "folder (HF_HOME, default ~/.cache/huggingface) here;\n"
        "  2. save the pipeline with `save_pretrained(FOLDER)` and set "
        "`model.init_args.backbone.model_id: FOLDER`;\n"
        "  3. to try the framework offline, add `--config experiments/offline.yaml` "
        "(tiny embedded model).\n"
        f"Last loader error: {errors[-1]}"
    ) from None


def absent_components(index: dict) -> dict[str, None]:
    """The components a pipeline's class expects that its folder leaves out or saved as none, as
    ``None``: a saved SD3 without T5 has no text_encoder_3, and diffusers refuses to load it unless
    told."""
    import diffusers

    pipeline_class = getattr(diffusers, index.get("_class_name", ""), None)
    if pipeline_class is None:
        return {}
    expected, _ = pipeline_class._get_signature_keys(pipeline_class)
    return {name: None for name in expected if (index.get(name) or [None])[0] is None}


def build_backbone(
    config: BackboneConfig | None = None, pipeline: DiffusionPipeline | None = None
) -> FrozenBackbone:
    """The frozen backbone of ``config.model_id`` (or of a loaded ``pipeline``): a UNet's
    (SD-1.x / 2.x / XL) or a diffusion transformer's (SD3 / SD3.5, FLUX.1, FLUX.2), as its pipeline is."""
    # (imported here: the transformer backbone builds on this module)
    from grounded_diffusion.models.dit_backbone import DiffusionTransformerBackbone

    config = config or BackboneConfig()
    pipeline = pipeline or load_pipeline(config.model_id, DTYPES[config.dtype])
    kind = StableDiffusionBackbone if isinstance(pipeline, UNET_PIPELINES) else DiffusionTransformerBackbone
    return kind(config, pipeline=pipeline)


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
    """What the frozen UNet and transformer backbones share: inference mode, per-seed noise, cache
    replay, and where a sampling schedule meets the capture step. Subclasses define ``denoiser``
    (the UNet or transformer), ``timestep``, ``features``, ``encode_prompts``, ``latent_shape``
    and ``_timesteps``."""

    config: BackboneConfig
    timestep: float
    baseline_name = "daam"  # the training-free baseline's name in reports (kept under "daam")

    def train(self, mode: bool = True) -> FrozenBackbone:
        return super().train(False)  # frozen: dropout and norms always in inference mode

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

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


class StableDiffusionBackbone(FrozenBackbone):
    """Frozen SD: text embeddings, VAE encoding, and UNet features grouped by resolution."""

    def __init__(
        self, config: BackboneConfig | None = None, pipeline: DiffusionPipeline | None = None
    ) -> None:
        """``pipeline``: an already loaded pipeline to use instead of ``config.model_id``."""
        super().__init__()
        self.config = config = config or BackboneConfig()
        check_choice("dtype", config.dtype, Dtype)
        check_choice("branches", config.branches, Branches)
        pipe = pipeline if pipeline is not None else load_pipeline(config.model_id, DTYPES[config.dtype])
        if not isinstance(pipe, UNET_PIPELINES):
            raise ConfigError(
                f"'{config.model_id}' is a {type(pipe).__name__}, a diffusion transformer: build its backbone with "
                "grounded_diffusion.models.backbone.build_backbone"
            )
        if pipe.unet.dtype != DTYPES[config.dtype]:
            pipe = pipe.to(dtype=DTYPES[config.dtype])
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
        ):
            raise ConfigError(
                "image_size, attention_blocks, max_sequence_length and fusion_steps apply to diffusion transformers "
                f"(SD3, FLUX.1, FLUX.2); this UNet generates at its native {self.image_size} px, DAAM reads its "
                "fixed layers, and its features come from one step: leave them null"
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
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """The side of the images the model generates (and real images are resized to)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    # -- UNet block outputs -------------------------------------------------------------------

    def _block_modules(self) -> dict[str, nn.Module]:
        """Map CompVis block names to the diffusers module whose output is that block's output."""
        unet = self.unet
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

    @contextlib.contextmanager
    def _capturing(self) -> Iterator[dict[str, Tensor]]:
        captured: dict[str, Tensor] = {}
        handles = []
        for name in self.block_names:

            def hook(module, args, output, name=name):
                captured[name] = output[0] if isinstance(output, tuple) else output

            handles.append(self.block_modules[name].register_forward_hook(hook))
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

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
        if self.config.branches == "uncond+cond":
            uncond = self.unconditional_embeds(len(prompt_embeds))
            latents = torch.cat([latents, latents])
            timesteps = torch.cat([timesteps, timesteps])
            prompt_embeds = uncond.cat(prompt_embeds)
        with self._capturing() as captured:
            self._unet(latents, timesteps, prompt_embeds)
        return self._grouped_features(captured, guidance_batch=self.config.branches == "uncond+cond")

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
        pipe, device = self.pipeline(), self.text_encoder.device
        out = pipe.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=unconditional
        )
        if self.is_xl:
            hidden, uncond, pooled, uncond_pooled = out
            return PromptEmbeds(uncond, uncond_pooled) if unconditional else PromptEmbeds(hidden, pooled)
        return PromptEmbeds(out[1] if unconditional else out[0])

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """What the UNet's cross-attention reads (and SDXL's pooled text), one row per prompt."""
        return self._encode(prompts)

    def unconditional_embeds(self, batch: int) -> PromptEmbeds:
        """The guidance batch's unconditional half (SDXL zeroes it, SD encodes ""): the same row
        for every sample, encoded once."""
        return self._encode([""], unconditional=True).expand(batch)

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
        return pipe

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
        if self.config.branches == "uncond+cond" and guidance_scale <= 1:
            raise ConfigError(
                "branches 'uncond+cond' needs guidance_scale > 1 (no unconditional branch otherwise)"
            )
        steps = num_inference_steps or self.config.num_inference_steps
        step = steps - self.capture_step_for(steps)  # loop index of the capture timestep
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


def group_by_resolution(features: Sequence[Tensor]) -> list[Tensor]:
    """Concatenate same-resolution maps on channels; groups ordered coarse to fine."""
    groups: dict[int, list[Tensor]] = {}
    for feature in features:
        groups.setdefault(feature.shape[-1], []).append(feature)
    return [torch.cat(groups[size], dim=1) for size in sorted(groups)]
