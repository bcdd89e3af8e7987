"""The ``miras`` command line: one click group, each command in ``miras/commands/<name>.py``."""

from __future__ import annotations

import importlib
import sys

import click

from miras.errors import MirasError

# each module defines click commands and a ``register(group)`` function
COMMAND_MODULES = ["spec_cmds", "train_cmds", "search_cmds", "grow_cmds"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="miras")
def cli() -> None:
    """miras: declarative architecture search for test-time memorization models."""


for _name in COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"miras.commands.{_name}")
    except ModuleNotFoundError as _err:  # a command module not written yet
        if _err.name != f"miras.commands.{_name}":
            raise
        continue
    _mod.register(cli)


def main() -> None:
    """Entry point: MirasError becomes a one-paragraph message and exit code 1, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except MirasError as err:
        click.secho(f"error: {err}", fg="red", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
