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


def test_monitor_uses_the_eval_rigid_measure(carphone, capsys):
    still = carphone[40][None].repeat(9, 0)  # a frozen face: what reward hacking produces
    moving = carphone[0:90:10][:9]  # 3 s of a man talking and turning
    monitor = HackingMonitor(rise=0.25)
    logs = monitor([torch.stack([as_video(still), as_video(moving)])], step=3)
    # The same verdicts as `ipro eval`'s rigid-face measure on these frames.
    expected = []
    for frames in (still, moving):
        faces = identity.embed_frames(monitor.embedder, frames)
        expected.append(rigid.rigid_face(frames, faces, rigid.main_face_per_frame(faces, None))["rigid"])
    assert expected == [True, False] and monitor.verdicts == [True, False]
    assert logs["hacking/rigid_rate"] == 0.5 and logs["hacking/judged"] == 2.0 and logs["hacking/face_coverage"] == 1.0
    assert "hacking/rigid_rate_start" not in logs  # fewer than a window judged: no start rate, no warning
    assert capsys.readouterr().err == ""
    # No face at all: nothing judged, coverage 0, no warning.
    blank = monitor([torch.full((1, 9, 3, 64, 64), 0.5)])
    assert np.isnan(blank["hacking/rigid_rate"]) and blank["hacking/face_coverage"] == 0.0 and monitor.verdicts == [True, False]


def test_monitor_warns_once_when_the_rate_rises_above_the_runs_start(carphone, capsys):
    still = as_video(carphone[40][None].repeat(9, 0))
    moving = as_video(carphone[0:90:10][:9])
    monitor = HackingMonitor(rise=0.25, window=4)
    # A base model whose rollouts are often rigid from the start: 2 of its first 4.
    monitor([torch.stack([still, moving])], step=1)
    logs = monitor([torch.stack([still, moving])], step=2)
    assert logs["hacking/rigid_rate_start"] == 0.5 and "hacking/rigid_rate_recent" not in logs
    assert capsys.readouterr().err == ""  # 100% rigid steps were what the old absolute rate warned on
    logs = monitor([torch.stack([still, moving])], step=3)  # recent 0.5: no rise
    assert logs["hacking/rigid_rate_recent"] == 0.5 and capsys.readouterr().err == ""
    logs = monitor([torch.stack([still, still])], step=4)  # recent 3 of 4 rigid: +0.25, not more
    assert logs["hacking/rigid_rate_recent"] == 0.75 and capsys.readouterr().err == ""
    logs = monitor([torch.stack([still, still])], step=5)  # 4 of 4: +0.5
    assert logs["hacking/rigid_rate_recent"] == 1.0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reward hacking at step 5: 100% of the last 4 rollouts" in err and "50% of the run's first 4" in err
    assert "run.rigid_warn_rise=0.25" in err
    monitor([torch.stack([still, still])], step=6)
    assert capsys.readouterr().err == ""  # once per run
    # A resumed run keeps its start and does not warn again.
    again = HackingMonitor(rise=0.25, window=4, embedder=monitor.embedder)
    again.load_state_dict(json.loads(json.dumps(monitor.state_dict())))  # as the checkpoint's state.json holds it
    assert again.verdicts == monitor.verdicts and again.warned
    fresh = HackingMonitor(rise=0.25, window=4, embedder=monitor.embedder)
    fresh.load_state_dict({"verdicts": monitor.state_dict()["verdicts"][:8]})
    fresh([torch.stack([still, still])], step=5)
    assert "reward hacking at step 5" in capsys.readouterr().err


def test_the_old_warning_key_is_refused_with_the_new_name(tmp_path):
    from ipro.train.config import load_config

    with pytest.raises(IproError, match=r"run.rigid_warn_rate is now run.rigid_warn_rise"):
        load_config(None, {"data.dataset": str(tmp_path), "run.rigid_warn_rate": 0.5})


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
def test_a_run_pushed_to_hack_logs_rigid_faces(dataset, tmp_path):
    # KL off, 100x the reward weight, 10x the lr, reward on the input image's face only: the
    # fastest way to copy-paste faces (the README's ablation). ~10 s a step on 2 shared cores.
    out = tmp_path / "hack"
    sets = [f"data.dataset={dataset}", "kl.weight=0", "reward.weight=10", "reward.mode=input_face", "optim.lr=1e-3",
            "optim.steps=7", "data.batch_size=2", f"run.output_dir={out}", "run.checkpoint_every=100"]
    run = subprocess.run([IPRO, "train", "-c", "configs/tiny-cpu-ipro.yaml", *sum((["--set", s] for s in sets), [])],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    rates = [rec["hacking/rigid_rate"] for rec in logs]
    assert len(rates) == 7 and max(rates) > 0.5, rates
    # 14 judged rollouts: fewer than the monitor's window of 16, so no start rate and no warning yet
    assert not any("hacking/rigid_rate_start" in rec for rec in logs) and "reward hacking" not in run.stderr
    state = json.loads((out / "checkpoint-7" / "state.json").read_text())["hacking_monitor"]
    assert len(state["verdicts"]) == sum(rec["hacking/judged"] for rec in logs) and sum(state["verdicts"]) > 0
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
