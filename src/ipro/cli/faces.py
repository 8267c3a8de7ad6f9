"""`ipro faces`: what the face toolkit sees in your footage.

Users run this first on their own images and videos: which frames have faces, how
confident the detector is, and (with --compare) how similar the inputs' identities are
under the recognizer that rewards and metrics will use.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import typer

from ipro.cli.app import app
from ipro.data.video import read_media, to_tensor


def embed_media(embedder, path: Path, stride: int, max_frames: int | None, chunk: int = 32):
    """Detect and embed faces in one image or video; returns (frame indices, VideoFaces list)."""
    frames, _ = read_media(path, max_frames=None if max_frames is None else max_frames * stride)
    frames = frames[::stride][:max_frames]
    indices = list(range(0, len(frames) * stride, stride))
    results = []
    with torch.no_grad():
        for i in range(0, len(frames), chunk):
            video = to_tensor(frames[i : i + chunk])[None]
            results.append(embedder(video))
    return indices, results


def pooled_identity(results) -> torch.Tensor | None:
    """Mean of the largest face's embedding over the frames that have one."""
    picks = []
    for faces in results:
        area = (faces.boxes[:, 2] - faces.boxes[:, 0]) * (faces.boxes[:, 3] - faces.boxes[:, 1])
        for f in faces.frame.unique():
            idx = torch.nonzero(faces.frame == f).flatten()
            picks.append(faces.embeddings[idx[area[idx].argmax()]])
    if not picks:
        return None
    return torch.nn.functional.normalize(torch.stack(picks).mean(0), dim=0)


@app.command("faces")
def faces_command(
    paths: list[Path] = typer.Argument(..., help="Images (png, jpg, ...) or videos (mp4, mov, avi, mkv, webm)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    compare: bool = typer.Option(
        False, "--compare", help="Also print the identity similarity (cosine) between inputs, each input's faces mean-pooled."
    ),
    recognizer: str = typer.Option("dlib", help="'dlib' (default, shipped) or 'arcface:/path/to/backbone.pth'."),
    stride: int = typer.Option(1, min=1, help="Look at every N-th video frame."),
    max_frames: int = typer.Option(300, min=1, help="At most this many frames per video (after the stride)."),
    min_score: float = typer.Option(0.9, min=0.0, max=1.0, help="Drop detections below this confidence."),
    min_face_size: int = typer.Option(20, min=8, help="Smallest face (pixels) the detector looks for."),
) -> None:
    """Detect faces per frame and, with --compare, compare identities across inputs.

    JSON output is a list with one object per input:
    {"path", "frames": [{"index", "faces": [{"box": [x1,y1,x2,y2], "score", "landmarks": [[x,y] x5]}]}]}.
    With --compare it is {"inputs": <that list>, "similarity": <N x N matrix in input order>}, where an
    input without faces has null similarities. For --compare, each frame contributes its largest face.
    """
    from rich.console import Console
    from rich.table import Table

    from ipro.faces.embedder import FaceEmbedder

    embedder = FaceEmbedder(recognizer=recognizer, min_score=min_score, min_face_size=min_face_size)
    records, identities = [], []
    for path in paths:
        indices, results = embed_media(embedder, path, stride, max_frames)
        frames = [rec for faces in results for rec in faces.to_records()[0]]
        records.append(
            {"path": str(path), "frames": [{"index": i, "faces": faces} for i, faces in zip(indices, frames)]}
        )
        identities.append(pooled_identity(results) if compare else None)

    similarity = None
    if compare:
        similarity = [
            [None if a is None or b is None else round(float(a @ b), 4) for b in identities] for a in identities
        ]
    if as_json:
        typer.echo(json.dumps({"inputs": records, "similarity": similarity} if compare else records, indent=1))
        return

    console = Console()
    table = Table(title=f"faces ({embedder.recognizer.name}, min score {min_score})")
    for col in ("input", "frames", "with face", "faces", "mean score", "largest face (px)"):
        table.add_column(col)
    for rec in records:
        faces = [face for fr in rec["frames"] for face in fr["faces"]]
        with_face = sum(1 for fr in rec["frames"] if fr["faces"])
        sizes = [max(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]) for f in faces]
        table.add_row(
            Path(rec["path"]).name, str(len(rec["frames"])), f"{with_face} ({100 * with_face / max(1, len(rec['frames'])):.0f}%)",
            str(len(faces)), f"{np.mean([f['score'] for f in faces]):.3f}" if faces else "-",
            f"{max(sizes):.0f}" if sizes else "-",
        )
    console.print(table)
    if similarity is not None:
        sim = Table(title="identity similarity (cosine)")
        sim.add_column("")
        for i in range(len(paths)):
            sim.add_column(str(i))
        for i, (path, row) in enumerate(zip(paths, similarity)):
            sim.add_row(f"{i}: {path.name}", *["-" if v is None else f"{v:.3f}" for v in row])
        console.print(sim)
