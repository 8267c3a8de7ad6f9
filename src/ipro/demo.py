"""`ipro demo`: the whole loop on a CPU, on real footage, with the embedded base model.

1. Footage: carphone frames 0-79 become the training video; held-out inputs are
   carphone clips from frames 80+ (with their ground truth) and the astronaut (a person
   neither model saw). The base model was trained on the same split.
2. `ipro prepare` curates the training video into clips with face pools.
3. The base model generates the held-out videos; `ipro eval` scores them, and scores
   the ground-truth clips too: their FaceSim to their own first frame is the ceiling.
4. IPRO fine-tunes the base model (configs/tiny-cpu-ipro.yaml), and so do the paper's
   two ablations: KL off, and `input_face` mode instead of the face pool.
5. Each run generates and is scored again; demo_report.html puts the table (FaceSim,
   share of the gap to the ceiling closed, flicker, dynamic degree, rigid-face rate),
   the videos side by side and the reward and KL curves together.

Everything is seeded; the same command gives the same numbers on the same machine.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ipro.data.video import atomic_path, read_video, write_image, write_video

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CARPHONE_TRAIN_FRAMES = 80  # frames 0..79 train (the base model saw them too), 80.. are held out
HELDOUT_STARTS = (80, 88, 96, 103)  # carphone clips taken every other frame from here
FRAME_STEP = 2  # carphone is 30 fps; every other frame is close to the 16 fps Wan uses
HEIGHT, WIDTH, NUM_FRAMES = 128, 160, 9  # 9 frames: all four held-out starts fit in carphone
# Each held-out input is animated with three noise seeds (15 videos): with one video per
# input the binary rates (dynamic degree, rigid) moved in steps of 0.2.
SEEDS = (0, 1, 2)


def _config_path(name: str) -> Path:
    """configs/ next to the source tree, or shipped inside the package."""
    for root in (REPO_CONFIGS, Path(__file__).resolve().parent / "assets" / "configs"):
        if (root / name).is_file():
            return root / name
    from ipro.errors import IproError

    raise IproError(f"{name}: preset not found next to the package; reinstall ipro from its source tree")


def _fit(frames: np.ndarray) -> np.ndarray:
    """Resize (F, H, W, 3) uint8 to the demo size, keeping the aspect by centre cropping."""
    t = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    h, w = t.shape[-2:]
    scale = max(HEIGHT / h, WIDTH / w)
    t = torch.nn.functional.interpolate(t, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True, align_corners=False)
    top, left = (t.shape[-2] - HEIGHT) // 2, (t.shape[-1] - WIDTH) // 2
    t = t[..., top : top + HEIGHT, left : left + WIDTH]
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def seeded(name: str, seed: int) -> str:
    """The held-out item name of one input animated with one seed."""
    return f"{name}_s{seed}"


def seed_of(stem: str) -> int:
    return int(stem.rsplit("_s", 1)[1])


def write_footage(root: Path) -> tuple[Path, Path]:
    """The training video and the held-out items: one per input and seed, each an input
    image (name_sSEED.png) and, for carphone, its ground-truth clip (name_sSEED.mp4)."""
    from ipro.data.footage import astronaut, carphone

    video = carphone()
    train, heldout = root / "train", root / "heldout"
    if not (train / "carphone_train.mp4").is_file():
        write_video(train / "carphone_train.mp4", video[:CARPHONE_TRAIN_FRAMES], fps=30)
        (train / "carphone_train.txt").write_text("a man talking on a phone in a car")
    inputs = {"astronaut": (_fit(astronaut()[None])[0], None)}
    for start in HELDOUT_STARTS:
        clip = _fit(video[start : start + FRAME_STEP * NUM_FRAMES : FRAME_STEP][:NUM_FRAMES])
        if len(clip) == NUM_FRAMES:
            inputs[f"carphone_{start}"] = (clip[0], clip)
    for name, (image, clip) in inputs.items():
        for seed in SEEDS:
            item = heldout / seeded(name, seed)
            if clip is not None and not item.with_suffix(".mp4").is_file():
                write_video(item.with_suffix(".mp4"), clip, fps=16)
            if not item.with_suffix(".png").is_file():
                write_image(item.with_suffix(".png"), image)
    return train, heldout


def generate(model_path: Path, lora: Path | None, inputs: Path, out: Path, steps: int) -> Path:
    """One video per held-out item (name_sSEED.png, animated with SEED), written as name_sSEED.mp4;
    videos already there are kept, so a rerun resumes."""
    from ipro.generate import generate as generate_videos
    from ipro.models import load_model

    images = sorted(inputs.glob("*.png"))
    if all((out / f"{p.stem}.mp4").is_file() for p in images):
        return out
    generate_videos(
        load_model(model_path, lora=lora), images, out, prompts="a person talking", seeds=[seed_of(p.stem) for p in images],
        num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH, steps=steps, fps=16, overwrite=False,
        metadata={"model": str(model_path), "lora": str(lora) if lora else None},
    )
    return out


def train_run(model_path: Path, data: Path, out: Path, steps: int, overrides: dict) -> Path:
    """Fine-tune with the CPU preset; resumes if a checkpoint of this run exists."""
    from ipro.train.config import load_config
    from ipro.train.methods import trainer_class

    base = {"model.path": str(model_path), "data.dataset": str(data), "run.output_dir": str(out),
            "optim.steps": steps, "run.checkpoint_every": max(1, steps // 2), "run.log_with": ["tensorboard"]}
    cfg = load_config(_config_path("tiny-cpu-ipro.yaml"), {**base, **overrides})
    lora = out / f"checkpoint-{steps}" / "lora"
    if not lora.is_dir():
        trainer_class(cfg.method)(cfg).train(resume=True)
    return lora


def gap_closed(base: float, tuned: float, ceiling: float) -> float:
    """Share of the distance from the base model's FaceSim to the ceiling that tuning closed."""
    return (tuned - base) / (ceiling - base) if ceiling > base else float("nan")


