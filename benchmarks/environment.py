"""What a machine runs this project with: the GPU, the library versions, and whether every project
module imports (the first stage of benchmarks/gpu_session.sh, on a machine set up from wheels).

    python benchmarks/environment.py
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import version

import torch

LIBRARIES = [
    "torch",
    "torchvision",
    "lightning",
    "transformers",
    "diffusers",
    "torchmetrics",
    "jsonargparse",
    "omegaconf",
    "safetensors",
    "numpy",
]
PACKAGES = ["grounded_diffusion", "lightning_modules", "datamodules", "callbacks"]


def main() -> None:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"GPU: {gpu} (CUDA {torch.version.cuda})")
    print(", ".join(f"{name} {version(name)}" for name in LIBRARIES))
    modules = 0
    for package in PACKAGES:
        for module in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
            if not module.name.endswith("__main__"):  # __main__ runs the CLI
                importlib.import_module(module.name)
                modules += 1
    print(f"all {modules} project modules import")


if __name__ == "__main__":
    main()
