"""One training config per method: each method's class has only its own keys, a key of
another method is refused naming the method it belongs to, and --print-config prints one
method's keys."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ipro.errors import IproError
from ipro.train.config import GRPOConfig, IPROConfig, SFTConfig, describe_defaults, load_config

IPRO = str(Path(sys.executable).with_name("ipro"))
SRC = Path(__file__).resolve().parents[1] / "src"


def test_the_method_key_chooses_the_config_class():
    assert type(load_config(None, {"data.dataset": "x"})) is IPROConfig  # no method: ipro
    for method, cls in (("ipro", IPROConfig), ("grpo", GRPOConfig), ("sft", SFTConfig)):
        assert type(load_config(None, {"method": method, "data.dataset": "x"})) is cls
    with pytest.raises(IproError, match="key 'method': 'dpo' is not a training method"):
        load_config(None, {"method": "dpo", "data.dataset": "x"})


@pytest.mark.parametrize("method, key, value, owner", [
    ("grpo", "sampler.grad_steps", 2, "ipro"),
    ("sft", "sampler.grad_steps_min", 1, "ipro"),
    ("grpo", "reward.weight", 1.0, "ipro"),
    ("ipro", "sampler.noise", "identity_grpo", "grpo"),
    ("sft", "kl.weight", 1.0, "ipro"),
    ("ipro", "grpo.group_size", 4, "grpo"),
    ("ipro", "sft.face_weight", 0.0, "sft"),
])
def test_a_key_of_another_method_is_refused_naming_it(method, key, value, owner):
    section, sub = key.split(".")
    own = {"ipro": IPROConfig, "grpo": GRPOConfig, "sft": SFTConfig}[owner]
    assert sub in own.model_fields[section].annotation.model_fields  # the key exists, in the owner's config
    load_config(None, {"method": owner, "data.dataset": "x", key: value})  # and is valid there
    where = f"'{key}' is not a setting" if section in {"sampler", "reward"} else f"'{section}' is not a section"
    with pytest.raises(IproError, match=f"{where} of method '{method}' \\(only of '{owner}'\\); remove it"):
        load_config(None, {"method": method, "data.dataset": "x", key: value})


def test_a_typo_is_still_an_unknown_key():
    with pytest.raises(IproError, match="unknown key 'sampler.grad_step'.*--print-config --method grpo"):
        load_config(None, {"method": "grpo", "data.dataset": "x", "sampler.grad_step": 2})


@pytest.mark.slow  # a CLI run in a subprocess, or many: the fast subset stays under 3 minutes
def test_grpo_config_with_grad_steps_is_one_line_from_the_cli(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text(f"method: grpo\ndata: {{dataset: x}}\nsampler: {{num_steps: 4, grad_steps: 2}}\n"
                    f"run: {{output_dir: {tmp_path / 'out'}}}\n")
    out = subprocess.run([IPRO, "train", "-c", str(path)], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"{path}: 'sampler.grad_steps' is not a setting of method 'grpo' (only of 'ipro')" in out.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, sections, sampler, comment", [
    ("ipro", {"kl"}, {"grad_steps", "grad_steps_min"}, "grad_steps: 4  # K: the last K steps"),
    ("grpo", {"grpo"}, {"noise"}, "noise: flow_grpo  # GRPO's SDE noise level"),
    ("sft", {"sft"}, set(), "face_weight: 0.1  # SFT baseline"),
])
def test_print_config_prints_one_methods_keys(method, sections, sampler, comment):
    text = describe_defaults(method)
    assert comment in text
    printed = yaml.safe_load(text)
    common = {"method", "model", "data", "sampler", "reward", "optim", "run"}
    assert set(printed) == common | sections and printed["method"] == method
    assert set(printed["sampler"]) == {"num_steps", "guidance_scale", "shift"} | sampler
    assert ("weight" in printed["reward"]) == (method == "ipro")  # the reward weight w is IPRO's
    # The printed defaults are themselves a valid config of the method.
    printed["data"]["dataset"] = "x"
    assert load_config(None, {"method": method, **{f"{s}.{k}": v for s, sec in printed.items() if isinstance(sec, dict)
                                                   for k, v in sec.items()}}) == load_config(None, {"method": method, "data.dataset": "x"})


@pytest.mark.slow  # a CLI run in a subprocess, or many: the fast subset stays under 3 minutes
def test_print_config_method_from_the_cli():
    out = subprocess.run([IPRO, "train", "--print-config", "--method", "grpo"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == describe_defaults("grpo"), out.stderr
    out = subprocess.run([IPRO, "train", "--print-config", "--method", "dpo"], capture_output=True, text=True)
    assert out.returncode == 2 and "--method: 'dpo' is not a training method" in out.stderr


def test_grpo_without_any_reward_is_refused_by_the_factory():
    from ipro.rewards.factory import build_reward

    cfg = load_config("configs/tiny-cpu-grpo.yaml")
    with pytest.raises(IproError, match="grpo.face_reward_weight is 0 and grpo.reward_model is not set"):
        build_reward(cfg.reward, "cpu", reward_model=None, face_reward_weight=0.0)


def test_no_reward_module_imports_the_trainers():
    for f in sorted((SRC / "ipro" / "rewards").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("ipro.train") for n in names), f"{f.name} imports {names}"


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("prepare"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_a_runs_written_config_loads_back_as_the_same_config(preset, tmp_path):
    """The config.yaml a run writes holds only its method's keys, so `ipro train -c` takes it."""
    from ipro.train.trainer import _yaml

    cfg = load_config(preset)
    (tmp_path / "config.yaml").write_text(_yaml(cfg))
    again = load_config(tmp_path / "config.yaml")
    assert type(again) is type(cfg) and again == cfg


def test_a_bare_yaml_no_means_no_mixed_precision(tmp_path):
    # YAML 1.1 reads `no` as False; `mixed_precision: no` must still mean "no", and `yes` stays an error.
    from ipro.train.config import parse_sets

    assert load_config(CONFIGS / "base-model.yaml", parse_sets(["optim.mixed_precision=no"])).optim.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    data = yaml.safe_load((CONFIGS / "tiny-cpu-ipro.yaml").read_text())
    data.setdefault("optim", {})["mixed_precision"] = False
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).optim.mixed_precision == "no"
    with pytest.raises(IproError, match="mixed_precision"):
        load_config(CONFIGS / "base-model.yaml", parse_sets(["optim.mixed_precision=yes"]))
