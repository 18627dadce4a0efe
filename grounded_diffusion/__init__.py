"""Grounded generation with diffusion models: a frozen Stable Diffusion plus a trainable grounding
head that returns a mask for every object named in the prompt.

The Python API (imported on first use, so that ``grounded_diffusion.errors`` and the like stay light)::

    from grounded_diffusion import GroundedGenerator, PretrainedHead
"""

from grounded_diffusion.quiet import quiet_import_noise

quiet_import_noise()  # (before diffusers is imported: see quiet.py)

__all__ = ["GroundedGenerator", "GroundedImages", "PretrainedHead"]


def __getattr__(name: str):
    if name in ("GroundedGenerator", "GroundedImages"):
        from grounded_diffusion import api

        return getattr(api, name)
    if name == "PretrainedHead":
        from grounded_diffusion.models.pretrained_head import PretrainedHead

        return PretrainedHead
    raise AttributeError(f"module 'grounded_diffusion' has no attribute {name!r}")
