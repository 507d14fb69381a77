"""`pooltrace trend` over a run store (default 100 runs of about 100,000 allocations each).

    python benchmarks/bench_store_trend.py [--runs 100] [--scale 20] [--store DIR] [--repeat 3]

Builds the store once (kept in --store for reruns): three runs of the classic synthetic scenario (about
5,150 allocations per --scale unit; one with a second leak) paired with `pooltrace pair --into`, then copied
to --runs runs with `store.append_dataset` (labels build=1..N; the leaking variant in the middle third).
Then times `pooltrace trend STORE --by function` and `--by stack` (JSON, no symbols), each in a fresh
process, median of --repeat, and prints the peak RSS of those processes. Not a test: run it by hand and
quote the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pooltrace.store import append_dataset, is_store, runs  # noqa: E402
from pooltrace.synthetic import classic_leak  # noqa: E402


def build(store: Path, n_runs: int, scale: int) -> None:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        seeds = []
        for k, new_leak in enumerate([False, True, False]):
            w, _ = classic_leak(seed=10 + k, scale=scale, new_leak=new_leak, shift=k * 0x200000)
            w.save(Path(tmp) / f"v{k}.etl")
            res = subprocess.run([sys.executable, "-m", "pooltrace", "pair", str(Path(tmp) / f"v{k}.etl"), "--into",
                                  str(store), "--run-id", f"seed{k}", "-q"], capture_output=True, text=True, cwd=ROOT)
            assert res.returncode == 0, res.stderr
            seeds.append(store / f"run_id=seed{k}")
        for b in range(1, n_runs + 1):
            variant = 1 if n_runs // 3 < b <= 2 * n_runs // 3 else (b % 2) * 2
            append_dataset(store, seeds[variant], run_id=f"b{b:04d}", labels={"build": str(b), "bench": "yes"})
    rows = runs(store)
    allocs = [r["allocations"] for r in rows if r["labels"].get("bench") == "yes"]
    print(f"store: {len(allocs)} runs, {sum(allocs):,} allocations ({min(allocs):,}-{max(allocs):,} per run), "
          f"built in {time.perf_counter() - t0:.0f} s")


def timed(args: list[str]) -> tuple[float, float, dict]:
    """Wall and CPU (user + system) seconds of one whole process, and its JSON output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pooltrace", *args], capture_output=True, text=True, cwd=ROOT)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert res.returncode == 0, res.stderr
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return dt, cpu, json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--scale", type=int, default=20)
    ap.add_argument("--store", type=Path, default=Path(tempfile.gettempdir()) / "pooltrace-bench-store")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not is_store(args.store):
        build(args.store, args.runs, args.scale)
    for by in ("function", "stack"):
        times, cpus = [], []
        for _ in range(args.repeat):
            dt, cpu, data = timed(["trend", str(args.store), "--label", "bench=yes", "--by", by, "--no-symbols",
                                   "--format", "json", "-q"])
            times.append(dt)
            cpus.append(cpu)
        statuses = sorted({g["status"] for g in data["groups"]})
        print(f"trend --by {by}: wall {statistics.median(times):.2f} s, cpu {statistics.median(cpus):.2f} s "
              f"(medians of {args.repeat}, whole process; load average {os.getloadavg()[0]:.1f}), "
              f"{len(data['runs'])} runs, {len(data['groups'])} groups, statuses {statuses}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"peak RSS of the trend processes: {peak / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
