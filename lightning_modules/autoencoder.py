"""Old import path (configs and checkpoints may name it):
the shapes world's VAE trainer live in ``lightning_modules.world_autoencoder``."""

from lightning_modules.world_autoencoder import *  # noqa: F403
