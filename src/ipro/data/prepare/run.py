"""Running `ipro prepare` over a folder: workers, resume from records, the manifest and
summary rebuilt from all records, and merging shards."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from ipro.data.video import atomic_path, is_image
from ipro.errors import IproError
from ipro.data.prepare.config import FILTERS, PrepareConfig
from ipro.data.prepare.scan import in_shard, input_id, list_inputs, load_captions
from ipro.data.prepare.worker import Worker, write_json


def _manifest_schema():
    import pyarrow as pa

    fields = [
        ("id", pa.string()), ("source", pa.string()), ("input_id", pa.string()), ("clip_index", pa.int32()),
        ("is_still", pa.bool_()), ("start_s", pa.float64()), ("end_s", pa.float64()), ("fps", pa.float64()),
        ("num_frames", pa.int32()), ("source_width", pa.int32()), ("source_height", pa.int32()),
        ("width", pa.int32()), ("height", pa.int32()), ("caption", pa.string()), ("people", pa.int32()),
        ("coverage", pa.float64()), ("face_frames", pa.int32()), ("faces", pa.int32()),
        ("face_size_min", pa.float64()), ("face_size_median", pa.float64()), ("face_size_max", pa.float64()),
        ("score_mean", pa.float64()), ("suspect_fraction", pa.float64()), ("kept", pa.bool_()), ("reason", pa.string()),
        *[(f"pass_{n}", pa.bool_()) for n in FILTERS], *[(f"reason_{n}", pa.string()) for n in FILTERS],
        ("first_frame", pa.string()), ("clip", pa.string()), ("pool", pa.string()),
    ]
    return pa.schema(fields)


def record_paths(out_dir: Path) -> list[Path]:
    """Finished inputs (a killed run may leave hidden temp files beside them)."""
    return sorted(p for p in (out_dir / "records").glob("*.json") if not p.name.startswith("."))


def read_records(out_dir: Path) -> list[dict]:
    records = []
    for path in record_paths(out_dir):
        try:
            records.append(json.loads(path.read_text()))
        except (json.JSONDecodeError, OSError):
            continue  # cannot happen with atomic writes, but never let one file break the manifest
    return sorted(records, key=lambda r: r["source"])


def finalize(out_dir: Path) -> dict:
    """Rebuild manifest.parquet and summary.json from every record in out_dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = read_records(out_dir)
    schema = _manifest_schema()
    rows = [{name: row.get(name) for name in schema.names} for r in records for row in r["rows"]]
    with atomic_path(out_dir / "manifest.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    dropped = Counter(n for row in rows if not row["kept"] for n in FILTERS if row[f"pass_{n}"] is False)
    summary = {
        "inputs": sum(r["status"] != "skipped" for r in records),
        "clips": len(rows),
        "kept": sum(row["kept"] for row in rows),
        "dropped": sum(not row["kept"] for row in rows),
        "dropped_by_filter": dict(sorted(dropped.items())),
        "failed_files": [{"source": r["source"], "reason": r["reason"]} for r in records if r["status"] == "failed"],
        "skipped_files": [{"source": r["source"], "reason": r["reason"]} for r in records if r["status"] == "skipped"],
        "notes": [{"source": r["source"], "note": n} for r in records for n in r["notes"]],
    }
    write_json(out_dir / "summary.json", summary)
    return summary


def _check_config(out_dir: Path, config: PrepareConfig) -> None:
    """A resumed run must use the config that made the existing records."""
    path = out_dir / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(config.fingerprint()) if old.get(k) != config.fingerprint().get(k))
        if changed:
            raise IproError(
                f"{out_dir}: was prepared with different settings ({', '.join(changed)}); use a new OUT_DIR or the same config"
            )
    else:
        write_json(path, config.fingerprint())


_worker: Worker | None = None


def _init_worker(input_dir: Path, out_dir: Path, config: PrepareConfig, captions: dict[str, str]) -> None:
    import torch

    global _worker
    torch.set_num_threads(1)  # processes, not threads, give the parallelism
    _worker = Worker(input_dir, out_dir, config, captions)


def _process(rel: str) -> dict:
    assert _worker is not None
    return _worker.process(rel)


