"""The `linernotes` command: one typer app; each command is a thin call into the library.

Commands live in small modules by topic; importing them registers them on `app`.
"""

from __future__ import annotations

import sys

import typer

from linernotes.cli.common import app
from linernotes.errors import LinernotesError

# isort: off
# importing registers the commands, in the order `--help` lists them
from linernotes.cli import model, attribution, optout, credit, evaluate, demo  # noqa: F401, E402
# isort: on

__all__ = ["app", "run"]


@app.command()
def version() -> None:
    """Print the linernotes version."""
    from linernotes import __version__

    typer.echo(__version__)


def run() -> None:
    """Entry point that turns LinernotesError into a clean message."""
    try:
        app()
    except LinernotesError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
