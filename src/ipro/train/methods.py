"""The trainers `ipro train --method` can run, by name."""

from __future__ import annotations


def trainer_class(method: str):
    if method == "ipro":
        from ipro.train.ipro import IPROTrainer

        return IPROTrainer
    if method == "sft":
        from ipro.train.sft import SFTTrainer

        return SFTTrainer
    if method == "grpo":
        from ipro.train.grpo import GRPOTrainer

        return GRPOTrainer
    if method == "pretrain":
        from ipro.train.pretrain import PretrainTrainer

        return PretrainTrainer
    from ipro.errors import IproError

    raise IproError(f"method '{method}': not available; use 'ipro', 'grpo', 'sft' or 'pretrain'")
