"""LoRA on a diffusers transformer, the same way for every family: set up the trained
adapter (or a frozen copy for full fine-tuning), write it in diffusers' Wan format, read any
Wan LoRA file into it (layouts: `lora_formats`), and merge a file into the base weights.

peft starts lora_B at zero, so a fresh adapter leaves the model exactly as it was; the
adapter trains in float32 even when the base weights are bf16.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch

from ipro.errors import IproError

ADAPTER = "default"
# Attention q/k/v/o (self and text cross-attention) and the FFN of every block.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


def lora_file(path: str | Path, what: str = "LoRA") -> Path:
    """The .safetensors file a user means: the file itself, or the one in a folder
    (`pytorch_lora_weights.safetensors` when there are several)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise IproError(f"{path}: no .safetensors file in this {what} folder; pass the LoRA file or its folder")
        preferred = path / "pytorch_lora_weights.safetensors"
        return preferred if preferred in files else files[0]
    if not path.is_file():
        raise IproError(f"{path}: {what} not found; check the path")
    return path


def setup_finetuning(module: torch.nn.Module, finetune: str | None, rank: int = 16, alpha: float | None = None,
                     targets: Sequence[str] = DEFAULT_LORA_TARGETS) -> torch.nn.Module | None:
    """Make `module` trainable: a peft LoRA ("lora") or all its weights ("full"). Returns the
    frozen copy that anchors the KL for full fine-tuning (LoRA needs none: switching the
    adapter off gives the base weights), else None."""
    if finetune == "lora":
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights=True)
        try:
            module.add_adapter(config, adapter_name=ADAPTER)
        except ValueError as e:
            raise IproError(f"lora_targets={list(targets)}: {str(e).splitlines()[0]}") from None
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
                p.data = p.data.float()
        return None
    if finetune == "full":
        frozen = copy.deepcopy(module).requires_grad_(False)  # costs one more copy of the module
        module.requires_grad_(True)
        return frozen
    return None


def save_lora(module: torch.nn.Module, directory: str | Path, pipeline_class, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the trained adapter as pytorch_lora_weights.safetensors, which
    `pipeline_class.load_lora_weights(directory)` loads (alpha kept in the metadata).

    state_dict: the module's tensors by name to write instead of reading the module (under
    FSDP2 the module holds shards; the trainer gathers them first)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, state_dict, adapter_name=ADAPTER)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(
        directory, transformer_lora_layers=state, transformer_lora_adapter_metadata=module.peft_config[ADAPTER].to_dict(),
    )
    return directory / "pytorch_lora_weights.safetensors"


def load_into_trained(module: torch.nn.Module, path: str | Path, pipeline_class) -> None:
    """Load a LoRA file (any layout) into the adapter being trained (resume, init_lora)."""
    from peft.utils import set_peft_model_state_dict

    from ipro.models.lora_formats import lora_scale, read_lora

    file = lora_file(path)
    state, metadata = read_lora(file, pipeline_class)
    # The file's alpha / rank may differ from the trained adapter's: carry it over in lora_B.
    ratio = lora_scale(metadata) / lora_scale(module.peft_config[ADAPTER].to_dict())
    state = {k.removeprefix("transformer."): v * ratio if ".lora_B." in k else v for k, v in state.items()}
    try:
        result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    except RuntimeError as e:
        raise IproError(f"{file}: does not fit the LoRA being trained ({str(e).splitlines()[0][:200]}); match lora_rank and lora_targets") from None
    if result.unexpected_keys:
        raise IproError(f"{file}: has weights for layers the trained LoRA lacks (e.g. {result.unexpected_keys[0]}); match lora_targets")


def load_frozen(module: torch.nn.Module, path: str | Path, pipeline_class) -> None:
    """Load a LoRA file (any layout) as an adapter that does not train (generation)."""
    from ipro.models.lora_formats import read_lora

    file = lora_file(path)
    state, metadata = read_lora(file, pipeline_class)
    if ADAPTER in getattr(module, "peft_config", {}):
        module.delete_adapters(ADAPTER)
    try:
        module.load_lora_adapter(state, prefix="transformer", adapter_name=ADAPTER, metadata=metadata)
    except (ValueError, KeyError, RuntimeError) as e:
        raise IproError(f"{file}: not a LoRA this model can load ({str(e).splitlines()[0][:200]})") from None
    module.requires_grad_(False)


def merge_lora(module: torch.nn.Module, path: str | Path, pipeline_class, what: str = "LoRA") -> None:
    """Add a LoRA file's update (any layout) to `module`'s weights; no adapter layers stay."""
    from ipro.models.lora_formats import read_lora

    file = lora_file(path, what)
    state, metadata = read_lora(file, pipeline_class)
    try:
        module.load_lora_adapter(state, prefix="transformer", adapter_name="merge", metadata=metadata)
    except (ValueError, KeyError, RuntimeError) as e:
        raise IproError(f"{file}: not a {what} this model can merge ({str(e).splitlines()[0][:200]})") from None
    module.fuse_lora(adapter_names=["merge"])
    module.unload_lora()
