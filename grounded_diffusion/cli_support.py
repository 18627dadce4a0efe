"""What the command line needs besides LightningCLI: config resolvers for folder names, device
checks, the out-of-memory message, the version line."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from grounded_diffusion.data.vocabulary import vocabulary_label
from grounded_diffusion.errors import ConfigError


def run_name(vocabulary, split) -> str:
    """``<vocabulary>-split<split>`` for output folders: ``pascal-split1``, ``flowers-splitall``
    (a classes file's folder, no numbered split), ``prompts-splitall`` (no vocabulary)."""
    name = "prompts" if vocabulary is None else vocabulary_label(vocabulary)
    return f"{name}-split{'all' if split is None else split}"


# Folder names in the configs: ${run_name:<vocabulary>,<split>}, ${vocabulary_label:<vocabulary>}.
OmegaConf.register_resolver("run_name", run_name, replace=True)
OmegaConf.register_resolver("vocabulary_label", vocabulary_label, replace=True)


def check_accelerator(config) -> None:
    """A GPU config on a machine without one: one line before anything is built (Lightning
    says "No supported gpu backend found!" after the model has loaded)."""
    accelerator = str(config.get("trainer", {}).get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator is '{accelerator}' but this machine has no CUDA GPU (torch.cuda.is_available() is "
            "False). Run on a GPU machine, or on this CPU with --config experiments/offline.yaml (tiny model) or "
            "--trainer.accelerator cpu."
        )


def check_loggers(config) -> None:
    """A W&B logger without the wandb package (a GPU image set up from gpu_session.sh's wheels):
    one line naming the fix, where jsonargparse would explain it inside a report on every type
    that trainer.logger accepts."""
    from lightning.pytorch.loggers import wandb

    loggers = config.get("trainer", {}).get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        class_path = logger.get("class_path") if hasattr(logger, "get") else logger
        if isinstance(class_path, str) and class_path.endswith("WandbLogger") and not wandb._WANDB_AVAILABLE:
            raise ConfigError(
                f"trainer.logger: {class_path} needs the wandb package: `pip install wandb`, or run without "
                "it: --trainer.logger false, or take it out of the config's trainer.logger list"
            )


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, raised here or in a process that ddp_spawn started."""
    text = str(error).strip().splitlines()[-1:] or [""]
    return type(error).__name__ == "OutOfMemoryError" or text[0].startswith(("torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError"))


def out_of_memory_message(config, subcommand: str) -> str:
    size = config.get("data", {}).get("init_args", {}).get("batch_size")
    smaller = f"e.g. --data.init_args.batch_size {max(1, size // 2)}" if isinstance(size, int) and size > 1 else "or use a smaller model"
    kept = ("every sample already written is kept: rerun the same command to go on" if subcommand == "predict"
            else "resume with --ckpt_path last" if subcommand == "fit" else "nothing was written")  # fmt: skip
    return f"CUDA ran out of memory at data.init_args.batch_size {size} (per GPU): lower it, {smaller}; {kept}."


def version() -> str:
    from importlib.metadata import version as installed

    packages = ("lightning", "torch", "diffusers", "transformers")
    return f"grounded-diffusion {installed('grounded-diffusion')} ({', '.join(f'{p} {installed(p)}' for p in packages)})"
