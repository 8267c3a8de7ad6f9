"""One input of `ipro prepare`: decode, cut clips, find faces, filter, and write the kept
clips with their face pools and the input's record (atomically, record last)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ipro.data.video import atomic_path, is_image, iter_video, probe_video, read_image, write_image, write_video
from ipro.errors import IproError
from ipro.data.prepare.config import FILTERS, PrepareConfig, load_callable
from ipro.data.prepare.detect import ClipFaces, Crop, find_faces
from ipro.data.prepare.scan import caption_for, input_id
from ipro.data.prepare.select import call_vlm, run_filters


class Worker:
    """Everything needed to process inputs; one per process (builds its own models)."""

    def __init__(self, input_dir: Path, out_dir: Path, config: PrepareConfig, captions: dict[str, str]) -> None:
        from ipro.faces.embedder import FaceEmbedder

        self.input_dir, self.out_dir, self.config, self.captions = input_dir, out_dir, config, captions
        self.embedder = FaceEmbedder(
            recognizer=config.recognizer, min_score=config.detect_min_score, max_faces=config.max_faces_per_frame,
            detect_max_side=config.detect_max_side, min_face_size=config.detector_min_face_size,
        )
        self.vlm = load_callable(config.vlm_filter) if config.vlm_filter else None
        from ipro.faces.thresholds import same_person_threshold

        given = config.identity_threshold
        self.identity_threshold = given if given is not None else same_person_threshold(self.embedder.recognizer.name)

    def process(self, rel: str) -> dict:
        """Process one input, write its files and its record; return the record."""
        iid = input_id(rel)
        item_dir = self.out_dir / "items" / iid
        shutil.rmtree(item_dir, ignore_errors=True)  # leftovers of a killed run
        record = {"source": rel, "input_id": iid, "status": "ok", "reason": "", "notes": [], "rows": []}
        try:
            record["rows"] = list(self._clips(rel, iid, record["notes"]))
        except IproError as e:
            record.update(status="failed", reason=str(e).replace(str(self.input_dir / rel), rel), rows=[])
        except Exception as e:  # an odd input must not stop the run; the summary lists it
            record.update(status="failed", reason=f"{rel}: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}", rows=[])
        if record["status"] == "failed":
            shutil.rmtree(item_dir, ignore_errors=True)
        write_json(self.out_dir / "records" / f"{iid}.json", record)
        return record

    def _clips(self, rel: str, iid: str, notes: list[str]):
        config, path = self.config, self.input_dir / rel
        caption = caption_for(self.input_dir, rel, self.captions, config.default_caption)
        if is_image(rel):
            image = read_image(path)
            self._check_size(rel, image.shape[0], image.shape[1])
            yield self._clip(rel, iid, 0, image[None], 0.0, caption, is_still=True)
            return
        info = probe_video(path)
        self._check_size(rel, info.height, info.width)
        if info.truncated:
            notes.append(f"file is cut short: {info.duration_s:.1f} s readable; kept the readable part")
        if info.variable_fps:
            notes.append("variable frame rate: resampled by timestamps")
        if info.pix_fmt not in ("yuv420p", "yuvj420p"):
            notes.append(f"pixel format {info.pix_fmt} converted to RGB")
        step = round(config.stride_s * config.fps) if config.stride_s else config.frames
        buffer: list[np.ndarray] = []
        index = clip_index = 0
        for frame in iter_video(path, fps=config.fps):
            if index % step < config.frames:
                buffer.append(frame)
            index += 1
            if len(buffer) == config.frames:
                yield self._clip(rel, iid, clip_index, np.stack(buffer), (index - config.frames) / config.fps, caption)
                buffer, clip_index = [], clip_index + 1
                if config.max_clips_per_video and clip_index >= config.max_clips_per_video:
                    return
        if index < 0.9 * info.duration_s * config.fps:
            stopped = f"decoding stopped at {index / config.fps:.1f} s of {info.duration_s:.1f} s"
            notes.append(f"corrupt data: {stopped}; kept the decodable part")
        if clip_index == 0:  # too short for one clip: say so in the manifest
            yield self._clip(rel, iid, 0, np.stack(buffer), 0.0, caption)

    def _check_size(self, rel: str, h: int, w: int) -> None:
        if h * w > self.config.max_source_pixels:
            limit = self.config.max_source_pixels
            raise IproError(f"{rel}: {w}x{h} is larger than max_source_pixels={limit}; downscale it or raise the limit")
        if min(h, w) < 16:
            raise IproError(f"{rel}: {w}x{h} is too small to hold a face; remove it")

    def _clip(self, rel: str, iid: str, k: int, frames: np.ndarray, start_s: float, caption: str, is_still: bool = False) -> dict:
        config = self.config
        num_frames, src_h, src_w = frames.shape[:3]
        crop = Crop.center(src_h, src_w, config.height, config.width)
        too_short = not is_still and num_frames < config.frames
        faces = ClipFaces.empty() if too_short else find_faces(self.embedder, frames, config.batch_frames)
        faces = faces.select(crop.inside(faces.boxes))
        identity = self._identities(faces)
        people = int(identity.max()) + 1 if len(identity) else 0
        verdict, reason, stats = run_filters(config, faces, num_frames, people, is_still)
        if self.vlm is not None and not any(v is False for v in verdict.values()):
            verdict["vlm"], reason["vlm"] = call_vlm(self.vlm, frames, faces, config.vlm_filter)
        kept = not any(v is False for v in verdict.values())

        clip_id = f"{iid}-{k:03d}"
        row = {
            "id": clip_id, "source": rel, "input_id": iid, "clip_index": k, "is_still": is_still,
            "start_s": start_s, "end_s": start_s + (0.0 if is_still else num_frames / config.fps),
            "fps": None if is_still else config.fps, "num_frames": int(num_frames),
            "source_width": int(src_w), "source_height": int(src_h), "width": config.width, "height": config.height,
            "caption": caption, **stats, "kept": kept,
            "reason": "; ".join(f"{n}: {reason[n]}" for n in FILTERS if verdict[n] is False),
            **{f"pass_{n}": verdict[n] for n in FILTERS}, **{f"reason_{n}": reason[n] for n in FILTERS},
            "first_frame": None, "clip": None, "pool": None,
        }
        if kept:
            row.update(self._write_item(iid, k, frames, crop, faces, identity, is_still))
        return row

    def _identities(self, faces: ClipFaces) -> np.ndarray:
        """Person id per face; people never share a frame with themselves."""
        import torch

        from ipro.faces.identity import cluster_identities

        if not len(faces.frame):
            return np.zeros(0, np.int64)
        ids = cluster_identities(torch.from_numpy(faces.embeddings), torch.from_numpy(faces.frame), self.identity_threshold)
        return ids.numpy()

    def _write_item(self, iid: str, k: int, frames: np.ndarray, crop: Crop, faces: ClipFaces, identity: np.ndarray,
                    is_still: bool) -> dict:
        import torch

        from ipro.data.pool import FacePool, save_pool

        rel_dir = Path("items") / iid
        paths = {"first_frame": (rel_dir / f"{k:03d}.png").as_posix(), "pool": (rel_dir / f"{k:03d}.pool.safetensors").as_posix()}
        clip = crop.apply(frames if not is_still else frames[:1])
        write_image(self.out_dir / paths["first_frame"], clip[0])
        if not is_still:
            paths["clip"] = (rel_dir / f"{k:03d}.mp4").as_posix()
            write_video(self.out_dir / paths["clip"], clip, fps=self.config.fps, crf=self.config.crf)
        pool = FacePool(
            embeddings=torch.from_numpy(faces.embeddings), frame=torch.from_numpy(faces.frame),
            identity=torch.from_numpy(identity),
            boxes=torch.from_numpy(crop.points(faces.boxes.reshape(-1, 2, 2)).reshape(-1, 4).astype(np.float32)),
            landmarks=torch.from_numpy(crop.points(faces.landmarks).astype(np.float32)),
            scores=torch.from_numpy(faces.scores), recognizer=self.embedder.recognizer.name, num_frames=len(frames),
        )
        save_pool(self.out_dir / paths["pool"], pool)
        return paths


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
