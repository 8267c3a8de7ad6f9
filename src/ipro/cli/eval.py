"""`ipro eval` and `ipro eval-compare`: measure generated videos, compare runs.

Two commands rather than a sub-app: `ipro eval VIDEOS ...` takes a folder as its
first argument, which a click group would read as a subcommand name.

Exit status: 0 on success, 2 for usage errors (missing folders, nothing matched).
"""

from __future__ import annotations

from pathlib import Path

import typer

from ipro.cli.app import app
from ipro.errors import IproError


def _generate(model: str, lora: Path | None, inputs: Path, videos: Path, options: str = "") -> None:
    """Generate a video of every input with `ipro.generate.generate`, writing VIDEOS/<input name>.mp4.

    `options` are `ipro generate`'s documented flags, parsed by that command's own parser;
    curated datasets pass their captions as prompts.
    """
    import shlex

    import torch
    from typer.exceptions import TyperException

    from ipro.eval.inputs import find_inputs
    from ipro.generate import generate
    from ipro.models import detect_family, load_model, resolve_model_path

    try:
        import ipro.cli.generate  # noqa: F401  (registers `generate` on the app)
    except ImportError as e:
        raise IproError(
            f"--generate needs ipro's generation module (ipro.cli.generate), which cannot be imported here ({e}); "
            "generate the videos with `ipro generate` and pass their folder as VIDEOS"
        ) from None
    command = typer.main.get_command(app).commands["generate"]
    try:
        flags = command.make_context("generate", [*shlex.split(options), "--model", str(model), "--out", str(videos)]).params
    except TyperException as e:  # typer's own click: a usage error in the flags
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        raise IproError(f"--generate-options {options!r}: {message}; pass `ipro generate` flags") from None
    for flag, key in (("--lora", "lora"), ("--prompt", "prompt"), ("--prompts", "prompts"), ("--subject", "subject")):
        if flags[key]:
            raise IproError(f"--generate-options: {flag} cannot be given here; eval takes its prompts from the inputs (and --lora itself)")
    items = find_inputs(inputs)
    names = sorted(items)
    images = [items[name].input_image() for name in names]
    for name, image in zip(names, images):
        if image is None:
            raise IproError(f"{inputs}: input {name!r} has no image to generate from; add {name}.png or drop --generate")
    captions = [" ".join((items[name].caption or "").split()) for name in names]
    path = resolve_model_path(model, videos)
    device = flags["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    lightning = [Path(p) for p in flags["lightning"] or ()]
    vm = load_model(path, flags["family"] or detect_family(path), dtype=dtype, device=device, lora=lora, lightning=lightning or None)
    generate(
        vm, images, videos, prompts=captions if all(captions) else "",
        seeds=flags["seed"], names=names, num_frames=flags["num_frames"], height=flags["height"], width=flags["width"],
        steps=flags["steps"], guidance_scale=flags["guidance"], shift=flags["shift"], batch_size=flags["batch_size"],
        negative_prompt=flags["negative_prompt"], fps=flags["fps"],
        metadata={"model": str(path), "lora": str(lora) if lora else None, "lightning": [str(p) for p in lightning] or None},
    )


@app.command("eval")
def eval_command(
    videos: Path = typer.Argument(..., help="Folder of generated videos, each named after its input (name.mp4). With --generate, they are written here."),
    inputs: Path = typer.Option(..., "--inputs", "-i", help="A curated dataset (has manifest.parquet) or a folder of name.png input images, each with an optional ground-truth name.mp4."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for metrics.json and report.html."),
    recognizer: str = typer.Option("dlib", help="Face recognizer: 'dlib' (shipped) or 'arcface:/path/backbone.pth'."),
    dino: Path = typer.Option(None, help="Local transformers DINO checkpoint for subject consistency (none ships)."),
    clip: Path = typer.Option(None, help="Local transformers CLIP checkpoint for background consistency and aesthetics."),
    aesthetic: Path = typer.Option(None, help="LAION aesthetic predictor .pth (needs --clip ViT-L/14)."),
    max_frames: int = typer.Option(None, min=2, help="Evaluate at most this many frames per video."),
    device: str = typer.Option("cpu", help="Device for face detection and embedding (cpu, cuda)."),
    baseline: list[Path] = typer.Option([], "--baseline", "-b", help="Earlier eval output folder(s) to compare against in the report (repeatable)."),
    generate: str = typer.Option(None, "--generate", help="Generate the videos first with this model (diffusers folder), one per input."),
    lora: Path = typer.Option(None, help="LoRA weights for --generate."),
    generate_options: str = typer.Option("", help="More `ipro generate` flags for --generate, e.g. \"--num-frames 33 --steps 8 --seed 1\"."),
    protocol: str = typer.Option("default", help="'default' (every metric, metrics.json + report.html) or 'consisid' (FaceSim-Arc / FaceSim-Cur as ConsisID and OpenS2V-Eval compute them, consisid.json)."),
    arcface: Path = typer.Option(None, help="--protocol consisid: ArcFace IResNet backbone.pth for FaceSim-Arc (else dlib stands in)."),
    curricularface: Path = typer.Option(None, help="--protocol consisid: CurricularFace IR-101 backbone for FaceSim-Cur (else dlib stands in)."),
) -> None:
    """Score generated videos: FaceSim, swaps, coverage, VBench-style quality, rigid faces.

    Writes OUT/metrics.json (per video, and the mean with a 95% bootstrap CI per metric; the recognizer used; what was not computed and why) and OUT/report.html (inputs beside videos, a chart per metric). Compare runs with `ipro eval-compare OUT_A OUT_B ...`.

    Reruns resume: each scored video is kept in OUT/records.jsonl, keyed by its files and these settings, so a killed run, or a rerun with some new or changed videos, scores only those.
    """
    from rich.console import Console

    from ipro.eval import evaluate

    console = Console(stderr=True)
    if generate:
        _generate(generate, lora, inputs, videos, generate_options)
    if protocol not in ("default", "consisid"):
        raise IproError(f"--protocol {protocol!r}: use 'default' or 'consisid'")
    if protocol == "consisid":
        _consisid(videos, inputs, out, arcface, curricularface, device, console)
        return
    result = evaluate(
        videos, inputs, out, baselines=baseline, recognizer=recognizer, dino=dino, clip=clip, aesthetic=aesthetic,
        max_frames=max_frames, device=device, progress=lambda i, n, name: console.print(f"[{i}/{n}] {name}", highlight=False),
    )
    _print_table([result])
    for key, reason in result["not_computed"].items():
        console.print(f"[yellow]not computed[/yellow] {key}: {reason}", highlight=False)
    if result["unmatched_videos"]:
        console.print(f"[yellow]no input for[/yellow] {', '.join(result['unmatched_videos'])}", highlight=False)
    console.print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}", highlight=False)


def _consisid(videos, inputs, out, arcface, curricularface, device, console) -> None:
    from ipro.eval.consisid import evaluate_consisid

    result = evaluate_consisid(videos, inputs, out, arcface=arcface, curricularface=curricularface, device=device,
                               progress=lambda i, n, name: console.print(f"[{i}/{n}] {name}", highlight=False))
    for key, label in (("face_sim_arc", "FaceSim-Arc"), ("face_sim_cur", "FaceSim-Cur")):
        agg = result["aggregate"][key]
        value = "not computed (no face in any input image)" if agg["mean"] is None else f"{agg['mean']:.4f} [{agg['ci_low']:.4f}, {agg['ci_high']:.4f}]"
        typer.echo(f"{label} ({result['recognizers'][key]}): {value}  n={agg['n']}")
    if not all(result["comparable_with_papers"].values()):
        console.print("[yellow]dlib stands in[/yellow] where no --arcface / --curricularface checkpoint was given: not comparable with published FaceSim-Arc/Cur", highlight=False)
    console.print(f"wrote {Path(out) / 'consisid.json'}", highlight=False)


@app.command("eval-compare")
def eval_compare_command(
    runs: list[Path] = typer.Argument(..., help="Output folders of `ipro eval` (or their metrics.json); the first is the baseline."),
    out: Path = typer.Option(None, "--out", "-o", help="Also write a comparison report.html (and comparison.json) here."),
    all_metrics: bool = typer.Option(False, "--all", help="Also show NIQE, motion px and the rigid-face measures."),
) -> None:
    """Print runs as rows and metrics as columns (like the paper's Table 1).

    Each run after the first shows its change against the first: % for scores, percentage points (pp) for rates (DD, Rigid, Swap, Lost, Coverage, all shown in %).
    """
    import json

    from ipro.data.video import atomic_path
    from ipro.eval.compare import load_runs, recognizers, table
    from ipro.eval.report import write_report

    loaded = load_runs(runs)
    _print_table(loaded, all_metrics)
    names = recognizers(loaded)
    if len(names) > 1:
        typer.secho(f"warning: runs use different recognizers ({', '.join(names)}); FaceSim is not comparable", err=True, fg="yellow")
    if out is not None:
        header, rows = table(loaded, all_metrics=True)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "comparison.json") as tmp:
            tmp.write_text(json.dumps({"runs": [str(r) for r in runs], "header": header, "rows": rows}, indent=1))
        write_report(out, loaded)
        typer.echo(f"wrote {out / 'report.html'}", err=True)


def _print_table(runs: list[dict], all_metrics: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    from ipro.eval.compare import table

    header, rows = table(runs, all_metrics)
    t = Table(title=f"ipro eval ({', '.join(sorted({r['recognizer'] for r in runs}))} FaceSim; rates in %)")
    for i, col in enumerate(header):
        t.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        t.add_row(*row)
    Console().print(t)
