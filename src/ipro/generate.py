"""The Python API for image-to-video: a loaded model, input images and seeds -> videos on disk.

`ipro generate`, `ipro eval --generate`, `ipro demo` and the trainer's sample videos all
call `generate`. Each video has its own seed, so a video does not depend on the batch
size, on its position in the batch or on the other inputs. Next to every mp4 a .json file
records the settings that made it.

    from ipro.models import load_model
    from ipro.generate import generate

    model = load_model("Wan2.1-I2V-14B-480P-Diffusers", lora="run/checkpoint-600/lora")
    paths = generate(model, ["alice.png", "bob.png"], "videos", prompts="a person talking", seeds=0)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ipro.data.video import atomic_path, read_image, to_tensor, write_video
from ipro.errors import IproError

Image = str | Path | np.ndarray | torch.Tensor  # a file, (H, W, 3) uint8, or (3, H, W) float in [0, 1]


def default_size(image_hw: tuple[int, int], multiple: int, max_area: int) -> tuple[int, int]:
    """The image's aspect ratio at no more than max_area pixels, rounded to the model's multiple."""
    h, w = image_hw
    scale = min(1.0, math.sqrt(max_area / (h * w)))
    return max(multiple, int(h * scale) // multiple * multiple), max(multiple, int(w * scale) // multiple * multiple)


def fit_image(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Resize (H, W, 3) uint8 to cover (height, width) and center-crop: (3, H, W) float in [0, 1]."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    fitted = ImageOps.fit(PILImage.fromarray(image), (width, height), method=PILImage.Resampling.LANCZOS)
    return to_tensor(np.array(fitted))  # a copy: PIL's buffer is read-only


def output_names(images: Sequence[Image]) -> list[str]:
    """Video names: the image files' stems (numbered if two share one), else video_0, video_1, ..."""
    stems = [Path(p).stem if isinstance(p, (str, Path)) else f"video_{i}" for i, p in enumerate(images)]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{stem}_{i}" for i, stem in enumerate(stems)]


def _as_tensor(image: Image) -> torch.Tensor:
    """Any accepted image as (3, H, W) float in [0, 1] on the CPU."""
    if isinstance(image, (str, Path)):
        return to_tensor(read_image(image))
    if isinstance(image, np.ndarray):
        return to_tensor(image)
    return image.detach().float().cpu()


def _fitted(image: Image, height: int, width: int) -> torch.Tensor:
    """A tensor already at (height, width) is used as it is; anything else is fitted like a file."""
    t = _as_tensor(image)
    if t.shape[-2:] == (height, width):
        return t
    return fit_image((t.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy(), height, width)


def _per_video(value, count: int, name: str) -> list:
    """A single value for every video, or one per video."""
    if isinstance(value, (str, int)) or value is None:
        return [value] * count
    if len(value) != count:
        raise IproError(f"{name}: got {len(value)} values for {count} videos; pass one for all or one per video")
    return list(value)


@torch.no_grad()
def sample_videos(
    model,
    images: torch.Tensor | None,
    prompts: list[str],
    seeds: list[int],
    *,
    num_frames: int,
    height: int,
    width: int,
    steps: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    batch_size: int = 1,
    subjects: list[list[torch.Tensor]] | None = None,
    negative_prompt: str = "",
) -> Iterator[torch.Tensor]:
    """Yield each video (F, 3, H, W) float in [0, 1], in input order, from fitted first frames
    (N, 3, H, W) (None for a model without a first frame: one video per seed). Video i starts
    from noise drawn with seeds[i] alone, so batching does not change it."""
    from ipro.sampling import sample

    count = len(seeds)
    for start in range(0, count, batch_size):
        idx = list(range(start, min(start + batch_size, count)))
        # A subject-to-video model (Phantom) reads only the batch size of the first frames.
        batch = torch.zeros(len(idx), 3, height, width) if images is None else images[idx]
        extra = {"subject_images": [subjects[i] for i in idx]} if subjects else {}
        cond = model.prepare_condition(batch, [prompts[i] for i in idx], num_frames, height, width, negative_prompt, **extra)
        shape = model.latent_shape(1, num_frames, height, width)
        noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seeds[i])) for i in idx])
        rollout = sample(model, cond, steps, guidance_scale=guidance_scale, shift=shift, noise=noise)
        yield from model.decode(rollout.latents).float().cpu()


