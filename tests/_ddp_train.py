"""Run by test_train.py under `accelerate launch --num_processes 2 --cpu`: two SFT steps,
then each rank writes its trainable parameters for the test to compare."""

import sys

import torch
from safetensors.torch import save_file

torch.set_num_threads(1)
from ipro.train.config import load_config  # noqa: E402
from ipro.train.sft import SFTTrainer  # noqa: E402

dataset, out = sys.argv[1], sys.argv[2]
cfg = load_config(overrides={
    "method": "sft", "data.dataset": dataset, "data.height": 128, "data.width": 160, "data.num_frames": 9,
    "model.path": "tiny:wan2.1-i2v", "model.lora_rank": 4, "optim.steps": 2, "optim.lr": 1e-3,
    "sampler.num_steps": 4, "run.output_dir": out, "run.log_with": [], "run.checkpoint_every": 100,
})
trainer = SFTTrainer(cfg)
init = {k: v.detach().clone() for k, v in trainer.named_params.items()}
trainer.train()
rank = trainer.accelerator.process_index
save_file({k: v.detach().contiguous() for k, v in trainer.named_params.items()}, f"{out}/rank{rank}.safetensors")
if rank == 0:
    save_file(init, f"{out}/init.safetensors")
