"""The package's shape: every module imports on its own, imports form no cycle, files stay short."""

from __future__ import annotations

import pytest

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 450


def modules() -> dict[str, Path]:
    found = {}
    for f in sorted((SRC / "ipro").rglob("*.py")):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = f
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the ipro modules it imports, at module level or inside functions."""
    mods = modules()
    graph = {}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base in mods:
                    edges |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names}
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_form_no_cycle():
    graph = import_graph()
    assert "ipro.models.wan" in graph and "ipro.train.trainer" in graph
    assert cycles(graph) == []


@pytest.mark.slow  # keeps the fast subset under 3 minutes
def test_every_module_imports_first():
    """Each module imported first, in an interpreter where no other ipro module is loaded
    (torch and the other libraries stay loaded between modules, to keep it quick)."""
    code = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m == 'ipro' or m.startswith('ipro.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc().strip().splitlines()[-1])\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *sorted(modules())], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_no_source_file_is_long():
    long = {str(f.relative_to(SRC)): n for f in modules().values() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_cli_starts_without_the_model_libraries():
    """Every `ipro` command registers all commands at startup; the tests start ~50 of them,
    and diffusers (with torch._dynamo) added ~4 s of CPU to each (measured: `ipro --help`
    5.6 -> 1.65 s). Commands import it when they run."""
    code = "import sys\nfrom ipro.cli.main import _register\n_register()\nprint(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
