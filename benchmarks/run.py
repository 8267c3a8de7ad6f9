"""Run every benchmark in this folder and print one table of ratios.

Each benchmark module exposes `main() -> list[dict]` with rows
{"name", "ours", "reference", "ratio", "unit"}: both sides are measured in the same
run on the same data, because this machine is shared and absolute times swing.

    python benchmarks/run.py              # all
    python benchmarks/run.py faces        # some
"""

from __future__ import annotations

import importlib.util
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem for p in HERE.glob("*.py") if p.stem not in ("run", "__init__"))
    rows, failed = [], []
    for name in names:
        t0 = time.perf_counter()
        try:
            for row in load(name).main():
                rows.append({"bench": name, **row})
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"\nmachine: {platform.node()} {platform.machine()} {platform.processor() or ''}  date: {time.strftime('%Y-%m-%d')}")
    header = ("bench", "name", "ours", "reference", "ratio", "unit")
    table = [header] + [tuple(fmt(r.get(k)) for k in header) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
