"""The `ipro` command line."""

from __future__ import annotations

import sys

import typer

from ipro.cli.app import app
from ipro.errors import IproError


def _register() -> None:
    # Each command lives in its own module; importing it adds it to `app`.
    from ipro.cli import eval as eval_cli  # noqa: F401
    from ipro.cli import demo, faces, generate, prepare, reward_model, train  # noqa: F401
    from ipro.cli import export_lora  # noqa: F401
    from ipro.cli import convert  # noqa: F401
    from ipro.cli import plan  # noqa: F401


def main() -> None:
    _register()
    try:
        app()
    except IproError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(2)


if __name__ == "__main__":
    main()
