"""Old import path: diffusion transformers live in ``grounded_diffusion.models.backbones``
(``dit.py``, and one file per family: ``sd3.py``, ``flux.py``, ``flux2.py``)."""

from grounded_diffusion.models.backbones import *  # noqa: F403
from grounded_diffusion.models.backbones import __all__  # noqa: F401
from grounded_diffusion.models.backbones.flux2 import PROMPT_MARK  # noqa: F401
