"""`ipro train`: fine-tune an I2V model with IPRO, Identity-GRPO or the SFT baseline, or train a base
model (pretrain), from a YAML config."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipro.cli.app import app


@app.command("train")
def train_command(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (see configs/ for presets)."),
    method: Optional[str] = typer.Option(None, help="Override the config's method: ipro | grpo | sft | pretrain (each method has its own "
                                         "keys; with --print-config: whose keys to print, default ipro)."),
    resume: Optional[str] = typer.Option(
        None, help="Resume: 'latest' for the newest checkpoint in run.output_dir, or a checkpoint-<step> folder."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set optim.lr=1e-4 (repeatable)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print every config key of one method (--method, default "
                                      "ipro) with its default and meaning, then exit."),
    gpu_memory: Optional[str] = typer.Option(
        None, "--gpu-memory", help="Memory of one GPU for the memory check (default: GPU 0's). On a CPU-only machine "
        "the check is skipped unless this is given."),
    no_memory_check: bool = typer.Option(False, "--no-memory-check", help="Skip the check that the step fits the GPU (`ipro plan`)."),
) -> None:
    """Fine-tune with IPRO (reward feedback through the last K sampler steps plus a multi-step KL),
    Identity-GRPO (--method grpo: group rollouts with the SDE sampler, clipped policy update)
    or the SFT baseline (--method sft); or train a base model in full on footage that ships
    in packages (method: pretrain, e.g. configs/base-model.yaml: the embedded model's recipe).

    The config is one class per method (its `method` key): a key of another method is refused,
    naming it. It is validated before any compute, and on a GPU the step's planned peak memory
    (`ipro plan`) is checked against the GPU's (skipped on a CPU-only machine unless
    --gpu-memory is given; --no-memory-check skips it). Checkpoints (LoRA in diffusers format,
    optimizer, step) go to run.output_dir/checkpoint-<step>; TensorBoard logs beside them.
    Several GPUs: `accelerate launch --num_processes N -m ipro.cli.main train -c cfg.yaml`.
    """
    from ipro.train.config import describe_defaults, load_config, parse_sets

    if print_config:
        typer.echo(describe_defaults(method or "ipro"), nl=False)
        return
    overrides = parse_sets(set_)
    if method:
        overrides["method"] = method
    cfg = load_config(config, overrides)
    if not no_memory_check and cfg.method in ("ipro", "grpo"):  # what `ipro plan` traces
        from ipro.cli.plan import check_fits, gpu_budget, parse_memory

        found = gpu_budget() if cfg.run.device != "cpu" else None  # a run forced onto the CPU needs no GPU check
        if gpu_memory is not None or found is not None:
            budget, gpus, fsdp = found or (0, 1, False)
            check_fits(cfg, parse_memory(gpu_memory) if gpu_memory else budget, gpus, fsdp)
    from ipro.train.methods import trainer_class

    trainer = trainer_class(cfg.method)(cfg)
    logs = trainer.train(resume=True if resume == "latest" else (resume or False))
    if trainer.accelerator.is_main_process:
        typer.echo(f"done: {trainer.global_step} steps; checkpoints in {cfg.run.output_dir}")
        if cfg.method == "pretrain":
            typer.echo(f"  model: {trainer.model_dir}")
        for key in ("loss", "reward", "kl"):
            if key in logs:
                typer.echo(f"  final {key}: {logs[key]:.5g}")
