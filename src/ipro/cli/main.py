"""The `ipro` command line."""

from __future__ import annotations

import sys

import typer

from ipro import __version__
from ipro.errors import IproError

app = typer.Typer(
    name="ipro",
    help=(
        "Keep people who they are in image-to-video diffusion models.\n\n"
        "Curate face data, fine-tune Wan I2V models with a face-identity reward (IPRO) "
        "or group policy optimization (Identity-GRPO), generate and evaluate."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ipro {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


def _register() -> None:
    # Each command lives in its own module; importing it adds it to `app`.
    from ipro.cli import eval as eval_cli  # noqa: F401
    from ipro.cli import demo, faces, generate, prepare, reward_model, train  # noqa: F401
    from ipro.cli import export_lora  # noqa: F401
    from ipro.cli import convert  # noqa: F401


def main() -> None:
    _register()
    try:
        app()
    except IproError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(2)


if __name__ == "__main__":
    main()
