"""Trains the shapes world's text-to-image Stable Diffusion from scratch, as diffusers'
``train_text_to_image.py`` does (noise-prediction MSE at uniform DDPM timesteps, captions dropped
for classifier-free guidance, EMA weights exported), except that the CLIP text encoder learns too:
there is no pretrained one offline, and the world's words must come to mean its pixels.

``architecture: mmdit`` trains SD3's layout instead, as diffusers' ``train_dreambooth_sd3.py``
does: rectified flow (x_σ = (1 - σ) x_0 + σ ε, velocity target ε - x_0, σ drawn logit-normal),
text through the SD3 pipeline's own ``encode_prompt`` (both CLIPs learn; no T5 stream).

The VAE is trained first (lightning_modules/world_autoencoder.py) and stays frozen here.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling
from lightning import LightningModule
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from grounded_diffusion.checkpoint_io import checkpoint_fits, checkpoint_name
from grounded_diffusion.errors import ConfigError, check_choice
from grounded_diffusion.fit_faults import apply_resumed_lr, check_finite_loss
from grounded_diffusion.models.tiny_sd import assemble_pipeline, sd15_scheduler
from grounded_diffusion.models.tokenizer import load_clip_tokenizer, write_clip_tokenizer_files
from grounded_diffusion.shapes_world.models import (
    shapes_mmdit,
    shapes_mmdit_text_encoders,
    shapes_text_encoder,
    shapes_unet,
)
from lightning_modules.world_autoencoder import to_model_range

SAMPLE_PROMPTS = (
    "a photograph of a red square",
    "a photograph of a blue circle",
    "a photograph of a green cross",
    "a photograph of a yellow ring",
    "a photograph of a blue triangle and a yellow circle",
    "a photograph of a red cross and a green square",
    "a photograph of a yellow triangle and a blue ring",
    "a photograph of a green ring and a red triangle",
)


Architecture = Literal["unet", "mmdit"]


class TextToImageModule(LightningModule):
    """
    Args:
        vae: folder of the trained VAE (diffusers format), frozen.
        lr / weight_decay / warmup_steps: AdamW, linear warm-up, then constant.
        caption_dropout: fraction of captions replaced by "" (the unconditional branch of
            classifier-free guidance).
        ema_decay: the exported weights' EMA decay (with warm-up).
        sample_prompts: drawn at every validation (``samples/step-N.png``), to watch learning.
        guidance_scale / num_inference_steps: for those samples (DDIM; the MM-DiT's Euler).
        architecture: ``unet`` (SD-1.x's layout, noise prediction) or ``mmdit`` (SD3's,
            rectified flow).
        patch_size: the MM-DiT's patch size on the 16x16 latents (2: an 8x8 token grid; 1: 16x16,
            as fine as the UNet's finest feature grid). Ignored by the UNet.
    """

    def __init__(
        self,
        vae: str = "outputs/world/autoencoder/vae",
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        warmup_steps: int = 200,
        caption_dropout: float = 0.1,
        ema_decay: float = 0.999,
        sample_prompts: list[str] | None = None,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 25,
        architecture: Architecture = "unet",
        patch_size: int = 2,
    ) -> None:
        super().__init__()
        check_choice("model.init_args.architecture", architecture, Architecture)
        if patch_size not in (1, 2, 4):
            raise ConfigError(
                f"model.init_args.patch_size {patch_size} does not tile the 16x16 latents into a "
                "grid the MM-DiT's position table covers; use 1, 2 or 4"
            )
        self.save_hyperparameters()
        if not (Path(vae) / "config.json").is_file():
            raise ConfigError(
                f"model.init_args.vae '{vae}' holds no trained VAE (no config.json); train it first: "
                "lightning fit --config experiments/world/autoencoder.yaml"
            )
        self.vae = AutoencoderKL.from_pretrained(vae).requires_grad_(False).eval()
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer = load_clip_tokenizer(write_clip_tokenizer_files(tmp))
        self.configure_models()
        self.ema = EMAModel(self._trained_parameters(), decay=ema_decay, use_ema_warmup=True, power=3 / 4)

    def configure_models(self) -> None:
        if self.hparams.architecture == "unet":
            self.unet, self.text_encoder = shapes_unet(), shapes_text_encoder()
            config = sd15_scheduler().config
            keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
            self.noise_scheduler = DDPMScheduler(**{k: config[k] for k in keys})
            return
        self.transformer = shapes_mmdit(self.hparams.patch_size)
        self.text_encoder, self.text_encoder_2 = shapes_mmdit_text_encoders()
        # SD3's pipeline reads the VAE's shift; this VAE's latents are scaled, not shifted.
        self.vae.register_to_config(shift_factor=self.vae.config.get("shift_factor") or 0.0)
        # 64 image tokens, not SD3's 4096: no timestep shift (diffusers' shift 1.0).
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)

    def _trained_parameters(self) -> list[torch.nn.Parameter]:
        if self.hparams.architecture == "unet":
            return [*self.unet.parameters(), *self.text_encoder.parameters()]
        return [
            *self.transformer.parameters(),
            *self.text_encoder.parameters(),
            *self.text_encoder_2.parameters(),
        ]

    def train(self, mode: bool = True) -> TextToImageModule:
        super().train(mode)
        self.vae.eval()  # frozen
        return self

    def encode_text(self, captions: list[str]) -> Tensor:
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def _loss(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            latents = self.vae.encode(to_model_range(batch["image"])).latent_dist.sample(generator)
            latents = (
                latents - (self.vae.config.get("shift_factor") or 0.0)
            ) * self.vae.config.scaling_factor
        captions = list(batch["caption"])
        if self.training:
            drop = torch.rand(len(captions)) < self.hparams.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        if self.hparams.architecture == "mmdit":
            return self._flow_loss(latents, noise, captions, generator)
        steps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (len(latents),),
            generator=generator,
            device=self.device,
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, steps)
        prediction = self.unet(noisy, steps, self.encode_text(captions)).sample
        return F.mse_loss(prediction.float(), noise.float())

    def _flow_loss(self, latents: Tensor, noise: Tensor, captions: list[str], generator) -> Tensor:
        """Rectified flow: the velocity ε - x_0 at x_σ = (1 - σ) x_0 + σ ε, σ logit-normal (SD3)."""
        sigmas = compute_density_for_timestep_sampling(
            "logit_normal",
            len(latents),
            logit_mean=0.0,
            logit_std=1.0,
            device=self.device,
            generator=generator,
        )
        sigma = sigmas[:, None, None, None]
        hidden, _, pooled, _ = self.pipeline().encode_prompt(
            captions, None, None, device=self.device, do_classifier_free_guidance=False, max_sequence_length=0
        )
        prediction = self.transformer(
            hidden_states=(1 - sigma) * latents + sigma * noise,
            timestep=sigmas * self.noise_scheduler.config.num_train_timesteps,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
        ).sample
        return F.mse_loss(prediction.float(), (noise - latents).float())

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        check_finite_loss(self, loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.step(self._trained_parameters())

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        generator = torch.Generator(self.device).manual_seed(batch_idx)  # the same noise every validation
        with self.ema_weights():
            loss = self._loss(batch, generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        prompts = list(self.hparams.sample_prompts or SAMPLE_PROMPTS)
        extra = {"max_sequence_length": 0} if self.hparams.architecture == "mmdit" else {}
        with self.ema_weights():
            images = self.pipeline()(
                prompts,
                num_inference_steps=self.hparams.num_inference_steps,
                guidance_scale=self.hparams.guidance_scale,
                generator=torch.Generator(self.device).manual_seed(0),
                output_type="np",
                **extra,
            ).images
        folder = Path(self.trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        grid = (np.concatenate(list(images), axis=1) * 255).round().astype(np.uint8)
        Image.fromarray(grid).save(folder / f"step-{self.global_step}.png")

    def pipeline(self) -> StableDiffusionPipeline | StableDiffusion3Pipeline:
        if self.hparams.architecture == "unet":
            pipe = assemble_pipeline(self.unet, self.vae, self.text_encoder)
        else:
            pipe = StableDiffusion3Pipeline(
                transformer=self.transformer,
                scheduler=self.noise_scheduler,
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer,
                text_encoder_3=None,
                tokenizer_3=None,
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @contextlib.contextmanager
    def ema_weights(self):
        """Within it, the UNet and text encoder hold their EMA weights."""
        self.ema.store(self._trained_parameters())
        self.ema.copy_to(self._trained_parameters())
        try:
            yield
        finally:
            self.ema.restore(self._trained_parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint_fits(checkpoint, self, checkpoint_name(self))
        self.ema.load_state_dict(checkpoint["ema"])
        apply_resumed_lr(self, checkpoint)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self._trained_parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / max(1, self.hparams.warmup_steps))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    @torch.no_grad()
    def export(self, folder: str | Path) -> None:
        """The EMA weights as a diffusers pipeline (StableDiffusionPipeline with DDIM, or
        StableDiffusion3Pipeline), in float16 (half the size; loading casts to the dtype asked
        for), with vocab.json + merges.txt."""
        with self.ema_weights():
            self.pipeline().save_pretrained(folder)
        for file in Path(folder).glob("*/*.safetensors"):
            state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(file).items()}
            save_file(state, file, metadata={"format": "pt"})
        for tokenizer in ("tokenizer", "tokenizer_2"):
            if (Path(folder) / tokenizer).is_dir():
                write_clip_tokenizer_files(Path(folder) / tokenizer)
                (Path(folder) / tokenizer / "tokenizer.json").unlink(
                    missing_ok=True
                )  # 3.5 MB; vocab.json + merges.txt suffice
