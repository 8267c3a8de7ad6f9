"""Run by test_offload.py: one IPRO step on the tiny Wan 2.2 A14B preset, either over two CPU
processes (under torchrun, gloo) sharded with FSDP2 or replicated with DDP, or in one process
with the same data, then the step's loss and the saved checkpoint for the test to compare.

    python _fsdp_train.py DATASET OUT single|fsdp2|ddp CHECKPOINTING(0|1)

The two layouts see the same samples: process r of two and micro-batch r of one process
(optim.grad_accum 2) get the same clip from `batch_at`, and the step generator below keys
their noise alike. Everything else is the trainer's own code path.
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from accelerate import Accelerator, FullyShardedDataParallelPlugin  # noqa: E402
from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

import ipro.train.trainer as trainer_module  # noqa: E402
from ipro.train.config import load_config  # noqa: E402
from ipro.train.ipro import IPROTrainer  # noqa: E402

dataset, out, layout, checkpointing = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
single = layout == "single"
keyed = trainer_module.step_generator
trainer_module.step_generator = lambda seed, step, rank, micro, device="cpu": keyed(seed, step, 0, rank + micro, device)

cfg = load_config(overrides={
    "data.dataset": dataset, "data.height": 64, "data.width": 64, "data.num_frames": 5,
    "model.path": "tiny:wan2.2-i2v-a14b", "model.lora_rank": 4, "model.gradient_checkpointing": checkpointing,
    "sampler.num_steps": 4, "sampler.grad_steps": 2, "kl.weight": 1.0, "kl.weighting": "uniform",
    "optim.steps": 1, "optim.lr": 1e-2, "optim.grad_accum": 2 if single else 1,
    "run.output_dir": str(out), "run.device": "cpu", "run.seed": 3,
})

if layout != "fsdp2":
    accelerator = Accelerator(cpu=True)  # two processes: accelerate's MULTI_CPU, i.e. DDP
else:
    # What `accelerate launch --config_file configs/accelerate/fsdp2.yaml` puts in the
    # environment, from accelerate's own launcher code.
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp2.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", __file__])
    validated = _validate_launch_command(args)
    env = prepare_multi_gpu_env(validated[0] if isinstance(validated, tuple) else validated)
    os.environ.update({k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"})
    # accelerate only shards on accelerators: CPU processes become MULTI_CPU (DDP) whatever
    # the config says. Set the FSDP type it would set on GPUs; the preparation that then runs
    # (fully_shard per WanTransformerBlock, sharded optimizer) is accelerate's and torch's.
    accelerator = Accelerator(cpu=True)
    accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # both, as accelerate does
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()

# The tiny preset's random weights draw no faces, so the reward has no gradient; a LoRA with
# B != 0 makes the KL pull it back, which gives every LoRA weight a gradient.
torch.manual_seed(cfg.run.seed)  # peft draws LoRA A from the global generator
with accelerator.main_process_first():  # rank 0 builds the tiny preset into `out`
    model = trainer_module.load_for_training(cfg.model, out, accelerator.device)
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for name, p in model.trainable_module.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)

trainer = IPROTrainer(cfg, model=model, accelerator=accelerator)
names = {id(p): k for k, p in trainer.named_params.items()}
grads = {}


def keep_grads(optimizer, *_):  # Adam's first update is about lr * sign(grad): compare the gradients themselves
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # every rank gathers
            grads[names[id(p)]] = g.clone()


getattr(trainer.optimizer, "optimizer", trainer.optimizer).register_step_pre_hook(keep_grads)
logs = trainer.step()
loss = accelerator.gather(torch.tensor([float(logs["loss"])])).mean()  # one process: its own mean over micro-batches
path = trainer.save()
# Resuming from that checkpoint puts every rank's shard of weights and optimizer state back.
before = copy.deepcopy(trainer._gathered_state())  # without FSDP these are the live tensors
optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
with torch.no_grad():  # wipe this run's state, so only the resume can bring it back
    for p in trainer.named_params.values():
        p.zero_()
        optimizer.state[p]["exp_avg"].zero_()
trainer.resume(path)
after = trainer._gathered_state()
resumed = all(torch.equal(before[0][k], after[0][k]) for k in before[0])
if accelerator.is_main_process:  # the whole optimizer state lives on rank 0 only
    exp_avg = [(before[1]["state"][k]["exp_avg"], after[1]["state"][k]["exp_avg"]) for k in before[1]["state"]]
    resumed = resumed and len(exp_avg) == len(before[0]) and all(torch.equal(x, y) for x, y in exp_avg)
if accelerator.is_main_process:
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FSDPModule

    save_file(grads, str(out / "grads.safetensors"))

    (out / "result.json").write_text(json.dumps({
        "loss": float(loss),
        "kl": float(logs["kl"]),
        "grad_norm": float(logs["grad_norm"]),
        "checkpoint": str(path),
        "resume_restores_state": resumed,
        "trained_expert_sharded": isinstance(model.trainable_module, FSDPModule),
        "frozen_expert_sharded": isinstance(model.frozen_expert, FSDPModule),
    }))
