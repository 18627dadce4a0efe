"""Old import path (configs and checkpoints may name it):
the shapes world's text-to-image trainer live in ``lightning_modules.world_text_to_image``."""

from lightning_modules.world_text_to_image import *  # noqa: F403
