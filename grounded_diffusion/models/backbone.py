"""Old import path: the backbones live in ``grounded_diffusion.models.backbones`` (a package: the
config, the loader, the shared base, the UNet and each diffusion-transformer family)."""

from grounded_diffusion.models.backbones import *  # noqa: F403
from grounded_diffusion.models.backbones import __all__  # noqa: F401
