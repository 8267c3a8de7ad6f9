"""LoRA file layouts for Wan: diffusers/peft (what we train and save) and ComfyUI / lightx2v.

diffusers (`WanModel.save_lora`):   transformer.blocks.N.attn1.to_q.lora_A.weight / lora_B.weight,
                                    alpha in the file's metadata (peft config: r, lora_alpha)
ComfyUI / lightx2v / original Wan:  diffusion_model.blocks.N.self_attn.q.lora_down.weight / lora_up.weight
                                    and .alpha (scale = alpha / rank, per module)

ComfyUI's Wan model keeps the original Wan module names, so the conversion is a rename
of block submodules (`WAN_NAMES`) plus the alpha. This module is the one place that
knows both layouts: `ipro export-lora` writes with it and every LoRA reading path
(`--lora`, `model.init_lora`, `model.lightning_lora`) reads with `read_lora`.

A file in either layout is a set of modules, each (down, up, scale) with
delta W = scale * up @ down. Keys we do not map (lightx2v's `.diff` / `.diff_b` on
norms and biases, embeddings, the head) are left to diffusers' own converter on reading,
and passed through unchanged when merging into a ComfyUI file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ipro.errors import IproError

COMFY_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
# diffusers submodule of a Wan block -> the original Wan name ComfyUI uses.
WAN_NAMES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
DIFFUSERS_NAMES = {v: k for k, v in WAN_NAMES.items()}
DOWN_UP = {"comfyui": ("lora_down.weight", "lora_up.weight"), "diffusers": ("lora_A.weight", "lora_B.weight")}

Modules = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (down, up, scale)


def is_comfyui(keys) -> bool:
    return any(k.startswith(COMFY_PREFIX) for k in keys)


def _rename(module: str, names: dict[str, str], what: str) -> str:
    """'blocks.3.attn1.to_q' -> 'blocks.3.self_attn.q' (or back); IproError for anything else."""
    parts = module.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit() or ".".join(parts[2:]) not in names:
        raise IproError(f"{what}: LoRA on '{module}', which the ComfyUI Wan layout has no name for; "
                        f"train LoRA on attention q/k/v/o and the FFN only (model.lora_targets)")
    return f"blocks.{parts[1]}.{names['.'.join(parts[2:])]}"


def split_modules(state: dict[str, torch.Tensor], scale_of, layout: str) -> tuple[Modules, dict[str, torch.Tensor]]:
    """Group a state dict (prefix removed) into modules; returns (modules, keys not LoRA pairs).

    scale_of(module, down, alpha_tensor_or_None) gives the module's scale.
    """
    down_key, up_key = DOWN_UP[layout]
    modules: Modules = {}
    rest = dict(state)
    for key in list(state):
        if not key.endswith("." + down_key):
            continue
        module = key[: -len(down_key) - 1]
        up = rest.pop(f"{module}.{up_key}", None)
        if up is None:
            continue
        down = rest.pop(key)
        modules[module] = (down, up, scale_of(module, down, rest.pop(f"{module}.alpha", None)))
    return modules, rest


def to_comfyui(modules: Modules, what: str) -> dict[str, torch.Tensor]:
    """Modules with diffusers names -> a ComfyUI state dict (alpha = scale * rank)."""
    out = {}
    for module, (down, up, scale) in sorted(modules.items()):
        name = COMFY_PREFIX + _rename(module, WAN_NAMES, what)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
    return out


def comfyui_modules(state: dict[str, torch.Tensor], what: str) -> tuple[Modules, dict[str, torch.Tensor]]:
    """A ComfyUI state dict -> (modules with diffusers names, keys not mapped, with their prefix)."""
    inner = {k.removeprefix(COMFY_PREFIX): v for k, v in state.items()}
    rank_scale = lambda module, down, alpha: 1.0 if alpha is None else float(alpha) / down.shape[0]  # noqa: E731
    modules, rest = split_modules(inner, rank_scale, "comfyui")
    if not modules:  # lora_A / lora_B names under the ComfyUI prefix are accepted too
        modules, rest = split_modules(inner, rank_scale, "diffusers")
    mapped: Modules = {}
    for module, value in modules.items():
        try:
            mapped[_rename(module, DIFFUSERS_NAMES, what)] = value
        except IproError:  # not a block module we map (time/text embedding, head): kept as ComfyUI keys
            down, up, scale = value
            rest.update({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up,
                         f"{module}.alpha": torch.tensor(scale * down.shape[0], dtype=torch.float32)})
    return mapped, {COMFY_PREFIX + k: v for k, v in rest.items()}


def diffusers_state(modules: Modules, target_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Modules -> diffusers keys (with the 'transformer.' prefix), scale folded into lora_B
    so that an adapter whose own scale is `target_scale` applies the same update."""
    out = {}
    for module, (down, up, scale) in modules.items():
        out[f"{DIFFUSERS_PREFIX}{module}.lora_A.weight"] = down
        out[f"{DIFFUSERS_PREFIX}{module}.lora_B.weight"] = up * (scale / target_scale)
    return out


