"""Old import path (configs and checkpoints may name it):
the shapes world's model architectures and ids live in ``grounded_diffusion.shapes_world.models``."""

from grounded_diffusion.shapes_world.models import *  # noqa: F403
