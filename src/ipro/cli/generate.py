"""`ipro generate`: image-to-video with a (fine-tuned) model, one mp4 per input image.

Argument checks and model loading; `ipro.generate.generate` does the rest. Each video gets
its own seed (--seed + its index), so a video does not depend on the batch size or on the
other inputs. Next to every mp4 a .json file records the settings that made it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from ipro.cli.app import app
from ipro.errors import IproError
from ipro.generate import default_size, output_names


def read_prompts(prompt: str | None, prompts_file: Path | None, num_images: int) -> list[str]:
    """One prompt per image from --prompt or --prompts (one line for all, or one line per image)."""
    if prompt is not None and prompts_file is not None:
        raise IproError("--prompt and --prompts: pass one of them, not both")
    if prompts_file is None:
        return [prompt or ""] * num_images
    if not prompts_file.is_file():
        raise IproError(f"{prompts_file}: no such prompts file; pass a text file with one prompt per line")
    lines = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise IproError(f"{prompts_file}: has no prompts; write one prompt per line")
    if len(lines) == 1:
        return lines * num_images
    if len(lines) != num_images:
        raise IproError(f"{prompts_file}: has {len(lines)} prompts for {num_images} images; write one line for all or one per image")
    return lines


@app.command("generate")
def generate(
    images: list[Path] = typer.Argument(None, help="First-frame images; one video per image. Phantom (no first frame): more subject images of its one video."),
    model: Path = typer.Option(..., "--model", help="Diffusers-format model folder (Wan 2.1 I2V, Wan 2.2 TI2V-5B or I2V-A14B, Wan VACE, Phantom-Wan), or 'builtin' for the embedded CPU model."),
    out: Path = typer.Option(..., "--out", help="Folder for the .mp4 files and their .json settings."),
    prompt: str = typer.Option(None, "--prompt", help="One prompt for every image."),
    prompts: Path = typer.Option(None, "--prompts", help="Text file: one line for all images, or one line per image."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="Used when --guidance > 1."),
    lora: Path = typer.Option(None, "--lora", help="LoRA weights from `ipro train` (file or folder)."),
    lightning: list[Path] = typer.Option([], "--lightning", help="Distilled few-step LoRA to merge; defaults to its 4-step, no-CFG schedule. Wan 2.2 A14B: give it twice, the high-noise expert's file first."),
    family: str = typer.Option(None, "--family", help="Model family; detected from model_index.json by default."),
    subject: list[Path] = typer.Option([], "--subject", "--reference", help="Subject image: a person to keep, for every video (Wan VACE, Phantom; their own docs call these reference images, hence the alias): --subject A.png B.png or --subject A.png --subject B.png."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first video; video i uses seed + i."),
    num_frames: int = typer.Option(None, "--num-frames", help="Frames per video: 4k+1 (default: the model's, 81 = 5 s at 16 fps for Wan)."),
    height: int = typer.Option(None, "--height", help="Output height (with --width); default: the image's aspect at the model's area (480p for Wan)."),
    width: int = typer.Option(None, "--width", help="Output width (with --height)."),
    steps: int = typer.Option(None, "--steps", min=1, help="Sampling steps (default: the model's, 4 with --lightning)."),
    guidance: float = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default: the model's; 1 disables)."),
    shift: float = typer.Option(None, "--shift", help="Override the scheduler's timestep shift."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Videos generated at once."),
    fps: float = typer.Option(None, "--fps", help="Frame rate of the written mp4 (default: the model family's)."),
    crf: int = typer.Option(18, "--crf", min=0, max=51, help="H.264 quality (lower is better): 18 looks lossless; 0 stores the luma losslessly, for measuring a model's own block pattern (the codec adds 8x8 edges to noisy frames)."),
    device: str = typer.Option(None, "--device", help="cuda, cpu, ... (default: cuda when available)."),
) -> None:
    """Generate a video from each image with a Wan image-to-video model."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ipro.data.video import read_image
    from ipro.generate import generate as generate_videos
    from ipro.models import FAMILIES, detect_family, load_model, resolve_model_path

    # Everything that can be checked without loading weights is checked first.
    images = list(images or [])
    for path in images:
        if not path.is_file():
            raise IproError(f"{path}: no such image; check the path")
    if (height is None) != (width is None):
        raise IproError("--height and --width: pass both or neither")
    model = resolve_model_path(model, out)
    family = family or detect_family(model)
    if family not in FAMILIES:
        raise IproError(f"--family {family!r}: unknown; use one of {', '.join(FAMILIES)}")
    family_cls = FAMILIES[family]
    # Subject-to-video (Phantom) has no first frame: `--subject A.png B.png` leaves B.png among
    # the positional images, so every image given is a subject of the one video made.
    subject_only = not getattr(family_cls, "takes_first_frame", True)
    if subject_only:
        subject, images = [*subject, *images], []
        if not subject:
            raise IproError(f"--subject: the {family} family makes a video from 1-4 subject images; pass them: --subject A.png B.png")
    elif not images:
        raise IproError("IMAGES: pass at least one first-frame image (one video per image)")
    all_prompts = read_prompts(prompt, prompts, max(len(images), 1))
    num_frames = num_frames or family_cls.default_num_frames
    if height is None:
        hw = read_image(images[0]).shape[:2] if images else (480, 832)  # Phantom's default size is landscape 480p
        height, width = default_size(hw, family_cls.pixel_multiple(), family_cls.default_area)
    family_cls.check_shape(num_frames, height, width)
    for path in subject:
        if not path.is_file():
            raise IproError(f"{path}: no such --subject image; check the path")
    if subject and not family_cls.takes_subject_images:
        raise IproError(f"--subject: the {family} family takes no subject images; use a Wan VACE or Phantom checkpoint or drop --subject")
    for path, name in ((lora, "--lora"), *((p, "--lightning") for p in lightning)):
        if path is not None and not path.exists():
            raise IproError(f"{path}: {name} file not found; check the path")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    extra = {"num_subject_images": len(subject)} if subject else {}
    vm = load_model(model, family, dtype=dtype, device=device, lora=lora, lightning=lightning or None, **extra)
    names = output_names(images) if images else ["+".join(p.stem for p in subject)]
    metadata = {"subjects": [str(p) for p in subject], "model": str(model), "lora": str(lora) if lora else None,
                "lightning": [str(p) for p in lightning] or None}
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("generating", total=len(names))
        paths = generate_videos(
            vm, images or None, out, prompts=all_prompts, seeds=seed, names=names, num_frames=num_frames, height=height,
            width=width, steps=steps, guidance_scale=guidance, shift=shift, batch_size=batch_size, subjects=subject or None,
            negative_prompt=negative_prompt, fps=fps, crf=crf, metadata=metadata, progress=lambda done: progress.update(task, completed=done),
        )
    typer.echo(f"wrote {len(paths)} video(s) to {out}")
