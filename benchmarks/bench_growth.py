"""What growth per group (pooltrace.growth) adds to `pooltrace report` over a large dataset.

    python benchmarks/bench_growth.py [--rows 10000000] [--stacks 5000]

Builds the same synthetic dataset as bench_report.py, loads it once, groups it like `report --by stack`
and `--by function`, then times the growth pass alone (series, rates and classes for every group; median
of 3). Not a test: run it by hand and quote the figures.
"""

from __future__ import annotations

import argparse
import statistics
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
    FrameRenderer,
    attach_growth,
    lifetimes,
    load_dataset,
    outstanding_groups,
    parse_window,
    row_mask,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--stacks", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.pooltrace"
        build(path, args.rows, args.stacks)
        ds = load_dataset(path)
        window = parse_window(None, ds.trace.get("duration_ns"))
        mask = row_mask(ds, Filters())
        sel = np.flatnonzero(mask & (lifetimes(ds.rows, window) == AIFO))
        render = FrameRenderer(ds)
        for by in ("stack", "function", "tag"):
            groups = outstanding_groups(ds, sel, by, render, Filters())
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                attach_growth(ds, mask, groups, by, window)
                runs.append(time.perf_counter() - t0)
            classes = {}
            for g in groups:
                classes[g.growth.cls] = classes.get(g.growth.cls, 0) + 1
            print(f"growth --by {by}: {len(groups):,} groups over {ds.n:,} allocations: "
                  f"{statistics.median(runs):.2f} s (median of 3); classes {classes}")


if __name__ == "__main__":
    main()
