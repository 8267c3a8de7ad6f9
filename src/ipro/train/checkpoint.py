"""Resumable checkpoints: trainable weights, optimizer, EMA and step, written atomically.

A checkpoint is a folder `checkpoint-<step>/` holding
- `trainable.safetensors`: the trainable parameters by name (LoRA: a few MB);
- `optimizer.pt`: the optimizer state (loaded with weights_only=True);
- `ema.safetensors` when EMA is on;
- `state.json`: step, consumed samples, non-finite streak, config hash;
- `lora/`: the LoRA in diffusers format (`pipe.load_lora_weights`, `ipro generate --lora`).
Random draws are keyed by (seed, step, rank, micro-batch) in the trainer, so no RNG
state needs saving for an exact resume. The folder is written under a temporary name
and renamed, so a kill leaves either the whole checkpoint or none.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    named_params: dict[str, torch.Tensor],
    optimizer_state: dict,
    state: dict,
    ema: dict[str, torch.Tensor] | None = None,
    write_lora=None,
    keep_last: int = 2,
) -> Path:
    root = Path(output_dir)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in named_params.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    if write_lora is not None:
        write_lora(tmp / "lora")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> dict:
    """{'params', 'optimizer', 'ema' (or None), 'state'} of a checkpoint folder."""
    path = Path(path)
    ema_file = path / "ema.safetensors"
    return {
        "params": load_file(str(path / "trainable.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        "ema": load_file(str(ema_file)) if ema_file.is_file() else None,
        "state": json.loads((path / "state.json").read_text()),
    }


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


# --- Sharded training (FSDP2): whole tensors in the checkpoint, shards in the trainer ----------


def gather_state(named_params: dict, optimizer, ema: dict | None, module, fsdp2: bool) -> tuple[dict, dict, dict | None]:
    """Trainable weights, optimizer state and EMA as whole tensors. Under FSDP2 they are
    sharded across ranks, so every rank must call this (it all-gathers)."""
    if not fsdp2:
        return named_params, optimizer.state_dict(), ema
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    params = {k: _whole(p.detach()) for k, p in named_params.items()}
    ema = {k: _whole(v) for k, v in ema.items()} if ema is not None else None
    # Keyed by parameter name (not index), whole tensors, on rank 0's CPU only.
    optimizer_state = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return params, optimizer_state, ema


def restore_state(ckpt: dict, named_params: dict, optimizer, module, fsdp2: bool) -> dict | None:
    """Copy a loaded checkpoint's weights and optimizer state into the trainer's (this rank's
    shards under FSDP2); returns its EMA as the trainer holds it, or None."""
    with torch.no_grad():
        for k, p in named_params.items():
            p.copy_(_shard_like(ckpt["params"][k], p))
    if fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["ema"] is None:
        return None
    return {k: _shard_like(v, named_params[k]) for k, v in ckpt["ema"].items()}


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered into one tensor on every rank; other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a checkpoint, as `like` holds it: this rank's shard under FSDP2."""
    value = value.to(like.device, like.dtype)
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, like.device_mesh, like.placements)
    return value
