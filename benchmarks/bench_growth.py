"""What growth per group (pooltrace.growth) adds to `pooltrace report` over a large dataset.

    python benchmarks/bench_growth.py [--rows 10000000] [--stacks 5000]

Builds the same synthetic dataset as bench_report.py; then, for `--by stack`, `function` and `tag`, a fresh
process loads it, groups it like `report` and times the growth pass (series, rates and classes for every
group): the first call — what `report` pays, with its memory freshly mapped — then the median of 3 more.
Not a test: run it by hand and quote the figures.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from bench_report import build  # noqa: E402

from pooltrace.analysis import (  # noqa: E402
    AIFO,
    Filters,
    attach_growth,
    lifetimes,
    outstanding_groups,
    parse_window,
    row_mask,
)
from pooltrace.datasetopen import load_dataset  # noqa: E402
from pooltrace.frames import FrameRenderer  # noqa: E402


def child(path: Path, by: str) -> None:
    ds = load_dataset(path)
    window = parse_window(None, ds.trace.get("duration_ns"))
    mask = row_mask(ds, Filters())
    sel = np.flatnonzero(mask & (lifetimes(ds.rows, window) == AIFO))
    groups = outstanding_groups(ds, sel, by, FrameRenderer(ds), Filters())
    runs = []
    for _ in range(4):
        t0 = time.perf_counter()
        attach_growth(ds, mask, groups, by, window)
        runs.append(time.perf_counter() - t0)
    classes: dict[str, int] = {}
    for g in groups:
        classes[g.growth.cls] = classes.get(g.growth.cls, 0) + 1
    print(f"growth --by {by}: {len(groups):,} groups over {ds.n:,} allocations: first call {runs[0]:.2f} s, "
          f"then {statistics.median(runs[1:]):.2f} s (median of 3); classes {classes}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--stacks", type=int, default=5000)
    ap.add_argument("--child", nargs=2, metavar=("DIR", "BY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.pooltrace"
        build(path, args.rows, args.stacks)
        for by in ("stack", "function", "tag"):
            subprocess.run([sys.executable, __file__, "--child", str(path), by], check=True)


if __name__ == "__main__":
    main()
