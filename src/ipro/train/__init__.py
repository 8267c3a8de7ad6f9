"""Trainers: IPRO (reward backprop through the last K steps), GRPO and SFT baselines."""
