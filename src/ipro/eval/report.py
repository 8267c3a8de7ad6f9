"""report.html: a self-contained page next to metrics.json.

The first run's videos are shown beside their inputs (input image, a strip of frames
as PNG, and the mp4 itself in a <video> tag by relative path); every metric gets a
matplotlib chart of the per-video values with the mean and its 95% interval, one
column per run, so several runs read as a comparison. Files are written atomically.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np

from ipro.data.video import atomic_path, read_image, read_video, write_image
from ipro.eval.metrics import METRICS

ASSETS = "report_files"


def _fmt(value, rate: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if rate else f"{value:.4f}"


def _video_cell(metric, value) -> str:
    """Per video, rigid and dynamic are yes/no; other rates are fractions of frames."""
    if value is not None and metric.key in ("rigid", "dynamic_degree"):
        return "yes" if value else "no"
    return _fmt(value, metric.rate)


def _chart(path: Path, metric, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.4, 2.6), dpi=100)
    rng = np.random.default_rng(0)
    for i, run in enumerate(runs):
        values = [v["metrics"].get(metric.key) for v in run["videos"]]
        values = np.array([v for v in values if v is not None], dtype=float)
        if values.size:
            ax.scatter(i + rng.uniform(-0.15, 0.15, values.size), values, s=8, alpha=0.4, color="tab:blue")
        agg = run["aggregate"].get(metric.key, {})
        if agg.get("mean") is not None:
            err = [[max(0.0, agg["mean"] - agg["ci_low"])], [max(0.0, agg["ci_high"] - agg["mean"])]]
            ax.errorbar(i, agg["mean"], yerr=err, fmt="o", color="tab:red", capsize=4, zorder=3)
    arrow = {True: " (higher is better)", False: " (lower is better)", None: ""}[metric.higher_is_better]
    ax.set_title(metric.label + arrow, fontsize=9)
    ax.set_xticks(range(len(runs)), [r.get("name", f"run {i}") for i, r in enumerate(runs)], fontsize=7, rotation=15)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlim(-0.6, len(runs) - 0.4)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _thumb(image: np.ndarray, height: int = 96) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((max(1, round(w * height / h)), height), Image.BILINEAR))


def _strip(video: Path, num_frames: int, count: int = 6) -> np.ndarray:
    """`count` evenly spaced frames among the `num_frames` that were evaluated."""
    frames, _ = read_video(video, max_frames=num_frames)
    idx = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    return np.concatenate([_thumb(frames[i], height=72) for i in idx], axis=1)


def _input_image(record: dict) -> np.ndarray | None:
    """The input image, or the GT clip's first frame; None when neither file is there
    (a run compared later, after its inputs moved)."""
    if record.get("input_image") and Path(record["input_image"]).is_file():
        return read_image(record["input_image"])
    if record.get("gt") and Path(record["gt"]).is_file():
        return read_video(record["gt"], max_frames=1)[0][0]
    return None


def write_report(out: Path, runs: list[dict]) -> Path:
    """Write out/report.html (and out/report_files/*.png) for runs[0], comparing all runs."""
    out = Path(out)
    assets = out / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    main = runs[0]
    shown = [m for m in METRICS if any(r["aggregate"].get(m.key, {}).get("mean") is not None for r in runs)]
    for m in shown:
        _chart(assets / f"chart_{m.key}.png", m, runs)

    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ipro eval: " + e(main.get("name", "")) + "</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:right}"
        "th{background:#f3f3f3}td.l{text-align:left}.charts img{margin:4px;border:1px solid #eee}"
        "video,img.media{height:96px;vertical-align:middle}img.strip{height:72px}</style></head><body>",
        f"<h1>ipro eval: {e(main.get('name', ''))}</h1>",
        f"<p>{len(main['videos'])} videos from <code>{e(main['videos_dir'])}</code>, inputs <code>{e(main['inputs'])}</code>. "
        f"Face recognizer: <b>{e(main['recognizer'])}</b> (same-person cosine {main['same_person_threshold']}); "
        "FaceSim values are on this recognizer's scale, not comparable with ArcFace numbers. "
        f"A video is rigid when its main face's expression motion &lt; {main['rigid_thresholds']['expression_motion']} "
        f"and appearance change &lt; {main['rigid_thresholds']['appearance_change']}.</p>",
    ]
    if main["not_computed"]:
        parts.append("<p>Not computed:</p><ul>")
        parts += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in main["not_computed"].items()]
        parts.append("</ul>")

    # Aggregate table: rows = runs, columns = metrics (Table 1 of the paper).
    parts.append("<h2>Summary (mean [95% CI])</h2><table><tr><th>run</th>")
    parts += [f"<th title='{e(m.about)}'>{e(m.label)}</th>" for m in shown]
    parts.append("</tr>")
    for run in runs:
        parts.append(f"<tr><td class='l'>{e(run.get('name', ''))}</td>")
        for m in shown:
            a = run["aggregate"].get(m.key, {})
            ci = f"<br><small>[{_fmt(a['ci_low'], m.rate)}, {_fmt(a['ci_high'], m.rate)}]</small>" if a.get("mean") is not None else ""
            parts.append(f"<td>{_fmt(a.get('mean'), m.rate)}{ci}</td>")
        parts.append("</tr>")
    parts.append("</table>")

    parts.append("<h2>Charts</h2><div class='charts'>")
    parts += [f"<img src='{ASSETS}/chart_{m.key}.png' alt='{e(m.label)}' title='{e(m.about)}'>" for m in shown]
    parts.append("</div>")

    parts.append("<h2>Videos</h2><table><tr><th>name</th><th>input</th><th>frames</th><th>video</th>")
    per_video = [m for m in shown if m.key in main["aggregate"]]
    parts += [f"<th>{e(m.label)}</th>" for m in per_video]
    parts.append("</tr>")
    for i, rec in enumerate(main["videos"]):
        image = _input_image(rec)
        cells = [f"<td class='l'>{e(rec['name'])}</td>"]
        if image is not None:
            write_image(assets / f"input_{i:04d}.png", _thumb(image))
            cells.append(f"<td><img class='media' src='{ASSETS}/input_{i:04d}.png' alt='input'></td>")
        else:
            cells.append("<td>-</td>")
        if Path(rec["video"]).is_file():
            write_image(assets / f"frames_{i:04d}.png", _strip(Path(rec["video"]), rec["num_frames"]))
            cells.append(f"<td><img class='strip' src='{ASSETS}/frames_{i:04d}.png' alt='frames'></td>")
        else:
            cells.append("<td>(video moved)</td>")
        src = Path(os.path.relpath(Path(rec["video"]).resolve(), out.resolve())).as_posix()
        cells.append(f"<td><video src='{e(src)}' controls muted loop preload='metadata'></video></td>")
        cells += [f"<td>{_video_cell(m, rec['metrics'].get(m.key))}</td>" for m in per_video]
        parts.append("<tr>" + "".join(cells) + "</tr>")
        notes = "; ".join(rec["details"].get("notes", []))
        if notes:
            parts.append(f"<tr><td colspan='99' class='l'><small>{e(notes)}</small></td></tr>")
    parts.append("</table>")
    parts.append("<h2>Definitions</h2><ul>" + "".join(f"<li><b>{e(m.label)}</b>: {e(m.about)}</li>" for m in shown) + "</ul>")
    parts.append("</body></html>")

    with atomic_path(out / "report.html") as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return out / "report.html"
