"""Reader throughput and memory on a generated x64 pool trace with stacks.

    python benchmarks/bench_reader.py [--events 1000000] [--compressed] [--keep] [--trace FILE] [--jobs N]
                                      [--stage reader|decode] [--server-start before-imports|with-stage]

Generates the classic-leak scenario scaled to about --events records (pool alloc/free + stacks + rundown),
then, in a fresh subprocess, reads it and reports records/s and peak RSS. Not a test: run it by hand and
quote the figures.

--stage reader (default): EtlReader.batches — every buffer decoded into typed tables, stack frames digested,
and the rows merged into time order in the reading process — from opening the trace to its last batch.
--stage decode: the decode stage alone, as pair runs it — every chunk of buffers read, decoded and its stack
frames digested (chunks.decode_buffers), in this process with --jobs 1 or in N worker processes started the
way pair starts them (workerstart.start_early, then decode_in_workers) and handed back — from opening the trace
to the last decoded chunk received; no time merge. The peak RSS is the reading process's (decode workers
are separate processes). It also prints what does not split across workers, from the same run: the head
(imports, buffer index, chunk plan), and with N > 1 the chunks this process decoded itself while the workers
started and when the first chunk a worker decoded came back.
--server-start (decode stage): before-imports (default), as `pair` runs: the workers' server is started
first, then the process imports the pairing code (pooltrace.dataset) while the server loads, then the
stage is timed from opening the trace (with --jobs 1 the same imports, no server); with-stage: the server's
start (its imports, ~0.2 s) is timed with the stage, as for a reader started cold.
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


STAGE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
jobs, as_pair = int(sys.argv[4]), sys.argv[5] == "before-imports"
if as_pair:  # as `pair` runs: the workers' server first, then this process loads the pairing code meanwhile
    if jobs > 1:
        from pooltrace.etl.workerstart import start_early
        start_early()
    import pooltrace.dataset  # noqa: F401 - what pair imports while the server loads
from pooltrace.arrowprobe import skip_pandas_probe
skip_pandas_probe()  # as the CLI does: pyarrow's first conversion would import pandas
t0 = time.perf_counter()
if jobs > 1:
    from pooltrace.etl.workerstart import start_early
    start_early()  # does nothing when started above; else the server's start is timed with the stage
    from pooltrace.etl import parallel
    here = []  # chunks this process decodes itself while the workers start (counted, not changed)
    decode_here = parallel.decode_buffers
    parallel.decode_buffers = lambda *a: here.append(1) or decode_here(*a)
from pooltrace.etl.chunks import decode_buffers, plan_chunks
from pooltrace.etl.reader import EtlReader
with EtlReader(sys.argv[1], chunk_bytes=int(sys.argv[3]) << 20) as r:
    plan = plan_chunks(r.index, r.chunk_bytes)
    head = time.perf_counter() - t0  # imports, buffer index and plan
    if jobs > 1:
        chunks = parallel.decode_in_workers(r, plan, jobs, digest_stacks=True)
    else:
        chunks = (decode_buffers(r.source, r.index, b, int(r.user_limit), True) for b, _wm in plan)
    records, rows, first = 0, {}, None
    for k, dc in enumerate(chunks):
        if first is None and jobs > 1 and k >= len(here):
            first = time.perf_counter() - t0  # the first chunk a worker decoded, received
        records += dc.counts.records
        for n, t in dc.tables.items():
            rows[n] = rows.get(n, 0) + len(t)
t = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"seconds": t, "records": records, "rows": rows, "peak_rss_mb": int(hwm) / 1024, "head": head,
                  "chunks": len(plan), "here": len(here) if jobs > 1 else len(plan), "first_from_workers": first}))
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
    ap.add_argument("--stage", choices=["reader", "decode"], default="reader",
                    help="reader: decode and time merge (EtlReader.batches); decode: the decode stage alone")
    ap.add_argument("--server-start", choices=["before-imports", "with-stage"], default="before-imports",
                    help="decode stage: the workers' server started before the imports, as pair does, or timed "
                         "with the stage")
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
        child = CHILD if args.stage == "reader" else STAGE
        res = subprocess.run([sys.executable, "-c", child, str(path), str(ROOT), str(args.chunk_mb), str(args.jobs),
                              args.server_start], capture_output=True, text=True, check=True)
        runs.append(json.loads(res.stdout))
    runs.sort(key=lambda r: r["seconds"])
    best = runs[len(runs) // 2]  # the median run
    start = f", server {args.server_start}" if args.stage == "decode" and args.jobs > 1 else ""
    print(f"{args.stage} (--jobs {args.jobs}{start}, median of {len(runs)}): {best['records']:,} records in "
          f"{best['seconds']:.2f} s = "
          f"{best['records'] / best['seconds'] / 1e6:.2f} M records/s "
          f"({size / best['seconds'] / 1e6:.0f} MB/s); peak RSS {best['peak_rss_mb']:.0f} MB; rows {best['rows']}")
    if args.stage == "decode":  # what does not split across workers, in the same (median) run
        split = ""
        if args.jobs > 1:
            split = f"; {best['here']} of {best['chunks']} chunks decoded in this process while the workers started"
            if best["first_from_workers"] is not None:
                split += f", the first from a worker received at {best['first_from_workers']:.3f} s"
        print(f"  head (imports, buffer index, plan) {best['head']:.3f} s{split}")
    if not args.keep:
        os.remove(path)


if __name__ == "__main__":
    main()
