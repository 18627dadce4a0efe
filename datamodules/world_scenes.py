"""Rendered shapes-world scenes with captions and exact label maps, made on the fly: the training
data of the world's own models (its VAE and text-to-image UNet)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import BaseDataModule
from grounded_diffusion.shapes_world.render import ShapesWorld, caption, render_shapes_scene

# Validation scenes come from indices far beyond any training set, so the two never meet.
VAL_OFFSET = 10_000_000


class RenderedScenes(Dataset):
    """Scenes ``offset .. offset + count - 1`` of the world's seed: ``{image uint8 [3, H, W],
    labels uint8 [H, W], caption}``."""

    def __init__(
        self, count: int, image_size: int = 64, seed: int = 0, offset: int = 0, world: ShapesWorld = "shapes"
    ) -> None:
        self.count, self.image_size, self.seed = count, image_size, seed
        self.offset, self.world = offset, world

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        image, labels, names = render_shapes_scene(
            self.offset + index, self.image_size, self.seed, world=self.world
        )
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1),
            "labels": torch.from_numpy(labels),
            "caption": caption(names),
        }


class RenderedScenesDataModule(BaseDataModule):
    """
    Args:
        num_train: training scenes (each is seen once per epoch; the run is bounded by max_steps).
        num_val: validation scenes (a fixed set).
        image_size: side in pixels (the world's models: 64).
        seed: the world's seed.
        world: ``shapes`` (20 categories) or ``shapes_wide`` (48).
    """

    def __init__(
        self,
        num_train: int = 500_000,
        num_val: int = 256,
        image_size: int = 64,
        seed: int = 0,
        world: ShapesWorld = "shapes",
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, default_batch_size=32, default_workers=0)
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        dataset = RenderedScenes(h.num_train, h.image_size, h.seed, world=h.world)
        return self.loader(dataset, "train", drop_last=True)

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        return self.loader(
            RenderedScenes(h.num_val, h.image_size, h.seed, offset=VAL_OFFSET, world=h.world), "evaluate"
        )
