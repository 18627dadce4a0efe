"""Old import path (configs and checkpoints may name it):
the shapes world's renderer and vocabulary live in ``grounded_diffusion.shapes_world.render``."""

from grounded_diffusion.shapes_world.render import *  # noqa: F403
