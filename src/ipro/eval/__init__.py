"""Evaluation: identity (FaceSim, swaps, coverage), VBench-I2V-style quality, and a
rigid-face (reward-hacking) index, with metrics.json and an HTML report.

    from ipro.eval import evaluate
    result = evaluate("videos/", "inputs/", "eval_out/")
"""

from ipro.eval.evaluator import Evaluator, aggregate, evaluate, load_run
from ipro.eval.metrics import METRICS

__all__ = ["METRICS", "Evaluator", "aggregate", "evaluate", "load_run"]
