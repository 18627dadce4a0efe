"""Old entry point: the shapes world's diagnostics live in ``grounded_diffusion.shapes_world.diagnostics``
and run as ``python -m grounded_diffusion.shapes_world``."""

from grounded_diffusion.shapes_world.diagnostics import *  # noqa: F403
from grounded_diffusion.shapes_world.diagnostics import main

if __name__ == "__main__":
    main()