def prepare(
    input_dir: str | Path,
    out_dir: str | Path,
    config: PrepareConfig | None = None,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    progress: bool = False,
) -> dict:
    """Prepare (or resume preparing) a training set; returns the summary (also in summary.json)."""
    input_dir, out_dir = Path(input_dir).resolve(), Path(out_dir).resolve()
    config = config or PrepareConfig()
    if not input_dir.is_dir():
        raise IproError(f"{input_dir}: input folder not found; pass a folder of videos")
    if workers < 1:
        raise IproError(f"--workers: {workers} must be at least 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_config(out_dir, config)
    captions = load_captions(input_dir)
    media, other = list_inputs(input_dir, exclude=out_dir)
    if not config.stills:
        other = sorted(other + [rel for rel in media if is_image(rel)])
        media = [rel for rel in media if not is_image(rel)]
    done = {p.stem for p in record_paths(out_dir)}
    for rel in other:
        if in_shard(rel, shard) and input_id(rel) not in done:
            reason = f"{rel}: {'a still (stills: false)' if is_image(rel) else 'not a video or image'}; ignored"
            write_json(out_dir / "records" / f"{input_id(rel)}.json",
                       {"source": rel, "input_id": input_id(rel), "status": "skipped", "reason": reason, "notes": [], "rows": []})
    pending = [rel for rel in media if in_shard(rel, shard) and input_id(rel) not in done]

    with _progress(progress, len(pending)) as advance:
        if workers == 1 or len(pending) <= 1:
            worker = Worker(input_dir, out_dir, config, captions) if pending else None
            for rel in pending:
                advance(worker.process(rel))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor
            from concurrent.futures.process import BrokenProcessPool

            # spawn: forking a process that has run torch can deadlock in its thread pools
            try:
                with ProcessPoolExecutor(workers, mp.get_context("spawn"), initializer=_init_worker,
                                         initargs=(input_dir, out_dir, config, captions)) as pool:
                    for record in pool.map(_process, pending):
                        advance(record)
            except BrokenProcessPool:
                raise IproError(
                    f"{out_dir}: a worker process died (out of memory?); finished inputs are saved, "
                    "rerun the same command to resume, with fewer --workers"
                ) from None
    return finalize(out_dir)


class _progress:
    """A rich progress bar over inputs (or nothing); yields `advance(record)`."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda record: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from rich.console import Console

        self.bar = Progress(TextColumn("prepare"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.description}"), console=Console(stderr=True))
        self.bar.start()
        task = self.bar.add_task("", total=self.total)

        def advance(record: dict) -> None:
            kept = sum(r["kept"] for r in record["rows"])
            self.bar.update(task, advance=1, description=f"{record['source']}: {record['status']}, {kept}/{len(record['rows'])} kept")

        return advance

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()


def merge_prepared(sources: list[str | Path], dest: str | Path) -> dict:
    """Combine OUT_DIRs prepared separately (e.g. one per shard) into `dest`.

    Records and item files are hard-linked (copied across file systems); an input
    present in several sources is taken from the first. All sources must share a config.
    """
    dest = Path(dest)
    configs = []
    for src in map(Path, sources):
        if not (src / "config.json").is_file():
            raise IproError(f"{src}: not a prepared folder (no config.json); pass OUT_DIRs of `ipro prepare`")
        configs.append(json.loads((src / "config.json").read_text()))
    if any(c != configs[0] for c in configs):
        raise IproError("prepare-merge: the sources were prepared with different configs; merge only matching runs")
    if not configs:
        raise IproError("prepare-merge: pass at least one source folder")
    _check_config(dest, PrepareConfig(**configs[0]))
    done = {p.stem for p in record_paths(dest)}
    for src in map(Path, sources):
        for record_path in record_paths(src):
            if record_path.stem in done:
                continue
            item_dir = src / "items" / record_path.stem
            for f in sorted(item_dir.glob("*")) if item_dir.is_dir() else []:
                if not f.name.startswith("."):
                    _link(f, dest / "items" / record_path.stem / f.name)
            _link(record_path, dest / "records" / record_path.name)  # last: marks the input done
            done.add(record_path.stem)
    return finalize(dest)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
