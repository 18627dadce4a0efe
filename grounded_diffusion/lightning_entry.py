"""The ``lightning`` command: our fit / validate / test / predict, everything else to lightning-sdk.

lightning >= 2.6 installs no ``lightning`` script; the ``lightning-sdk`` package does (its cloud
CLI). Users type ``lightning fit --config experiments/pascal_split1.yaml``, so this script runs
the four training subcommands itself and hands any other subcommand to lightning-sdk's CLI.
"""

from __future__ import annotations

import sys

from grounded_diffusion.cli import SUBCOMMANDS, TOOLS
from grounded_diffusion.cli import main as run_experiment

OWN = {*SUBCOMMANDS, *TOOLS, "-h", "--help", "--version"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in OWN or argv[0].startswith("--"):
        run_experiment(argv)
        return
    try:
        from lightning_sdk.cli.entrypoint import main_cli
    except ImportError:
        sys.exit(
            f"lightning: '{argv[0]}' is not one of {', '.join(SUBCOMMANDS)} (this project's "
            "subcommands), and the Lightning cloud CLI that handles other subcommands is not "
            "installed. Install it with `pip install lightning-sdk`."
        )
    sys.argv = ["lightning", *argv]
    main_cli()


if __name__ == "__main__":
    main()
