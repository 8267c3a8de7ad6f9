"""`ipro reward-model`: the learned identity reward of Identity-GRPO.

    ipro reward-model pairs runs/data --out runs/pairs            # synthetic preference pairs
    ipro reward-model train --pairs runs/pairs/train.jsonl --eval runs/pairs/heldout.jsonl --out runs/rm
    ipro reward-model eval runs/rm --pairs runs/pairs/heldout.jsonl
    ipro reward-model score runs/rm -s face.png video1.mp4 video2.mp4

Then train a video model against it: `ipro train --method grpo --set grpo.reward_model=runs/rm`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ipro.cli.app import app
from ipro.errors import IproError

reward_model_app = typer.Typer(
    help="Identity reward model: make preference pairs, train on them, evaluate, score videos.",
    no_args_is_help=True,
)
app.add_typer(reward_model_app, name="reward-model")


def _bar(description: str):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    task = progress.add_task(description, total=None)

    def update(done: int, total: int, *_):
        progress.update(task, completed=done, total=total)

    return progress, update


@reward_model_app.command("pairs")
def pairs_command(
    prepared: list[Path] = typer.Argument(..., help="Folder(s) written by `ipro prepare` (their kept clips and face pools)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: videos/, subjects/, train.jsonl, heldout.jsonl, summary.json."),
    kinds: str = typer.Option("swap,blend,warp,flicker,duplicate", help="Distortions, comma-separated."),
    variants: int = typer.Option(4, min=1, help="Pairs per clip and distortion."),
    ties: int = typer.Option(1, min=0, help="Tie pairs (clip vs a photometric variant) per clip."),
    heldout: float = typer.Option(0.25, min=0.0, max=0.9, help="Fraction of clips (and donors) held out."),
    split_by: str = typer.Option("clip", help="'clip' or 'source': what a held-out group is."),
    donor: list[Path] = typer.Option([], "--donor", help="Image(s) with another person's face to paste (repeatable)."),
    builtin_donors: bool = typer.Option(True, help="Also use the faces that ship with scikit-image (astronaut, cameraman, LFW)."),
    seed: int = typer.Option(0),
) -> None:
    """Make synthetic preference pairs from curated clips, each with a known better side."""
    from ipro.data.pairs import make_synthetic_pairs
    from ipro.data.video import read_image

    images = {p.stem: read_image(p) for p in donor}
    progress, update = _bar("distorting clips")
    with progress:
        summary = make_synthetic_pairs(
            prepared, out, kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()), variants=variants, ties=ties,
            heldout_fraction=heldout, split_by=split_by, donor_images=images, builtin_donors=builtin_donors, seed=seed,
            progress=update,
        )
    typer.echo(f"{summary['clips']} clips, {summary['donors']} donors -> {out}")
    for split in ("train", "heldout"):
        s = summary[split]
        typer.echo(f"  {split}: {s['pairs']} pairs, labels {s['labels']}, kinds {s['kinds']}")


@reward_model_app.command("train")
def train_command(
    pairs: list[Path] = typer.Option(..., "--pairs", "-p", help="JSONL pair file(s): human annotations and/or `reward-model pairs` output (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where the model goes (reward_model.json + weights)."),
    eval_pairs: list[Path] = typer.Option([], "--eval", help="Held-out JSONL pair file(s) to report accuracy on."),
    heldout: float = typer.Option(0.0, min=0.0, max=0.9, help="Without --eval: hold out this fraction of pair groups."),
    frames: int = typer.Option(8, min=2, help="Frames sampled per video."),
    epochs: int | None = typer.Option(None, min=1, help="Passes over the pairs [default: 150 for faces, 2 for vlm]."),
    lr: float | None = typer.Option(None, min=0.0, help="Learning rate [default: 3e-3 for faces, 1e-4 for vlm (LoRA + value head)]."),
    seed: int = typer.Option(0),
    recognizer: str = typer.Option("dlib", help="Face recognizer of the backbone: 'dlib' or 'arcface:/path/backbone.pth'."),
    cache: Path | None = typer.Option(None, help="Face-embedding cache folder (default: OUT/face-cache)."),
    backbone: str = typer.Option("faces", help="'faces' (frozen face recognizer + temporal head, CPU) or 'vlm' (needs --vlm)."),
    vlm: Path | None = typer.Option(None, help="Local transformers folder of a VLM (e.g. Qwen2.5-VL-3B-Instruct) for --backbone vlm."),
    vlm_lora_rank: int = typer.Option(16, min=0, help="LoRA rank on the VLM's language attention (0: train the value head only)."),
    vlm_image_size: int = typer.Option(224, min=28, help="Side each frame and subject image is resized to for the VLM (a multiple of 28 for Qwen)."),
    device: str = typer.Option("cpu"),
) -> None:
    """Train on preference pairs with a Bradley-Terry loss that allows ties (Rao-Kupper)."""
    from ipro.data.pairs import load_pairs, split_pairs

    train = [p for f in pairs for p in load_pairs(f)]
    held = [p for f in eval_pairs for p in load_pairs(f)]
    if not held and heldout > 0:
        train, held = split_pairs(train, heldout, seed)
    if backbone == "vlm":
        _train_vlm(train, held, out, vlm, frames, vlm_lora_rank, vlm_image_size, lr or 1e-4, epochs or 2, seed, device)
        return
    if backbone != "faces":
        raise IproError(f"--backbone {backbone!r}: use 'faces' or 'vlm'")
    from ipro.faces.embedder import FaceEmbedder
    from ipro.rewards.learned import (
        FaceFeatureExtractor,
        RewardModelTrainConfig,
        train_reward_model,
    )

    extractor = FaceFeatureExtractor(FaceEmbedder(recognizer).to(device), num_frames=frames, cache_dir=cache or out / "face-cache")
    config = RewardModelTrainConfig(num_frames=frames, epochs=epochs or 150, lr=lr or 3e-3, seed=seed)
    progress, update = _bar("embedding faces")
    with progress:
        model = train_reward_model(train, held or None, config, extractor, progress=update)
    model.save(out)
    _report(model.metrics, out)


def _report(metrics: dict, out: Path | None = None) -> None:
    for split in ("train", "eval"):
        m = metrics.get(split)
        if m:
            kinds = ", ".join(f"{k} {v:.2f}" for k, v in m["by_kind"].items())
            typer.echo(f"{split}: accuracy {m['accuracy']:.3f} on {m['decisive']} decisive pairs, tie accuracy {m['tie_accuracy']:.3f} ({kinds})")
    if out is not None:
        typer.echo(f"saved {out}")


def _train_vlm(train, held, out: Path, vlm: Path | None, frames: int, rank: int, image_size: int, lr: float, epochs: int, seed: int,
               device: str) -> None:
    from ipro.rewards.learned import evaluate_files
    from ipro.rewards.vlm import VlmRewardModel, train_vlm_reward_model

    if vlm is None:
        raise IproError("--backbone vlm needs --vlm PATH: a local VLM folder (e.g. Qwen2.5-VL-3B-Instruct)")
    model = VlmRewardModel(vlm, num_frames=frames, lora_rank=rank, image_size=image_size, device=device)
    progress, update = _bar("training the VLM reward model")
    with progress:
        train_vlm_reward_model(model, train, epochs=epochs, lr=lr, seed=seed, progress=update)
    model.metrics = {"eval": evaluate_files(model, held)} if held else {}
    model.save(out)
    _report(model.metrics, out)


@reward_model_app.command("eval")
def eval_command(
    model: Path = typer.Argument(..., help="A folder written by `ipro reward-model train`."),
    pairs: list[Path] = typer.Option(..., "--pairs", "-p", help="JSONL pair file(s) to evaluate on."),
    cache: Path | None = typer.Option(None, help="Face-embedding cache folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    device: str = typer.Option("cpu"),
) -> None:
    """Accuracy on decisive pairs (the better video scores higher), tie accuracy, per kind."""
    from ipro.data.pairs import load_pairs
    from ipro.rewards.learned import evaluate_files, load_reward_model

    rm = load_reward_model(model, device=device)
    metrics = evaluate_files(rm, [p for f in pairs for p in load_pairs(f)], cache_dir=cache)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
    else:
        _report({"eval": metrics})


@reward_model_app.command("score")
def score_command(
    model: Path = typer.Argument(..., help="A folder written by `ipro reward-model train`."),
    videos: list[Path] = typer.Argument(..., help="Video files to score."),
    subject: list[Path] = typer.Option(..., "--subject", "-s", help="Subject image(s): photos of the people to keep (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines."),
    device: str = typer.Option("cpu"),
) -> None:
    """Identity-consistency score of each video against the subject image(s); higher is better.

    `score` is normalized by the training videos' scores (0 = their average)."""
    from ipro.rewards.learned import load_reward_model, score_files

    rm = load_reward_model(model, device=device)
    for video, raw in zip(videos, score_files(rm, videos, subject)):
        score = rm.normalization(raw)
        if as_json:
            typer.echo(json.dumps({"video": str(video), "score": round(score, 4), "raw": round(raw, 4)}))
        else:
            typer.echo(f"{score:+.3f}  {video}")
