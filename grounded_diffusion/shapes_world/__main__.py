"""``python -m grounded_diffusion.shapes_world``: the shapes world's diagnostics."""

from grounded_diffusion.shapes_world.diagnostics import main

main()
