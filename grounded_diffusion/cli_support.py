"""What the command line needs besides LightningCLI: config resolvers for folder names, device,
output-folder and run-length checks, the out-of-memory and disk-full messages, the version line."""

from __future__ import annotations

import os

import torch
from omegaconf import OmegaConf

from grounded_diffusion.data.vocabulary import vocabulary_label
from grounded_diffusion.errors import ConfigError, error_chain
from grounded_diffusion.files import check_writable_folder, disk_full_error, is_disk_full


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
    trainer = config.get("trainer", {})
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator is '{accelerator}' but this machine has no CUDA GPU (torch.cuda.is_available() is "
            "False). Run on a GPU machine, or on this CPU with --config experiments/offline.yaml (tiny model) or "
            "--trainer.accelerator cpu."
        )
    check_devices(trainer.get("devices", "auto"), accelerator)


def check_devices(devices, accelerator: str) -> None:
    """``trainer.devices`` as a count: at most the GPUs this machine has (CUDA runs), or its CPU
    cores (CPU runs: one process each)."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    have, what = (torch.cuda.device_count(), "CUDA GPUs") if on_gpu else (os.cpu_count() or 1, "CPU cores")
    count = devices if isinstance(devices, int) else int(devices) if str(devices).isdigit() else None
    if count is not None and count > have:
        raise ConfigError(
            f"trainer.devices is {count} but this machine has {have} {what} (trainer.accelerator '{accelerator}'): "
            f"the nearest valid value is {have}; more devices come with more machines (trainer.num_nodes)"
        )


def check_run_length(config, subcommand: str) -> None:
    """``trainer.max_steps`` / ``max_epochs`` are -1 (no limit), None or positive (Lightning's
    own check is a traceback); a fit of length 0 would train nothing and write no checkpoint."""
    trainer = config.get("trainer", {})
    for key in ("max_steps", "max_epochs"):
        value = trainer.get(key)
        if value is None or value == -1 or value > 0 or (value == 0 and subcommand != "fit"):
            continue
        nothing = ": the fit would train nothing and write no checkpoint;" if value == 0 else ":"
        raise ConfigError(
            f"trainer.{key} is {value}{nothing} give a positive number (nearest valid value 1), or -1 / null to "
            "leave the length to the other limit"
        )


def check_resume_length(checkpoint: dict, path: str, max_steps: int | None) -> str | None:
    """A resumed fit whose checkpoint is already past ``trainer.max_steps`` would train nothing
    and exit without a word: one line instead. A checkpoint exactly at the limit is a finished
    fit: the returned notice says so (rerunning it is harmless, e.g. a launcher's rerun)."""
    done = checkpoint.get("global_step")
    if max_steps in (None, -1) or not isinstance(done, int) or done < max_steps:
        return None
    if done > max_steps:
        raise ConfigError(
            f"checkpoint {path} is at step {done}, past --trainer.max_steps {max_steps}: resuming would train "
            f"nothing. Give --trainer.max_steps above {done} to train on, or evaluate it with "
            f"`test --ckpt_path {path}`"
        )
    return f"checkpoint {path} is at step {done}, which is trainer.max_steps: the fit is finished, nothing to train"


def check_output_folders(config, subcommand: str) -> None:
    """Every folder the run writes can be written (before anything is built): the run folder, and
    for ``predict`` the cache or image folder it fills."""
    check_writable_folder(
        config.get("trainer", {}).get("default_root_dir") or ".", "trainer.default_root_dir"
    )
    if subcommand == "predict":
        data = config.get("data", {}).get("init_args", {}) or {}
        for key in ("cache_dir", "out_dir"):
            if data.get(key):
                check_writable_folder(data[key], f"data.init_args.{key}")


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
    return type(error).__name__ == "OutOfMemoryError" or text[0].startswith(
        ("torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError")
    )


def out_of_memory_message(config, subcommand: str) -> str:
    size = config.get("data", {}).get("init_args", {}).get("batch_size")
    smaller = (
        f"e.g. --data.init_args.batch_size {max(1, size // 2)}"
        if isinstance(size, int) and size > 1
        else "or use a smaller model"
    )
    kept = (
        "every sample already written is kept: rerun the same command to go on"
        if subcommand == "predict"
        else "resume with --ckpt_path last"
        if subcommand == "fit"
        else "nothing was written"
    )
    return (
        f"CUDA ran out of memory at data.init_args.batch_size {size} (per GPU): lower it, {smaller}; {kept}."
    )


def disk_full_message(error: BaseException, run_folder: str) -> str | None:
    """One line for a full disk in ``error``'s chain (the file it names, else the run folder),
    or None when the disk is not full."""
    full = next((e for e in error_chain(error) if is_disk_full(e)), None)
    if full is None:
        return None
    return str(disk_full_error(full.filename or run_folder, "finished samples and checkpoints are kept"))


def version() -> str:
    from importlib.metadata import version as installed

    packages = ("lightning", "torch", "diffusers", "transformers")
    return f"grounded-diffusion {installed('grounded-diffusion')} ({', '.join(f'{p} {installed(p)}' for p in packages)})"
