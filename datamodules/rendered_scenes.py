"""Old import path (configs and checkpoints may name it):
the shapes world's training scenes live in ``datamodules.world_scenes``."""

from datamodules.world_scenes import *  # noqa: F403
