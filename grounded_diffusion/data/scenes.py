"""Old import path (configs and checkpoints may name it):
the procedural scenes live in ``grounded_diffusion.data.procedural_scenes``."""

from grounded_diffusion.data.procedural_scenes import *  # noqa: F403
