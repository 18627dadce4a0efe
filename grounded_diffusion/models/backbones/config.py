"""What a backbone is and where its features come from: ``BackboneConfig``, the one config every
backbone (UNet or diffusion transformer) reads, and what a cache records of it (``identity``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from grounded_diffusion.errors import ConfigError, check_choice, check_in_range
from grounded_diffusion.models.backbones.quantization import check_quantization
from grounded_diffusion.models.tiny_sd import TINY_SD_ID

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Dtype = Literal["float32", "float16", "bfloat16"]
Branches = Literal["cond", "uncond+cond"]
Offload = Literal["none", "model", "group"]
CATEGORY_TEMPLATE = "a photograph of a {}"

# Settings that change neither the features nor the cache's samples' features: speed and memory switches, and
# ConceptAttention's, whose maps cache.json records beside (``concept_attention``).
NOT_IN_IDENTITY = ("channels_last", "compile_backend", "concept_blocks", "concept_background", "offload")


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
            diffusion transformer, four evenly spaced blocks: see models/backbones/dit.py).
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

    Diffusion transformers (SD3 / SD3.5, FLUX.1, FLUX.2; models/backbones/) read these too:

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
        concept_blocks: the joint (double-stream) blocks whose ConceptAttention maps are kept
            (``transformer_blocks.N``); the concept tokens go through every joint block up to the
            last of them. ``None``: the second half of the joint blocks (FLUX.1: 10-18 of 19, the
            ConceptAttention paper's choice). UNets: not used.
        concept_background: background concepts beside each prompt's categories in
            ConceptAttention's softmax (and its argmax scoring).
        fusion_steps: more steps, counted as ``capture_step``, whose block features join the
            capture step's; the head fuses each block's steps with learned weights. Their latents
            come from the capture step's by the Euler jump along the predicted velocity,
            x_σk = x_σ + (σk − σ) v, so generation, replay and real images compute them alike
            from the one stored latent. ``None``: the capture step alone.
        features_from: ``None`` (the tapped blocks' outputs, the residual stream) or
            ``attention``: the image tokens' attention outputs of those blocks (after the output
            projection), the space where ConceptAttention finds its signal. UNets: not used.

    Memory (docs/gpus.md; ``grounded-diffusion plan`` says what fits before a run):

    Args:
        quantization: components to quantize through diffusers' quantization support, each with
            a backend and a type, e.g. ``{transformer: {backend: torchao, type: int8wo},
            text_encoder_2: {backend: bitsandbytes, type: nf4}}``. Backends and types: torchao
            (int8wo, int8dq on any device; int4wo, fp8wo, fp8dq on a GPU, fp8 from compute
            capability 8.9), bitsandbytes (nf4, fp4, int8; GPU) and quanto (int8, int4, float8).
            Part of the features' identity: a cache or head from a quantized backbone is never
            mixed with an unquantized one. ``None``: the weights as stored, in ``dtype``.
        offload: where the frozen models wait between uses: ``none`` (all on the device),
            ``model`` (each model on the device while it runs, so the text encoders have left
            it before the denoiser runs: diffusers' ``enable_model_cpu_offload``) or ``group``
            (one block at a time, streamed: ``enable_group_offload``; the least memory). Speed
            and memory only: the features are the same. (diffusers' sequential offload is left
            out until it is checked on a GPU: in the CPU test, accelerate 1.16 turns the text
            encoder's embedding into a plain tensor and fails on its second call; group offload
            keeps as little on the device.)
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
    concept_blocks: list[str] | None = None
    concept_background: list[str] = field(default_factory=lambda: ["background"])
    features_from: Literal["attention"] | None = None
    quantization: dict[str, dict[str, str]] | None = None
    offload: Offload = "none"

    def __post_init__(self) -> None:
        # At config time, before any weights load.
        self.quantization = check_quantization(self.quantization)
        if self.features_from is not None:
            check_choice("model.init_args.backbone.features_from", self.features_from, ("attention",))
        check_choice("model.init_args.backbone.offload", self.offload, Offload)
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
        return {k: v for k, v in asdict(self).items() if k not in NOT_IN_IDENTITY}