def summarize(runs: dict[str, dict], ceiling: dict) -> list[dict]:
    """Table rows; FaceSim over the carphone inputs (those with a ceiling) and the astronaut."""
    from ipro.eval.stats import bootstrap_mean

    def per_video(result, key, names=None):
        return [v["metrics"][key] for v in result["videos"] if (names is None or v["name"] in names) and v["metrics"][key] is not None]

    def mean(xs):
        return float(np.mean(xs)) if xs else float("nan")

    with_gt = {v["name"] for v in ceiling["videos"]}
    ceil = mean(per_video(ceiling, "face_sim"))
    base_fs = mean(per_video(runs["base"], "face_sim", with_gt))
    rows = []
    for name, result in runs.items():
        fs = per_video(result, "face_sim", with_gt)
        ci = bootstrap_mean(fs)
        fs_mean, lo, hi = (ci["mean"], ci["ci_low"], ci["ci_high"]) if fs else (float("nan"), None, None)
        astro = per_video(result, "face_sim", {seeded("astronaut", s) for s in SEEDS})
        agg = result["aggregate"]
        rows.append({
            "run": name,
            "face_sim": fs_mean, "face_sim_ci": [lo, hi],
            "gap_closed": gap_closed(base_fs, fs_mean, ceil) if name != "base" else 0.0,
            "relative_change": (fs_mean - base_fs) / base_fs if name != "base" else 0.0,
            "face_sim_astronaut": mean(astro) if astro else None,
            "temporal_flickering": agg["temporal_flickering"]["mean"],
            "dynamic_degree": agg["dynamic_degree"]["mean"],
            "motion_px": agg["motion_px"]["mean"],
            "rigid": agg["rigid"]["mean"],
            "face_coverage": agg["face_coverage"]["mean"],
        })
    rows.append({"run": "ground truth (ceiling)", "face_sim": ceil, "face_sim_ci": [None, None], "gap_closed": 1.0,
                 "relative_change": (ceil - base_fs) / base_fs, "face_sim_astronaut": None,
                 "temporal_flickering": ceiling["aggregate"]["temporal_flickering"]["mean"],
                 "dynamic_degree": ceiling["aggregate"]["dynamic_degree"]["mean"],
                 "motion_px": ceiling["aggregate"]["motion_px"]["mean"], "rigid": ceiling["aggregate"]["rigid"]["mean"],
                 "face_coverage": ceiling["aggregate"]["face_coverage"]["mean"]})
    return rows


def _fmt(v, pct=False) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{100 * v:+.1f}%" if pct else f"{v:.4f}"


def table_text(rows: list[dict]) -> str:
    head = "| run | FaceSim (carphone held-out) | gap closed | rel. change | FaceSim astronaut | flicker | dynamic degree | rigid rate |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['run']} | {_fmt(r['face_sim'])} | {_fmt(r['gap_closed'], True)} | {_fmt(r['relative_change'], True)} | "
                     f"{_fmt(r['face_sim_astronaut'])} | {_fmt(r['temporal_flickering'])} | {_fmt(r['dynamic_degree'])} | {_fmt(r['rigid'])} |")
    return "\n".join(lines)


def _strip(videos: list[Path], out: Path, frames=(0, 2, 4, 6, 8)) -> None:
    """One PNG: a row per video (GT, base, IPRO, ...), the chosen frames side by side."""
    rows = []
    for v in videos:
        clip, _ = read_video(v)
        idx = [min(i, len(clip) - 1) for i in frames]
        rows.append(np.concatenate([clip[i] for i in idx], axis=1))
    write_image(out, np.concatenate(rows, axis=0))


