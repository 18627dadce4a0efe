"""Trains the shapes world's VAE (SD's AutoencoderKL layout): L1 + MSE reconstruction and a small
KL term, as SD's first stage without the adversarial and perceptual losses (flat-coloured shapes
reconstruct well without them)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor

from grounded_diffusion.shapes_world.models import shapes_vae


def to_model_range(images: Tensor) -> Tensor:
    """uint8 RGB [B, 3, H, W] -> float in [-1, 1], what SD's VAE takes."""
    return images.float() / 127.5 - 1


class AutoencoderModule(LightningModule):
    """
    Args:
        kl_weight: weight of the KL term (SD: 1e-6): keeps latents near a unit Gaussian's scale.
        lr: AdamW learning rate.
    """

    def __init__(self, kl_weight: float = 1e-6, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vae = shapes_vae()

    def _losses(self, batch: dict, sample: bool) -> dict[str, Tensor]:
        images = to_model_range(batch["image"])
        posterior = self.vae.encode(images).latent_dist
        recon = self.vae.decode(posterior.sample() if sample else posterior.mode()).sample
        l1, mse = F.l1_loss(recon, images), F.mse_loss(recon, images)
        kl = posterior.kl().mean()
        psnr = 10 * torch.log10(4 / mse.detach())  # range 2 -> peak^2 = 4
        return {"loss": l1 + mse + self.hparams.kl_weight * kl, "l1": l1, "kl": kl, "psnr": psnr}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self._losses(batch, sample=True)
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["image"])
        )
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses = self._losses(batch, sample=False)
        self.log_dict(
            {f"val/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["image"])
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.vae.parameters(), lr=self.hparams.lr)

    @torch.no_grad()
    def export(self, folder: str | Path) -> None:
        """Save in diffusers format with SD's scaling-factor convention: 1 / std of the latents
        of validation scenes, so the UNet sees unit-variance latents."""
        loader = self.trainer.datamodule.val_dataloader()
        latents = torch.cat(
            [self.vae.encode(to_model_range(b["image"].to(self.device))).latent_dist.mode() for b in loader]
        )
        self.vae.register_to_config(scaling_factor=float(1 / latents.std()))
        self.vae.save_pretrained(folder)
