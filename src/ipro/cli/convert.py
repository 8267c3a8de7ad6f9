"""`ipro convert phantom`: a released Phantom-Wan checkpoint -> a diffusers-format folder.

Phantom-Wan ships its transformer as one `.pth` state dict in the original Wan layout
(`blocks.0.self_attn.q.weight`, ...), to be used with a Wan 2.1 T2V checkpoint of the same
size. The converted folder is that T2V folder (text encoder, tokenizer, VAE, scheduler
hard-linked, or copied where links are impossible) with Phantom's transformer renamed to
diffusers' `WanTransformer3DModel` names, the scheduler's shift set to Phantom's 5, and
marked as the `phantom` family in model_index.json.

Key mapping (original -> diffusers), per the layouts of Wan's `WanModel` and diffusers'
`WanTransformer3DModel`:
- `time_embedding.{0,2}` -> `condition_embedder.time_embedder.linear_{1,2}`,
  `time_projection.1` -> `condition_embedder.time_proj`,
  `text_embedding.{0,2}` -> `condition_embedder.text_embedder.linear_{1,2}`;
- `head.head` -> `proj_out`, `head.modulation` -> `scale_shift_table`;
- in each block: `modulation` -> `scale_shift_table`, `self_attn`/`cross_attn` -> `attn1`/`attn2`
  with `q,k,v,o` -> `to_q,to_k,to_v,to_out.0` (`norm_q`, `norm_k` keep their names),
  `ffn.{0,2}` -> `ffn.net.0.proj`, `ffn.net.2`, and `norm3` (the cross-attention norm, the
  only norm with weights) -> `norm2` (Wan applies its norms in the order 1, 3, 2);
- `patch_embedding` is unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import typer

from ipro.cli.app import app
from ipro.errors import IproError

PHANTOM_SHIFT = 5.0  # Phantom samples subject-to-video with shift 5 at every size (its generate.py)

convert_app = typer.Typer(help="Convert released checkpoints to diffusers-format folders.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")

# (pattern on the whole key, replacement): the first match wins.
_RENAMES = [
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.self_attn\.([qkv])\.", r"blocks.\1.attn1.to_\2."),
    (r"^blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
    (r"^blocks\.(\d+)\.self_attn\.(norm_[qk])\.", r"blocks.\1.attn1.\2."),
    (r"^blocks\.(\d+)\.cross_attn\.([qkv])\.", r"blocks.\1.attn2.to_\2."),
    (r"^blocks\.(\d+)\.cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
    (r"^blocks\.(\d+)\.cross_attn\.(norm_[qk])\.", r"blocks.\1.attn2.\2."),
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
    (r"^patch_embedding\.", "patch_embedding."),
]


def diffusers_key(key: str) -> str | None:
    """The diffusers name of an original Wan T2V transformer key, or None if it has none."""
    for pattern, replacement in _RENAMES:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return None


def read_checkpoint(path: Path) -> dict:
    """A state dict from a .pth (weights_only) or .safetensors file; a wrapping dict
    ({"state_dict": ...}) and a common "model."/"module." prefix are removed."""
    import torch

    if not path.is_file():
        raise IproError(f"{path}: no such checkpoint; pass the Phantom-Wan .pth file (e.g. Phantom-Wan-1.3B.pth)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch and safetensors raise many types for a damaged or foreign file
        raise IproError(f"{path}: not a readable state dict ({str(e).splitlines()[0][:150]}); re-download it") from None
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(state, dict) and set(state) == {wrapper} and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise IproError(f"{path}: does not hold a state dict of tensors; pass the Phantom-Wan transformer checkpoint")
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def convert_state_dict(state: dict, expected: dict, checkpoint: Path) -> dict:
    """Rename an original-layout state dict; check it fills `expected` (name -> shape) exactly."""
    out, unknown = {}, []
    for key, value in state.items():
        new = diffusers_key(key)
        (unknown.append(key) if new is None else out.__setitem__(new, value))
    if unknown:
        raise IproError(
            f"{checkpoint}: {len(unknown)} weights are not in Wan's text-to-video layout (e.g. {unknown[0]}); "
            "pass a Phantom-Wan transformer checkpoint"
        )
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    if missing or extra:
        example = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise IproError(
            f"{checkpoint}: does not fit the base model's transformer ({len(missing)} missing, {len(extra)} unexpected, "
            f"e.g. {example}); pass the Wan 2.1 T2V folder of the same size (1.3B or 14B) as --base"
        )
    for key, value in out.items():
        if tuple(value.shape) != tuple(expected[key]):
            raise IproError(
                f"{checkpoint}: {key} has shape {tuple(value.shape)}, the base's transformer expects {tuple(expected[key])}; "
                "pass the Wan 2.1 T2V folder of the same size (1.3B or 14B) as --base"
            )
    return {k: v.contiguous() for k, v in out.items()}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def convert_phantom(checkpoint: Path, base: Path, out: Path) -> Path:
    """Write OUT: BASE (a Wan 2.1 T2V diffusers folder) with the checkpoint's transformer.
    Built in a temporary folder beside OUT and renamed into place, so OUT is complete or absent."""
    import torch
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    from ipro.models.registry import read_model_index
    from ipro.models.phantom import mark_phantom

    checkpoint, base, out = Path(checkpoint), Path(base), Path(out)
    model_index, config = read_model_index(base)
    if model_index.get("_class_name") != "WanPipeline" or model_index.get("expand_timesteps") or config.get("in_channels") != 16:
        raise IproError(
            f"{base / 'model_index.json'}: not a Wan 2.1 text-to-video folder (pipeline {model_index.get('_class_name')!r}, "
            f"in_channels {config.get('in_channels')}); pass e.g. Wan2.1-T2V-1.3B-Diffusers as --base"
        )
    if out.exists():
        raise IproError(f"{out}: already exists; remove it or pass another --out")
    with torch.device("meta"):  # names and shapes only, no memory
        expected = {k: v.shape for k, v in WanTransformer3DModel.from_config(config).state_dict().items()}
    state = convert_state_dict(read_checkpoint(checkpoint), expected, checkpoint)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for src in base.rglob("*"):
            rel = src.relative_to(base)
            if rel.parts[0] == "transformer" or rel.parts[0].startswith("."):
                continue
            dst = tmp / rel
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(src, dst)
        (tmp / "transformer").mkdir()
        (tmp / "transformer" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / "transformer" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        scheduler = tmp / "scheduler" / "scheduler_config.json"
        if scheduler.is_file():  # Wan T2V 480p folders ship shift 3
            settings = json.loads(scheduler.read_text())
            settings["flow_shift" if "flow_shift" in settings else "shift"] = PHANTOM_SHIFT
            scheduler.unlink()  # a link to the base's file: write a new one, not through it
            scheduler.write_text(json.dumps(settings, indent=2) + "\n")
        mark_phantom(tmp)  # replaces the link to the base's model_index.json with a new file
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@convert_app.command("phantom")
def phantom(
    checkpoint: Path = typer.Argument(..., help="Phantom-Wan transformer checkpoint in the original Wan layout (Phantom-Wan-1.3B.pth or -14B)."),
    base: Path = typer.Option(..., "--base", help="Wan 2.1 T2V diffusers folder of the same size (Wan2.1-T2V-1.3B-Diffusers or -14B)."),
    out: Path = typer.Option(..., "--out", help="Folder to write (must not exist): the base with Phantom's transformer."),
) -> None:
    """Convert a Phantom-Wan checkpoint into a diffusers folder that `ipro train/generate` load as the phantom family."""
    convert_phantom(checkpoint, base, out)
    typer.echo(f"wrote {out} (family phantom)")