def _curves(run_dirs: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, d in run_dirs.items():
        by_step = {}
        for line in (d / "logs.jsonl").read_text().splitlines():
            rec = json.loads(line)
            by_step[rec["step"]] = rec  # a resumed run logs some steps twice: keep the last
        steps = sorted(by_step)
        for ax, key in zip(axes, ("reward_raw", "kl")):
            ax.plot(steps, [by_step[s].get(key, float("nan")) for s in steps], label=name)
            ax.set_title({"reward_raw": "face reward (raw cosine)", "kl": "multi-step KL"}[key])
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_demo_report(out: Path, rows: list[dict], heldout: Path, videos: dict[str, Path], run_dirs: dict[str, Path]) -> Path:
    (out / "report").mkdir(parents=True, exist_ok=True)
    _curves(run_dirs, out / "report" / "curves.png")
    strips = []
    for gt in sorted(heldout.glob(f"*_s{SEEDS[0]}.png")):  # one strip per input: its first seed
        name = gt.stem
        seq = ([heldout / f"{name}.mp4"] if (heldout / f"{name}.mp4").is_file() else []) + [videos[k] / f"{name}.mp4" for k in videos]
        _strip(seq, out / "report" / f"{name}.png")
        labels = (["ground truth"] if len(seq) > len(videos) else []) + list(videos)
        strips.append((name, labels))
    body = [f"<h1>ipro demo</h1><p>{html.escape(time.strftime('%Y-%m-%d %H:%M'))}. FaceSim: dlib recognizer cosine "
            "(not comparable with ArcFace numbers). Gap closed = (run - base) / (ground truth - base).</p>",
            "<table border=1 cellpadding=4><tr>" + "".join(f"<th>{h}</th>" for h in
            ("run", "FaceSim", "95% CI", "gap closed", "rel. change", "FaceSim astronaut", "flicker", "dynamic degree", "rigid rate", "coverage")) + "</tr>"]
    for r in rows:
        ci = r["face_sim_ci"]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
            html.escape(r["run"]), _fmt(r["face_sim"]), "-" if ci[0] is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]",
            _fmt(r["gap_closed"], True), _fmt(r["relative_change"], True), _fmt(r["face_sim_astronaut"]),
            _fmt(r["temporal_flickering"]), _fmt(r["dynamic_degree"]), _fmt(r["rigid"]), _fmt(r["face_coverage"]))) + "</tr>")
    body.append("</table><h2>Reward and KL during training</h2><img src='report/curves.png'>")
    body.append(f"<h2>Held-out videos, seed {SEEDS[0]} (frames 0, 2, 4, 6, 8)</h2>")
    for name, labels in strips:
        body.append(f"<h3>{html.escape(name)}</h3><p>rows: {html.escape(', '.join(labels))}</p><img src='report/{name}.png'>")
    page = "<!doctype html><meta charset=utf-8><title>ipro demo</title><body style='font-family:sans-serif'>" + "\n".join(body) + "</body>"
    with atomic_path(out / "demo_report.html") as tmp:
        tmp.write_text(page)
    return out / "demo_report.html"


def run_demo(out: str | Path, steps: int = 60, sample_steps: int = 4, ablations: bool = True, model: str | Path | None = None, log=print) -> dict:
    from ipro.data.prepare import load_config as prepare_config
    from ipro.data.prepare import prepare
    from ipro.eval import Evaluator, evaluate
    from ipro.models import resolve_model_path

    out = Path(out)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model_path = resolve_model_path(str(model or "builtin"), out)
    log("1/5 footage and curation")
    train_dir, heldout = write_footage(out / "footage")
    prepare(train_dir, out / "data", prepare_config(_config_path("prepare-tiny.yaml")))
    evaluator = Evaluator()
    log("2/5 base model on the held-out inputs")
    videos = {"base": generate(model_path, None, heldout, out / "videos" / "base", sample_steps)}
    results = {"base": evaluate(videos["base"], heldout, out / "eval" / "base", evaluator=evaluator)}
    gt_videos = out / "videos" / "ground-truth"
    gt_videos.mkdir(parents=True, exist_ok=True)
    for clip in heldout.glob("*.mp4"):
        shutil.copy(clip, gt_videos / clip.name)
    ceiling = evaluate(gt_videos, heldout, out / "eval" / "ground-truth", evaluator=evaluator)
    variants = {"ipro": {}}
    if ablations:
        variants.update({"ipro, KL off": {"kl.weight": 0.0}, "ipro, input_face mode": {"reward.mode": "input_face"}})
    run_dirs = {}
    for i, (name, overrides) in enumerate(variants.items()):
        slug = name.replace("ipro, ", "").replace(" ", "-").lower()
        log(f"3/5 training: {name} ({steps} steps)")
        run_dirs[name] = out / "runs" / slug
        lora = train_run(model_path, out / "data", run_dirs[name], steps, overrides)
        log(f"4/5 {name} on the held-out inputs")
        videos[name] = generate(model_path, lora, heldout, out / "videos" / slug, sample_steps)
        results[name] = evaluate(videos[name], heldout, out / "eval" / slug, evaluator=evaluator, baselines=[out / "eval" / "base"])
    log("5/5 report")
    rows = summarize(results, ceiling)
    report = write_demo_report(out, rows, heldout, videos, run_dirs)
    summary = {"rows": rows, "report": str(report), "minutes": (time.perf_counter() - t0) / 60, "steps": steps, "recognizer": ceiling["recognizer"]}
    with atomic_path(out / "demo_summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    log(table_text(rows))
    log(f"report: {report}  ({summary['minutes']:.1f} min)")
    return summary
