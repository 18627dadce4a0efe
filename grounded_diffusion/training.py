"""Old import path: what a fit that goes wrong or is resumed needs lives in
``grounded_diffusion.fit_faults``."""

from grounded_diffusion.fit_faults import *  # noqa: F403
from grounded_diffusion.fit_faults import (  # noqa: F401
    TrainingDiverged,
    apply_resumed_lr,
    check_finite_loss,
    last_checkpoint,
    last_checkpoint_exists,
    nonfinite_samples,
)
