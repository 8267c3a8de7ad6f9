"""`ipro export-lora`: a trained LoRA as one file for ComfyUI or diffusers.

    ipro export-lora runs/wan22-5b-ipro --format comfyui                  # latest checkpoint
    ipro export-lora runs/a14b/checkpoint-100 --format comfyui --merge-lightning --out a14b.safetensors

ComfyUI's Wan LoRA loader reads `diffusion_model.blocks.N.<module>.lora_down/lora_up.weight`
with `alpha` (the key mapping lives in `ipro.models.lora_formats`). Wan 2.2 A14B gets one
file per expert, named for it (`<out>_high_noise.safetensors`, `<out>_low_noise.safetensors`):
ipro trains the low-noise expert only, so the high-noise file exists only when a Lightning
LoRA is merged in (`--merge-lightning`), which makes it the Lightning LoRA alone.
"""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from ipro.cli.app import app
from ipro.errors import IproError

FORMATS = ("comfyui", "diffusers")
EXPERTS = ("high_noise", "low_noise")  # A14B: transformer (t >= boundary), transformer_2


def find_lora(source: Path) -> tuple[Path, dict | None]:
    """(LoRA file, the run's config as a dict or None) from a run folder, a checkpoint
    folder, a LoRA folder or a LoRA file."""
    source = Path(source)
    if not source.exists():
        raise IproError(f"{source}: not found; pass a run folder (run.output_dir), a checkpoint-<step> folder or a LoRA file")
    run = None
    if source.is_dir() and (source / "config.yaml").is_file() and not (source / "state.json").is_file():
        from ipro.train.checkpoint import list_checkpoints

        found = list_checkpoints(source)
        if not found:
            raise IproError(f"{source}: this run has no checkpoint yet; train until run.checkpoint_every steps or pass a LoRA file")
        run, source = source, found[-1]
    if source.is_dir() and (source / "state.json").is_file():
        run = run or source.parent
        source = source / "lora"
    if source.is_dir():
        files = sorted(source.glob("*.safetensors"))
        if not files:
            raise IproError(f"{source}: no LoRA .safetensors here (a run trained with model.lora_rank: 0 has none); pass a LoRA file")
        preferred = source / "pytorch_lora_weights.safetensors"
        run = run or (source.parent.parent if source.name == "lora" else None)
        source = preferred if preferred in files else files[0]
    config = None
    if run is not None and (Path(run) / "config.yaml").is_file():
        config = yaml.safe_load((Path(run) / "config.yaml").read_text()) or {}
    return source, config


def _family(config: dict | None, family: str | None) -> str | None:
    if family is not None or config is None:
        return family
    m = config.get("model", {})
    if m.get("family", "auto") != "auto":
        return m["family"]
    path = str(m.get("path", ""))
    if path == "builtin":
        return "pixel-i2v"
    if path.startswith("tiny:"):
        return path.split(":", 1)[1]
    try:
        from ipro.models import detect_family

        return detect_family(path)
    except (IproError, OSError):
        return None  # the model is not on this machine: the user can pass --family


def export_lora(
    source: str | Path,
    format: str = "comfyui",
    out: str | Path | None = None,
    merge_lightning: bool = False,
    lightning: list[str | Path] | None = None,
    family: str | None = None,
) -> list[Path]:
    """Write the LoRA of `source` in `format`; returns the files written (one per expert)."""
    # Imported here: ipro.models pulls in diffusers (~4 s of CPU), which every `ipro` command paid at startup.
    from ipro.models import lora_formats

    if format not in FORMATS:
        raise IproError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    file, config = find_lora(Path(source))
    family = _family(config, family)
    if family == "pixel-i2v" and format == "comfyui":
        raise IproError(f"{file}: the embedded pixel-space model (pixel-i2v) is not a Wan model ComfyUI knows; use --format diffusers")
    modules, _ = lora_formats.read_modules(file)
    if lightning and not merge_lightning:
        merge_lightning = True
    if merge_lightning and not lightning:
        configured = (config or {}).get("model", {}).get("lightning_lora")
        if not configured:
            raise IproError(f"{file}: --merge-lightning but the run's config has no model.lightning_lora; pass the file with --lightning PATH")
        if isinstance(configured, dict):  # {high_noise, low_noise}, as model.lightning_lora accepts
            configured = [configured["high_noise"], configured["low_noise"]]
        lightning = configured if isinstance(configured, list) else [configured]
    two_experts = family == "wan2.2-i2v-a14b"
    experts = EXPERTS if two_experts else (None,)
    lightning = list(lightning or [])
    if lightning and len(lightning) != len(experts):  # A14B's experts were distilled apart: one file each
        raise IproError(f"--lightning: got {len(lightning)} files for {len(experts)} experts; pass one per expert (high-noise first)")
    out = Path(out) if out is not None else file.parent.parent / f"lora-{format}.safetensors"
    written = []
    for i, expert in enumerate(experts):
        ours = modules if expert in (None, "low_noise") else {}
        extra: dict = {}
        if lightning:
            light, extra = lora_formats.read_modules(lightning[i])
            ours = lora_formats.concat(ours, light)
        if not ours and not extra:
            continue  # A14B's high-noise expert without Lightning: untouched, no file
        path = out if expert is None else out.with_name(f"{out.stem}_{expert}{out.suffix or '.safetensors'}")
        if format == "comfyui":
            meta = {"format": "pt", "ipro_family": family or "unknown", "ipro_expert": expert or "transformer"}
            lora_formats.write_safetensors(path, {**lora_formats.to_comfyui(ours, str(file)), **extra}, meta)
        else:
            if extra:
                raise IproError(f"{lightning[i]}: has keys a diffusers LoRA file cannot hold (e.g. {sorted(extra)[0]}); use --format comfyui")
            lora_formats.write_diffusers(path, ours)
        written.append(path)
    return written


@app.command("export-lora")
def export_lora_command(
    source: Path = typer.Argument(..., help="A run folder (its latest checkpoint), a checkpoint-<step> folder, or a LoRA .safetensors file."),
    format: str = typer.Option("comfyui", "--format", "-f", help="comfyui (diffusion_model.* lora_down/lora_up + alpha) or diffusers (transformer.* lora_A/lora_B)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output file; A14B writes <stem>_high_noise / <stem>_low_noise beside it. Default: lora-<format>.safetensors beside the LoRA folder."),
    merge_lightning: bool = typer.Option(False, "--merge-lightning", help="Add the run's Lightning LoRA (model.lightning_lora) to the export, so one file per expert carries both."),
    lightning: list[Path] = typer.Option([], "--lightning", help="Lightning LoRA file(s) to merge (implies --merge-lightning; one per expert for A14B, high-noise first)."),
    family: str = typer.Option(None, help="Model family when SOURCE has no run config.yaml (e.g. wan2.2-i2v-a14b)."),
) -> None:
    """Export a trained LoRA for ComfyUI's Wan LoRA loader or for diffusers' `load_lora_weights`."""
    for path in export_lora(source, format, out, merge_lightning, lightning or None, family):
        typer.echo(f"wrote {path}")
