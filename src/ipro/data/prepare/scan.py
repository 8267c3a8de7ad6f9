"""Inputs of `ipro prepare`: the files to read, their stable ids, shards and captions."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path

from ipro.data.video import is_image, is_video
from ipro.errors import IproError
from ipro.data.prepare.config import CAPTION_FILES


def stable_hash(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:15], 16)


def input_id(rel: str) -> str:
    """A readable, collision-free folder/file name for one input."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(rel).stem)[:40] or "input"
    return f"{stem}-{stable_hash(rel):015x}"[: len(stem) + 9]


def list_inputs(input_dir: Path, exclude: Path | None = None) -> tuple[list[str], list[str]]:
    """(media files, other files) as sorted POSIX paths relative to input_dir.

    Hidden files, caption sidecars (.txt) and the root caption files are neither.
    """
    media, other = [], []
    for root, dirs, files in os.walk(input_dir):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (exclude is None or (root_path / d).resolve() != exclude))
        for name in sorted(files):
            rel = (root_path / name).relative_to(input_dir).as_posix()
            if name.startswith(".") or name.lower().endswith(".txt") or rel in CAPTION_FILES:
                continue
            (media if is_video(name) or is_image(name) else other).append(rel)
    return sorted(media), sorted(other)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise IproError(f"--shard: '{text}' is not I/N with 0 <= I < N; e.g. --shard 0/4")
    return int(m[1]), int(m[2])


def in_shard(rel: str, shard: tuple[int, int] | None) -> bool:
    return shard is None or stable_hash(rel) % shard[1] == shard[0]


def load_captions(input_dir: Path) -> dict[str, str]:
    """Root caption map: relative path or stem -> caption, from captions.jsonl or captions.csv.

    jsonl lines: {"file": "clips/a.mp4", "caption": "..."} ("path"/"video"/"name" and
    "text"/"prompt" are accepted too). csv: a header with file and caption columns.
    """
    captions: dict[str, str] = {}
    file_keys, text_keys = ("file", "path", "video", "name"), ("caption", "text", "prompt")

    def add(row: dict, where: str) -> None:
        key = next((row[k] for k in file_keys if row.get(k)), None)
        text = next((row[k] for k in text_keys if k in row), None)
        if not isinstance(key, str) or not isinstance(text, str):
            raise IproError(f"{where}: needs a file key ({'/'.join(file_keys)}) and a caption ({'/'.join(text_keys)}) string")
        captions[Path(key).as_posix()] = text

    jsonl = input_dir / "captions.jsonl"
    if jsonl.is_file():
        for i, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise IproError(f"{jsonl}:{i}: not JSON ({e.msg}); write one object per line") from None
                add(row if isinstance(row, dict) else {}, f"{jsonl}:{i}")
    table = input_dir / "captions.csv"
    if table.is_file():
        with table.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
            for i, row in enumerate(csv.DictReader(f), 2):
                add(row, f"{table}:{i}")
    return captions


def caption_for(input_dir: Path, rel: str, captions: dict[str, str], default: str) -> str:
    """Sidecar `<stem>.txt` first, then the root map by relative path, then by stem."""
    sidecar = (input_dir / rel).with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8").strip()
    return captions.get(rel, captions.get(Path(rel).stem, default))
