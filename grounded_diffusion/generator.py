"""Old import path: the Python API lives in ``grounded_diffusion.api`` (or ``from grounded_diffusion
import GroundedGenerator``)."""

from grounded_diffusion.api import *  # noqa: F403
from grounded_diffusion.api import GroundedGenerator, GroundedImages, ImageInputError, caption  # noqa: F401
