"""The `ipro` Typer application. Each command module adds its command to `app`; `main`
imports them all and runs it (so command modules never import `main`)."""

from __future__ import annotations

import typer

from ipro import __version__

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
