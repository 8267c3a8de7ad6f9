"""`ipro demo`: the whole loop on a CPU with the embedded base model and real footage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipro.cli.app import app


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for data, runs, videos, metrics and demo_report.html."),
    steps: int = typer.Option(60, min=1, help="IPRO optimizer steps per run."),
    sample_steps: int = typer.Option(4, min=1, help="Sampler steps for the held-out videos (the IPRO preset trains on 4-step rollouts)."),
    ablations: bool = typer.Option(False, "--ablations", help="Also train the paper's two ablations (KL off; input_face "
                                   "mode) and add their rows: about 3 more minutes on 2 cores. The README's table is this run."),
    model: Optional[Path] = typer.Option(None, help="Base model folder (default: the embedded one)."),
    grpo: bool = typer.Option(False, "--grpo", help="Also train the learned identity reward model and run Identity-GRPO "
                              "with it on the multi-person inputs (about 5 more minutes on 2 cores)."),
    seeds: int = typer.Option(3, min=1, help="Noise seeds per held-out input (videos per input). 3 gives the README's "
                              "numbers; 1 generates and scores a third as many videos (the test uses it)."),
) -> None:
    """Curate real footage, evaluate the base model, fine-tune it with IPRO (and, with
    --ablations, the paper's ablations), evaluate again, and write a before/after report.
    Seeded; CPU-sized: about 2 minutes on 2 cores, 5 with --ablations.

    Reruns resume: finished steps (curation, checkpoints, videos, scores) are kept.
    """
    import torch

    from ipro.demo import run_demo

    torch.manual_seed(0)
    run_demo(out, steps=steps, sample_steps=sample_steps, ablations=ablations, model=model, grpo=grpo, seeds=seeds, log=typer.echo)