def read_lora(file: str | Path, pipeline_class=None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Any Wan LoRA file -> (diffusers state dict with 'transformer.' keys, peft metadata or None).

    A ComfyUI / lightx2v file is converted here, each module's alpha / rank folded into
    lora_B (metadata None: the adapter's scale is 1). A file with keys this module does
    not map, and every other layout (diffusers, musubi), go through diffusers' converter.
    """
    from safetensors import safe_open

    file = Path(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
            comfy = is_comfyui(keys)
            state = {k: f.get_tensor(k) for k in keys} if comfy else None
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise IproError(f"{file}: not a readable .safetensors file ({str(e).splitlines()[0][:160]}); pass a LoRA file") from None
    if comfy:
        modules, rest = comfyui_modules(state, str(file))
        if modules and not rest:
            return diffusers_state(modules), None
    if pipeline_class is None:
        from diffusers import WanImageToVideoPipeline as pipeline_class
    try:
        return pipeline_class.lora_state_dict(str(file), return_lora_metadata=True)
    except (ValueError, KeyError, RuntimeError) as e:
        raise IproError(f"{file}: not a Wan LoRA ({str(e).splitlines()[0][:200]})") from None


def pipeline_source(file: str | Path):
    """What `pipe.load_lora_weights` gets: the path (it reads a diffusers file's alpha from its
    metadata), or our conversion of a ComfyUI / lightx2v file (alpha already folded in)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            comfy = is_comfyui(f.keys())
    except Exception:  # not safetensors (a .bin LoRA): diffusers reads it, or says why not
        comfy = False
    return read_lora(file)[0] if comfy else str(file)


def lora_scale(metadata: dict | None) -> float:
    """alpha / r of a peft LoRA config (1.0 without one)."""
    metadata = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in (metadata or {}).items()}  # diffusers prefixes the file's keys
    if "r" not in metadata:
        return 1.0
    if metadata.get("rank_pattern") or metadata.get("alpha_pattern") or metadata.get("use_rslora"):
        raise IproError("LoRA metadata: per-module rank/alpha patterns and rsLoRA are not supported; save the LoRA with one rank and alpha")
    return float(metadata.get("lora_alpha") or metadata["r"]) / float(metadata["r"])


def read_modules(file: str | Path) -> tuple[Modules, dict[str, torch.Tensor]]:
    """Any Wan LoRA file -> (modules with diffusers names, unmapped ComfyUI keys)."""
    from safetensors.torch import load_file

    state = load_file(str(file))
    if is_comfyui(state):
        return comfyui_modules(state, str(file))
    diffusers, metadata = read_lora(file)
    scale = lora_scale(metadata)
    inner = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in diffusers.items()}
    modules, rest = split_modules(inner, lambda module, down, alpha: scale, "diffusers")
    if rest:
        raise IproError(f"{file}: has keys that are not LoRA pairs (e.g. {sorted(rest)[0]}); pass a LoRA file")
    return modules, {}


def concat(a: Modules, b: Modules) -> Modules:
    """The sum of two LoRAs as one: per module, stacked downs and scaled ups (rank r_a + r_b, scale 1)."""
    out = dict(a)
    for module, (down, up, scale) in b.items():
        if module in out:
            d0, u0, s0 = out[module]
            out[module] = (torch.cat([d0, down.to(d0)]), torch.cat([u0 * s0, up.to(u0) * scale], dim=1), 1.0)
        else:
            out[module] = (down, up, scale)
    return out


def write_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    from ipro.data.video import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    return path


def write_diffusers(path: Path, modules: Modules) -> Path:
    """A diffusers LoRA file (diffusers' own writer) with every scale folded into lora_B, so
    it needs no alpha metadata: `pipe.load_lora_weights` reads ranks from the shapes."""
    import os
    import tempfile

    from diffusers import WanImageToVideoPipeline

    state = {k.removeprefix(DIFFUSERS_PREFIX): v.detach().to("cpu", torch.float32).contiguous() for k, v in diffusers_state(modules).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        WanImageToVideoPipeline.save_lora_weights(tmp, transformer_lora_layers=state, weight_name="lora.safetensors")
        os.replace(Path(tmp) / "lora.safetensors", path)
    return path
