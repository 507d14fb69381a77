"""Reader throughput and memory on a generated x64 pool trace with stacks.

    python benchmarks/bench_reader.py [--events 1000000] [--compressed] [--keep] [--trace FILE] [--jobs N]

Generates the classic-leak scenario scaled to about --events records (pool alloc/free + stacks + rundown),
then, in a fresh subprocess, reads it with EtlReader (every buffer decoded into typed tables, in time
order) and reports records/s and peak RSS. Not a test: run it by hand and quote the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from pooltrace.arrowprobe import skip_pandas_probe
from pooltrace.etl.fragments import FragmentStore
from pooltrace.etl.reader import EtlReader
skip_pandas_probe()  # as the CLI does: pyarrow's first conversion would import pandas
t0 = time.perf_counter()
rows = {}
with EtlReader(sys.argv[1], chunk_bytes=int(sys.argv[3]) << 20) as r:
    for b in r.batches(fragments=FragmentStore(), jobs=int(sys.argv[4])):
        for n, t in b.tables.items():
            rows[n] = rows.get(n, 0) + t.num_rows
    records = r.stats.records
t = time.perf_counter() - t0
# VmHWM: this process's own peak (ru_maxrss survives exec and would include the parent's)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"seconds": t, "records": records, "rows": rows, "peak_rss_mb": int(hwm) / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--compressed", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated trace in benchmarks/out/")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk-mb", type=int, default=4, help="reader chunk size")
    ap.add_argument("--trace", help="read this trace instead of generating one")
    ap.add_argument("--jobs", type=int, default=1, help="decode processes (as pair --jobs)")
    args = ap.parse_args()
    from pooltrace.synthetic import classic_leak

    if args.trace:
        path = Path(args.trace)
        size = path.stat().st_size
        args.keep = True
    else:
        scale = max(1, round(args.events / 15_400))
        t0 = time.perf_counter()
        writer, truth = classic_leak(scale=scale, cpus=2, compressed=args.compressed, duration_s=60.0)
        data = writer.to_bytes()
        gen = time.perf_counter() - t0
        out_dir = ROOT / "benchmarks" / "out" if args.keep else Path(tempfile.mkdtemp())
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"bench-{truth.records}{'-c' if args.compressed else ''}.etl"
        path.write_bytes(data)
        size = len(data)
        print(f"generated {truth.records:,} records, {size / 1e6:.1f} MB in {gen:.1f} s -> {path}")
    runs = []
    for _ in range(args.repeat):
        res = subprocess.run([sys.executable, "-c", CHILD, str(path), str(ROOT), str(args.chunk_mb), str(args.jobs)],
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(res.stdout))
    runs.sort(key=lambda r: r["seconds"])
    best = runs[len(runs) // 2]  # the median run
    print(f"reader (--jobs {args.jobs}, median of {len(runs)}): {best['records']:,} records in "
          f"{best['seconds']:.2f} s = "
          f"{best['records'] / best['seconds'] / 1e6:.2f} M records/s "
          f"({size / best['seconds'] / 1e6:.0f} MB/s); peak RSS {best['peak_rss_mb']:.0f} MB; rows {best['rows']}")
    if not args.keep:
        os.remove(path)


if __name__ == "__main__":
    main()