def generate(
    model,
    images: Sequence[Image] | torch.Tensor | None,
    out_dir: str | Path,
    *,
    prompts: str | Sequence[str] | None = None,
    seeds: int | Sequence[int] = 0,
    names: Sequence[str] | None = None,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    batch_size: int = 1,
    subjects: Sequence[Image] | Sequence[Sequence[Image]] | torch.Tensor | None = None,
    negative_prompt: str = "",
    fps: float | None = None,
    crf: int = 18,
    overwrite: bool = True,
    metadata: dict | None = None,
    progress=None,
) -> list[Path]:
    """Write one video per image to out_dir/<name>.mp4 with its settings in <name>.json.

    model: a loaded `VideoModel` (`ipro.models.load_model`, or a trainer's model with its LoRA).
    images: first frames: files, (H, W, 3) uint8 arrays or (3, H, W) tensors in [0, 1], or an
        (N, 3, H, W) tensor; each is resized to cover the video size and center-cropped.
        None for a model without a first frame (Phantom): one video per seed.
    prompts: one for every video, or one per video. seeds: video i uses seeds + i, or seeds[i].
    names: file names without suffix (default: the images' stems).
    num_frames, height, width: default to the model's frames and the first image's aspect
        at the model's area. steps, guidance_scale, shift: default to the model's.
    subjects: subject images (the people to keep) for every video (Wan VACE, Phantom), or one list per video.
    crf: H.264 quality of the mp4 (0: lossless luma; 18, the default, is visually lossless but
        adds the codec's own 8x8 block edges to noisy frames, which `ipro eval`'s blockiness reads).
    overwrite: False keeps videos already in out_dir (and samples only the missing ones).
    metadata: more entries for each .json (e.g. the model's path, its LoRA).
    progress: called with the number of videos done after each one.
    Returns the mp4 paths, in input order.
    """
    from ipro import __version__
    from ipro.sampling import flow_schedule

    if images is None:
        if getattr(model, "takes_first_frame", True):
            raise IproError(f"images: the {model.family} family makes a video from a first frame; pass one image per video")
        count = len(seeds) if not isinstance(seeds, int) else len(names) if names else 1
        images = None
    else:
        images = list(images)
        count = len(images)
        if not count:
            raise IproError("images: pass at least one first-frame image (one video per image)")
    seeds = [seeds + i for i in range(count)] if isinstance(seeds, int) else list(seeds)
    prompts = _per_video(prompts or "", count, "prompts")
    names = list(names) if names is not None else output_names(images) if images else [f"video_{i}" for i in range(count)]
    if len(seeds) != count or len(names) != count:
        raise IproError(f"seeds/names: got {len(seeds)} seeds and {len(names)} names for {count} videos; pass one per video")
    if batch_size < 1:
        raise IproError(f"batch_size={batch_size}: use 1 or more")
    num_frames = num_frames or model.default_num_frames
    if (height is None) != (width is None):
        raise IproError("height and width: pass both or neither")
    if height is None:  # without a first frame (Phantom) the default is landscape 480p's aspect
        hw = _as_tensor(images[0]).shape[-2:] if images else (480, 832)
        height, width = default_size(tuple(hw), model.pixel_multiple(), model.default_area)
    model.check_shape(num_frames, height, width)
    if subjects is not None:
        if not model.takes_subject_images:
            raise IproError(f"subjects: the {model.family} family takes no subject images; use a Wan VACE or Phantom model or pass none")
        per_video = (isinstance(subjects, torch.Tensor) and subjects.ndim == 5) or (
            not isinstance(subjects, torch.Tensor) and len(subjects) and isinstance(subjects[0], (list, tuple)))
        subjects = [[_as_tensor(s) for s in subj] for subj in (subjects if per_video else [subjects] * count)]
        if len(subjects) != count:
            raise IproError(f"subjects: got subject images for {len(subjects)} videos, but {count} videos; pass one list for all or one per video")

    out_dir = Path(out_dir)
    paths = [out_dir / f"{name}.mp4" for name in names]
    todo = [i for i in range(count) if overwrite or not paths[i].is_file()]
    if not todo:
        return paths
    fitted = torch.stack([_fitted(images[i], height, width) for i in todo]) if images else None
    fps = fps or model.fps
    settings = {
        "negative_prompt": negative_prompt,
        "family": model.family,
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "steps": len(flow_schedule(model, steps, shift)),
        "guidance": float(model.default_guidance if guidance_scale is None else guidance_scale),
        "shift": shift if shift is not None else model.scheduler.config.get("shift", model.scheduler.config.get("flow_shift")),
        "fps": fps,
        "crf": crf,
        "ipro_version": __version__,
        **(metadata or {}),
    }
    videos = sample_videos(
        model, fitted, [prompts[i] for i in todo], [seeds[i] for i in todo], num_frames=num_frames, height=height,
        width=width, steps=steps, guidance_scale=guidance_scale, shift=shift, batch_size=batch_size,
        subjects=[subjects[i] for i in todo] if subjects else None, negative_prompt=negative_prompt,
    )
    for done, (i, video) in enumerate(zip(todo, videos), 1):
        frames = (video.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        write_video(paths[i], frames, fps=fps, crf=crf)
        image = images[i] if images else None
        record = {"video": paths[i].name, "image": str(image) if isinstance(image, (str, Path)) else None,
                  "prompt": prompts[i], "seed": seeds[i], **settings}
        with atomic_path(paths[i].with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
        if progress is not None:
            progress(done)
    return paths


def generate_folder(model_path: str | Path, lora: str | Path | None, inputs: Path, out: Path, *, num_frames: int, steps: int,
                    prompt: str = "a person talking", crf: int = 18) -> Path:
    """One video per NAME_sSEED.png in `inputs`, animated with SEED at the image's size and
    written as out/NAME_sSEED.mp4 (how `ipro demo` lays out its held-out inputs). Videos
    already in `out` are kept, and the model is not even loaded when none is missing, so a
    rerun resumes for free."""
    from ipro.models import load_model

    todo = [p for p in sorted(Path(inputs).glob("*.png")) if not (Path(out) / f"{p.stem}.mp4").is_file()]
    if todo:
        height, width = read_image(todo[0]).shape[:2]
        generate(load_model(model_path, lora=lora), todo, out, prompts=prompt, seeds=[int(p.stem.rsplit("_s", 1)[1]) for p in todo],
                 num_frames=num_frames, height=height, width=width, steps=steps, fps=16, crf=crf, overwrite=False,
                 metadata={"model": str(model_path), "lora": str(lora) if lora else None})
    return Path(out)
