"""The command line: LightningCLI with fit / validate / test / predict and YAML experiments.

    grounded-diffusion fit --config experiments/pascal_split1.yaml
    grounded-diffusion fit --config experiments/pascal_split1.yaml --config experiments/offline.yaml

Several ``--config`` files merge left to right; omegaconf interpolation (``${...}``) is resolved
after merging ("omegaconf+" mode), so a later file or a CLI override can feed an earlier one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from omegaconf import OmegaConf

from grounded_diffusion.errors import ConfigError, find_user_error

SUBCOMMANDS = ("fit", "validate", "test", "predict")
PREDICT_DEFAULTS = Path(__file__).parent / "configs" / "predict_defaults.yaml"


class GroundedDiffusionCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        # jsonargparse's "omegaconf+" resolves interpolation in the root parser only, where a
        # subcommand's keys carry its name as prefix; resolve the subcommand's merged config here.
        if self.subcommand is None:
            return
        parser = self._parser(self.subcommand)
        config = self.config[self.subcommand]
        if "${" in str(config):
            dumped = parser.dump(config, format="yaml", skip_unset=False, skip_validation=True)
            resolved = OmegaConf.to_container(OmegaConf.create(dumped), resolve=True)
            self.config[self.subcommand] = parser.parse_object(resolved)

    def after_instantiate_classes(self) -> None:
        # Config-time checks that need both objects (e.g. can the oracle label the categories?).
        check = getattr(self.model, "check_datamodule", None)
        if check is not None and self.datamodule is not None:
            check(self.datamodule)
        self._check_last_checkpoint_exists()

    def _check_last_checkpoint_exists(self) -> None:
        # Lightning only warns and then evaluates an untrained model; fit may start fresh.
        if self.subcommand in (None, "fit") or self.config[self.subcommand].get("ckpt_path") != "last":
            return
        callbacks = self.trainer.checkpoint_callbacks
        if not any(callback._find_last_checkpoints(self.trainer) for callback in callbacks):
            folders = ", ".join(sorted({str(c.dirpath) for c in callbacks})) or "(no ModelCheckpoint configured)"
            raise ConfigError(
                f"--ckpt_path last: no last checkpoint in {folders}. Run `fit` with the same configs "
                "first, or give a checkpoint file: --ckpt_path PATH.ckpt"
            )


def main(args: list[str] | None = None) -> None:
    parser_kwargs = {sub: {"parser_mode": "omegaconf+"} for sub in SUBCOMMANDS}
    parser_kwargs["predict"]["default_config_files"] = [str(PREDICT_DEFAULTS)]
    try:
        GroundedDiffusionCLI(
            seed_everything_default=0,
            parser_kwargs=parser_kwargs,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        sys.exit(f"error: {user_error}")


if __name__ == "__main__":
    main()
