"""`ipro plan`: predicted peak GPU memory of one training step, per phase, before any compute."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import typer

from ipro.cli.app import app
from ipro.errors import IproError

GB = 1e9


def parse_memory(text: str) -> int:
    """'80GB', '80G', '141 GiB', '80' (GB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not m:
        raise IproError(f"--gpu-memory {text!r}: expected a size such as 80GB, 141GiB or 24G")
    unit = m.group(2) or "gb"
    scale = {"gib": 2**30, "gb": 1e9, "g": 1e9, "mib": 2**20, "mb": 1e6, "m": 1e6}[unit]
    return int(float(m.group(1)) * scale)


def _even_frames(n: int) -> int:
    return max(5, (n - 1) // 8 * 4 + 1)  # about half, still 4k+1


def variants(cfg, plan) -> list[tuple[str, dict]]:
    """Knobs that lower memory for this config: (what to write, --set overrides)."""
    from ipro.models import FAMILIES

    out: list[tuple[str, dict]] = []
    m, d, s, r = cfg.model, cfg.data, cfg.sampler, cfg.reward
    if not m.gradient_checkpointing:
        out.append(("model.gradient_checkpointing=true", {"model.gradient_checkpointing": True}))
    if m.decode_tile is None and plan.family != "pixel-i2v":
        out.append(("model.decode_tile=256", {"model.decode_tile": 256}))
    if cfg.method == "ipro" and not m.offload_activations:  # keeps the method as it is: tried first
        out.append(("model.offload_activations=true", {"model.offload_activations": True}))
    if plan.family == "wan2.2-i2v-a14b" and not m.offload_frozen_expert:
        out.append(("model.offload_frozen_expert=true", {"model.offload_frozen_expert": True}))
    if cfg.method == "ipro" and (r.max_frames or d.num_frames) > 5:
        half = max(1, (r.max_frames or d.num_frames) // 2)
        out.append((f"reward.max_frames={half}", {"reward.max_frames": half}))
    if cfg.method == "ipro" and s.grad_steps > 1:
        out.append((f"sampler.grad_steps={s.grad_steps // 2}", {"sampler.grad_steps": s.grad_steps // 2}))
    if cfg.method == "grpo" and cfg.grpo.group_size > 2 and d.batch_size == 1:
        pass  # the group is the method; not a memory knob
    if d.num_frames > 9:
        f = _even_frames(d.num_frames)
        out.append((f"data.num_frames={f}", {"data.num_frames": f, **({"reward.max_frames": min(r.max_frames, f)} if r.max_frames else {})}))
    multiple = FAMILIES[plan.family].pixel_multiple() if plan.family in FAMILIES else 16
    h, w = max(multiple, d.height * 3 // 4 // multiple * multiple), max(multiple, d.width * 3 // 4 // multiple * multiple)
    if (h, w) != (d.height, d.width):
        out.append((f"data.height={h} data.width={w}", {"data.height": h, "data.width": w}))
    return out


def advise(cfg, plan, arch: str | None = None, most: int = 4) -> list[tuple[str, int]]:
    """Trace up to `most` single-knob changes; returns (change, predicted peak) sorted by peak."""
    from ipro.memory.planner import plan_config

    results = []
    for label, overrides in variants(cfg, plan)[:most]:
        data = cfg.model_dump(mode="json")
        for dotted, value in overrides.items():
            section, key = dotted.split(".")
            data[section][key] = value
        results.append((label, plan_config(type(cfg).model_validate(data), arch).peak))  # the method's config class
    return sorted(results, key=lambda x: x[1])


def check_fits(cfg, budget: int, gpus: int = 1, fsdp: bool = False, arch: str | None = None) -> None:
    """Raise a one-line IproError naming a knob when the planned peak exceeds `budget` per GPU."""
    from ipro.memory.planner import plan_config

    plan = plan_config(cfg, arch)
    peak = plan.peak_on(gpus) if fsdp else plan.peak
    if peak <= budget:
        return
    phase = max(plan.phases, key=plan.phases.get)
    options = [(label, p) for label, p in advise(cfg, plan, arch=arch) if p <= budget]
    needed = plan.gpus_needed(budget)
    if options:
        label, p = options[0]
        fix = f"set {label} (predicted {p / GB:.1f} GB)"
    elif needed:
        fix = f"train with FSDP2 on {needed} GPUs (predicted {plan.peak_on(needed) / GB:.1f} GB each)"
    else:
        fix = "lower data.height/width or data.num_frames"
    raise IproError(f"predicted peak memory {peak / GB:.1f} GB exceeds the {budget / GB:.1f} GB GPU (phase '{phase}'); "
                    f"{fix}, see `ipro plan`, or pass --no-memory-check")


@app.command("plan")
def plan_command(
    config: Path = typer.Option(..., "--config", "-c", help="YAML training config (see configs/)."),
    gpu_memory: str = typer.Option("80GB", "--gpu-memory", help="Memory of one GPU, e.g. 80GB, 141GB, 24GB."),
    arch: Optional[str] = typer.Option(
        None, "--arch", help="Shipped real-size configs to plan with when model.path is not on this machine "
        "(wan2.2-ti2v-5b, wan2.2-i2v-a14b, wan2.1-i2v-14b-480p, wan2.1-vace-1.3b, wan2.1-vace-14b); "
        "by default guessed from model.path's folder name."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set data.num_frames=49 (repeatable)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Trace again even if this config was planned before."),
) -> None:
    """Predict the peak GPU memory of one training step of a config, per phase, without weights.

    Builds the configured model from its config JSONs on PyTorch's `meta` device and traces
    one optimizer step through the real code (rollout, decode, face reward, KL, backward,
    optimizer), adding up every tensor while it is alive; attention counts as the fused GPU
    kernel. Numbers are allocated bytes (torch.cuda.max_memory_allocated) per GPU; the
    caching allocator adds a few percent. When the plan exceeds --gpu-memory it traces what
    to change (gradient checkpointing, decode tile, frames scored, K, frames, resolution)
    and how many GPUs FSDP2 needs. The first plan of a config takes a minute on a CPU;
    results are cached in ~/.cache/ipro/plans.
    """
    from ipro.memory.planner import plan_config
    from ipro.train.config import load_config, parse_sets

    cfg = load_config(config, parse_sets(set_))
    budget = parse_memory(gpu_memory)
    plan = plan_config(cfg, arch, use_cache=not no_cache)
    steps = f"K={cfg.sampler.grad_steps} of {cfg.sampler.num_steps}" if cfg.method == "ipro" else \
        f"{cfg.grpo.group_size} videos x {cfg.sampler.num_steps} steps"
    typer.echo(f"{config}: {cfg.method} on {plan.arch} ({plan.family}), {cfg.data.num_frames} frames at "
               f"{cfg.data.height}x{cfg.data.width}, batch {cfg.data.batch_size}, {steps}")
    typer.echo(plan.table())
    for note in plan.notes:
        typer.echo(f"note: {note}")
    if plan.peak <= budget:
        typer.echo(f"fits one {budget / GB:.0f} GB GPU ({plan.peak / GB:.1f} GB predicted)")
        return
    needed = plan.gpus_needed(budget)
    typer.echo(f"does NOT fit one {budget / GB:.0f} GB GPU: {plan.peak / GB:.1f} GB predicted")
    if needed:
        typer.echo(f"  FSDP2 on {needed} GPUs: {plan.peak_on(needed) / GB:.1f} GB per GPU "
                   "(accelerate launch --config_file configs/accelerate/fsdp2.yaml ...)")
    else:
        typer.echo(f"  FSDP2 on any number of GPUs: still {plan.peak_on(64) / GB:.1f} GB per GPU (it shards weights, "
                   "gradients and optimizer state, not one video's activations)")
    for label, peak in advise(cfg, plan, arch=arch):
        verdict = "fits" if peak <= budget else "still over"
        typer.echo(f"  --set {label}: {peak / GB:.1f} GB ({verdict})")


def gpu_budget() -> tuple[int, int, bool] | None:
    """(memory of GPU 0, processes, FSDP on) for `ipro train`'s check; None on a CPU-only machine."""
    import torch

    if not torch.cuda.is_available():
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    return torch.cuda.get_device_properties(0).total_memory, world, fsdp
