"""The command line: LightningCLI with fit / validate / test / predict and YAML experiments.

    grounded-diffusion fit --config experiments/pascal_split1.yaml
    grounded-diffusion fit --config experiments/pascal_split1.yaml --config experiments/offline.yaml
    grounded-diffusion export --ckpt_path CHECKPOINT --out FOLDER   # a portable head folder
    grounded-diffusion demo --head FOLDER                            # the Gradio demo page
    grounded-diffusion plan --config … --gpu-memory 24GB            # peak GPU memory, before the run

Several ``--config`` files merge left to right; omegaconf interpolation (``${...}``) is resolved
after merging ("omegaconf+" mode), so a later file or a CLI override can feed an earlier one;
``--print_config`` prints the merged config resolved.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from jsonargparse import ArgumentError, Namespace, set_parsing_settings
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import OmegaConf

from grounded_diffusion.checkpoint_io import AtomicCheckpointIO, check_checkpoint_kind, read_checkpoint
from grounded_diffusion.cli_support import (
    check_accelerator,
    check_loggers,
    check_output_folders,
    check_resume_length,
    check_run_length,
    disk_full_message,
    is_out_of_memory,
    out_of_memory_message,
    version,
)
from grounded_diffusion.config_errors import one_line_config_error
from grounded_diffusion.errors import ConfigError, UserError, find_user_error, spawned_user_error
from grounded_diffusion.fit_faults import last_checkpoint
from grounded_diffusion.quiet import quiet_known_noise

# A config names importable code (as any LightningCLI config): its class paths are imported and
# instantiated. None of the standard library's is a model, datamodule, callback or logger, and
# importing some runs code (``this``) or their instantiation does (``os.system``): refused by
# name, before any import.
set_parsing_settings(import_path_denylist=sorted(n for n in sys.stdlib_module_names if n.isidentifier()))

SUBCOMMANDS = ("fit", "validate", "test", "predict")
TOOLS = {
    "export": "grounded_diffusion.export",
    "demo": "grounded_diffusion.demo",
    "plan": "grounded_diffusion.memory_plan",
}
PREDICT_DEFAULTS = Path(__file__).parent / "configs" / "predict_defaults.yaml"
PRINT_CONFIG = "--print_config"


class RunConfig(SaveConfigCallback):
    """The resolved config in the run folder: ``config.yaml`` is the fit's record, which a later
    ``test`` or ``predict`` in the same folder must not replace: they write ``config-<verb>.yaml``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        verb = trainer.state.fn.value if trainer.state.fn is not None else stage
        if verb != "fit":
            self.config_filename = f"config-{verb}.yaml"
        super().setup(trainer, pl_module, stage)


class GroundedDiffusionCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        # Our own args go to the parser as given (LightningCLI warns when a script passes sys.argv
        # on), and --print_config prints the config after interpolation, which jsonargparse's
        # own action cannot (it prints before the subcommand's interpolations are resolved).
        if isinstance(args, (dict, Namespace)):
            self._command_line_keys = []
            self.config = parser.parse_object(args)
            return
        argv = list(sys.argv[1:] if args is None else args)
        self._command_line_keys = [a[2:].split("=")[0] for a in argv if a.startswith("--")]
        printing = [a for a in argv if a.split("=")[0] == PRINT_CONFIG]
        self.config = parser.parse_args([a for a in argv if a not in printing])
        if printing:
            subcommand = self.config["subcommand"]
            self.config[subcommand] = self._resolved(subcommand)
            print(self._parser(subcommand).dump(self.config[subcommand], skip_none=False), end="")
            sys.exit(0)

    def _resolved(self, subcommand: str):
        # jsonargparse's "omegaconf+" resolves interpolation in the root parser only, where a
        # subcommand's keys carry its name as prefix; resolve the subcommand's merged config here.
        parser, config = self._parser(subcommand), self.config[subcommand]
        if "${" not in str(config):
            return config
        dumped = parser.dump(config, format="yaml", skip_unset=False, skip_validation=True)
        return parser.parse_object(OmegaConf.to_container(OmegaConf.create(dumped), resolve=True))

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters into the config here, over the
        # config's own values (so that a generation config runs the head it is given). The
        # checkpoint must be readable and of the configured model; and a model setting given on
        # the command line wins over the checkpoint's (an lr given when resuming was dropped).
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path in (None, "last", "best", "hpc", "registry") or "://" in str(ckpt_path):
            return
        config = self.config[subcommand]
        check_checkpoint_kind(
            read_checkpoint(ckpt_path, map_location="cpu"), ckpt_path, config["model"]["class_path"]
        )
        given = {
            key: config[key] for key in self._command_line_keys if key.startswith("model.") and key in config
        }
        super()._parse_ckpt_path()
        for key, value in given.items():
            self.config[subcommand][key] = value

    def before_instantiate_classes(self) -> None:
        if self.subcommand is not None:
            self.config[self.subcommand] = self._resolved(self.subcommand)
            config = self.config[self.subcommand]
            check_accelerator(config)
            check_loggers(config)
            check_output_folders(config, self.subcommand)
            check_run_length(config, self.subcommand)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # (a configured plugin stays)
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except Exception as error:
            if is_out_of_memory(error):
                raise UserError(out_of_memory_message(self.config[subcommand], subcommand)) from error
            run_folder = self.config[subcommand].get("trainer", {}).get("default_root_dir") or "."
            full = None if find_user_error(error) else disk_full_message(error, run_folder)
            if full is not None:  # met where no writer of ours said it (a logger's file, a report)
                raise UserError(full) from error
            raise

    def after_instantiate_classes(self) -> None:
        # Config-time checks that need both objects (e.g. can the oracle label the categories?).
        check = getattr(self.model, "check_datamodule", None)
        if check is not None and self.datamodule is not None:
            check(self.datamodule)
        self._check_ckpt_path()

    def _check_ckpt_path(self) -> None:
        # Lightning only warns and then evaluates an untrained model; fit may start fresh.
        ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        if ckpt_path is None:
            return
        if ckpt_path == "last":
            ckpt_path = last_checkpoint(self.trainer)
            if ckpt_path is None and self.subcommand == "fit":
                return
            if ckpt_path is None:
                callbacks = self.trainer.checkpoint_callbacks
                folders = (
                    ", ".join(sorted({str(c.dirpath) for c in callbacks}))
                    or "(no ModelCheckpoint configured)"
                )
                raise ConfigError(
                    f"--ckpt_path last: no last checkpoint in {folders}. Run `fit` with the same configs "
                    "first, or give a checkpoint file: --ckpt_path PATH.ckpt"
                )
        if self.subcommand == "fit" and "://" not in str(ckpt_path) and Path(ckpt_path).is_file():
            # A resume past the run's length trains nothing: said before the model is restored.
            notice = check_resume_length(
                read_checkpoint(ckpt_path, map_location="cpu"), ckpt_path, self.trainer.max_steps
            )
            if notice:
                rank_zero_info(notice)


def run_tool(name: str, argv: list[str]) -> None:
    """``export`` and ``demo``: plain argparse commands beside the Lightning ones."""
    module = importlib.import_module(TOOLS[name])
    try:
        module.main(argv)
    except Exception as error:
        message = find_user_error(error)
        if message is None:
            raise
        sys.exit(f"error: {message}")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["--version"]:
        print(version())
        return
    if argv[:1] and argv[0] in TOOLS:
        run_tool(argv[0], list(argv[1:]))
        return
    resuming = argv[:1] == ["fit"] and any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in argv)
    quiet_known_noise(evaluating=bool(argv) and argv[0] != "fit", resuming=resuming)
    # exit_on_error=False: a bad option or key raises, and is printed as one line below
    # instead of the full usage text.
    parser_kwargs = {
        "exit_on_error": False,
        **{sub: {"parser_mode": "omegaconf+", "exit_on_error": False} for sub in SUBCOMMANDS},
    }
    parser_kwargs["predict"]["default_config_files"] = [str(PREDICT_DEFAULTS)]
    try:
        GroundedDiffusionCLI(
            seed_everything_default=0,
            parser_kwargs=parser_kwargs,
            save_config_callback=RunConfig,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except ArgumentError as error:
        sys.exit(f"error: {one_line_config_error(error, argv)}")
    except Exception as error:
        message = find_user_error(error) or spawned_user_error(error)
        if message is None:
            raise
        sys.exit(f"error: {message}")


if __name__ == "__main__":
    main()
