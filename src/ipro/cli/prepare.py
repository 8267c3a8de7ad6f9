"""`ipro prepare` and `ipro prepare-merge`: build a training set from a folder of videos.

Exit status: 0 when every input was read, 1 when some input failed (the others are
still prepared; summary.json lists why), 2 for usage errors (bad config, bad folder).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ipro.cli.app import app


def print_summary(summary: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title=f"ipro prepare -> {out_dir}")
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_row("inputs", str(summary["inputs"]))
    table.add_row("clips", str(summary["clips"]))
    table.add_row("kept", str(summary["kept"]))
    table.add_row("dropped", str(summary["dropped"]))
    for name, count in summary["dropped_by_filter"].items():
        table.add_row(f"  failed {name}", str(count))
    table.add_row("failed files", str(len(summary["failed_files"])))
    table.add_row("skipped files", str(len(summary["skipped_files"])))
    console.print(table)
    for item in summary["failed_files"]:
        console.print(f"[red]failed[/red] {item['reason']}", highlight=False)
    for item in summary["notes"]:
        console.print(f"[yellow]note[/yellow] {item['source']}: {item['note']}", highlight=False)


@app.command("prepare")
def prepare_command(
    input_dir: Path = typer.Argument(..., help="Folder of videos (mp4, mov, avi, mkv, webm) and photos; captions in "
                                     "<stem>.txt next to a file or captions.jsonl / captions.csv at the root."),
    out_dir: Path = typer.Argument(..., help="Output folder: manifest.parquet, summary.json, items/, records/."),
    config: Path = typer.Option(
        None, "--config", "-c", help="YAML settings (see configs/prepare-*.yaml); defaults: Wan 81 frames, 16 fps, 480x832."
    ),
    workers: int = typer.Option(1, "--workers", "-j", help="Processes; each builds its own face models and uses one thread."),
    shard: str = typer.Option(None, "--shard", help="I/N: process only this deterministic share of the inputs."),
) -> None:
    """Cut clips, detect and embed faces, filter, and write first frames, clips and face pools.

    Rerunning with the same OUT_DIR resumes: finished inputs are skipped and the manifest is rebuilt from all finished inputs.

    Exit status 1 when some input could not be read (the others are prepared; summary.json says why), 2 for usage errors.
    """
    from ipro.data.prepare import load_config, parse_shard, prepare

    settings = load_config(config)
    summary = prepare(input_dir, out_dir, settings, workers=workers, shard=parse_shard(shard), progress=True)
    print_summary(summary, out_dir)
    if summary["failed_files"]:
        raise typer.Exit(code=1)


@app.command("prepare-merge")
def prepare_merge_command(
    out_dir: Path = typer.Argument(..., help="Folder to merge into (created if missing)."),
    sources: list[Path] = typer.Argument(..., help="OUT_DIRs of `ipro prepare` runs (e.g. one per --shard)."),
) -> None:
    """Merge prepared folders (e.g. shards) into one; files are hard-linked where possible."""
    from ipro.data.prepare import merge_prepared

    summary = merge_prepared(sources, out_dir)
    print_summary(summary, out_dir)
    if summary["failed_files"]:
        raise typer.Exit(code=1)
