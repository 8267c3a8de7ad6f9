"""Training-time logging: the reward-hacking monitor (rigid faces in rollouts) and the trackers
(TensorBoard, wandb offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ipro.errors import IproError
from ipro.eval import identity, rigid
from ipro.train.monitor import HackingMonitor

IPRO = str(Path(sys.executable).with_name("ipro"))


def as_video(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames.copy()).permute(0, 3, 1, 2).float().div(255)


def test_monitor_uses_the_eval_rigid_measure_and_warns_once(carphone, capsys):
    still = carphone[40][None].repeat(9, 0)  # a frozen face: what reward hacking produces
    moving = carphone[0:90:10][:9]  # 3 s of a man talking and turning
    monitor = HackingMonitor(threshold=0.4)
    logs = monitor([torch.stack([as_video(still), as_video(moving)])], step=3)
    # The same verdicts as `ipro eval`'s rigid-face measure on these frames.
    expected = []
    for frames in (still, moving):
        faces = identity.embed_frames(monitor.embedder, frames)
        expected.append(rigid.rigid_face(frames, faces, rigid.main_face_per_frame(faces, None))["rigid"])
    assert expected == [True, False]
    assert logs["hacking/rigid_rate"] == 0.5 and logs["hacking/judged"] == 2.0 and logs["hacking/face_coverage"] == 1.0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reward hacking at step 3: 50%" in err and "run.rigid_warn_rate=0.4" in err
    monitor([as_video(still)[None]], step=4)  # rate 1.0, still above: no second warning
    assert capsys.readouterr().err == ""
    calm = HackingMonitor(threshold=0.6, embedder=monitor.embedder)
    calm([torch.stack([as_video(still), as_video(moving)])])
    assert capsys.readouterr().err == ""
    # No face at all: nothing judged, coverage 0, no warning.
    blank = calm([torch.full((1, 9, 3, 64, 64), 0.5)])
    assert np.isnan(blank["hacking/rigid_rate"]) and blank["hacking/face_coverage"] == 0.0


def test_report_to_is_refused_with_the_new_name(tmp_path):
    from ipro.train.config import load_config

    with pytest.raises(IproError, match=r"run.report_to is now run.log_with"):
        load_config(None, {"data.dataset": str(tmp_path), "run.report_to": ["tensorboard"]})
    assert load_config(None, {"data.dataset": str(tmp_path), "run.log_with": "wandb"}).run.log_with == ["wandb"]


def _tensorboard_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


@pytest.mark.slow
def test_a_run_pushed_to_hack_logs_rigid_faces_and_warns(dataset, tmp_path):
    # KL off, 100x the reward weight, 10x the lr, reward on the input image's face only: the
    # fastest way to copy-paste faces (the README's ablation). ~10 s a step on 2 shared cores.
    out = tmp_path / "hack"
    sets = [f"data.dataset={dataset}", "kl.weight=0", "reward.weight=10", "reward.mode=input_face", "optim.lr=1e-3",
            "optim.steps=7", "data.batch_size=2", f"run.output_dir={out}", "run.checkpoint_every=100", "run.rigid_warn_rate=0.5"]
    run = subprocess.run([IPRO, "train", "-c", "configs/tiny-cpu-ipro.yaml", *sum((["--set", s] for s in sets), [])],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    rates = [json.loads(line)["hacking/rigid_rate"] for line in (out / "logs.jsonl").read_text().splitlines()]
    assert len(rates) == 7 and max(rates) > 0.5, rates
    warnings = [line for line in run.stderr.splitlines() if "reward hacking" in line]
    assert len(warnings) == 1 and "run.rigid_warn_rate=0.5" in warnings[0]
    assert {"hacking/rigid_rate", "hacking/face_coverage", "reward", "kl"} <= _tensorboard_tags(out)


@pytest.mark.slow
def test_wandb_logs_offline_without_network(dataset, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "wb"
    sets = [f"data.dataset={dataset}", "model.path=tiny:wan2.1-i2v", "model.lora_rank=4", "data.height=64", "data.width=64",
            "data.num_frames=5", "optim.steps=2", "sampler.num_steps=2", "sampler.grad_steps=1", f"run.output_dir={out}",
            "run.log_with=wandb", "run.checkpoint_every=100"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", HOME=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")  # no network
    run = subprocess.run([IPRO, "train", "-c", "configs/tiny-cpu-ipro.yaml", *sum((["--set", s] for s in sets), [])],
                         capture_output=True, text=True, env=env, timeout=None)
    assert run.returncode == 0, run.stderr[-2000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((out / "wandb").iterdir())
    assert (out / "logs.jsonl").read_text().count("\n") == 2
