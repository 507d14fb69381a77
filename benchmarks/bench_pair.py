"""End-to-end `pair` throughput and memory (read, attach stacks, pair, write Parquet).

    python benchmarks/bench_pair.py [--events 2000000] [--trace FILE] [--keep] [--jobs N] [--repeat 3]
                                    [--profile | --main-only | --tail]

Generates the classic-leak scenario scaled to about --events records unless --trace is given (for the
speed targets: a trace from benchmarks/make_trace.py), then runs `pooltrace pair --jobs N` in a fresh
process per run and reports the median run's records/s end to end (interpreter start included), its peak
RSS (the pair process; decode workers are separate processes of about one chunk each), the pair
process's own CPU time (user + sys of that process alone, all its threads, decode workers not included:
with --jobs N it shares the cores with them) and the diagnostics. With --jobs N > 1 it also times the
decode stage alone and the reader (decode and time merge) at --jobs 1 and N (bench_reader's --stage decode
and --stage reader) and prints both speed-ups. --profile runs
pair_trace under cProfile in-process instead. --main-only times the main process's own work alone: the
chunks are decoded once beforehand (held in memory, about 0.1 KB per record), then the time merge, stack
attachment, pairing and the row writer (its Parquet thread included, and the summary's scan, which runs as
the rows are written) run over them, CPU time per run. --tail
times what comes after the loop, in-process (a fresh process per run): from the reader's last batch to
pair_trace's return (the last stacks and pairs, the last row group's encoding, stacks, modules, trace.json and
summary.npz), where the main process works alone. Not a test: run it by hand and quote the figures.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

PROFILE = r"""
import json, sys, time, cProfile, pstats, io
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from pooltrace.dataset import pair_trace
prof = cProfile.Profile() if sys.argv[4] == "1" else None
t0 = time.perf_counter()
if prof: prof.enable()
meta = pair_trace(Path(sys.argv[1]), Path(sys.argv[3]), jobs=int(sys.argv[5]))
if prof: prof.disable()
t = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
top = ""
if prof:
    s = io.StringIO(); pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12); top = s.getvalue()
print(json.dumps({"seconds": t, "records": meta["records"], "pairing": meta["pairing"],
                  "peak_rss_mb": int(hwm) / 1024, "profile": top}))
"""

# `python -m pooltrace ...`, then this process's own CPU time (RUSAGE_SELF: every thread, no child) to a file
RUN = r"""
import atexit, os, resource, runpy, sys
def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.environ["POOLTRACE_BENCH_CPU"], "w") as f:
        f.write(f"{r.ru_utime} {r.ru_stime}")
atexit.register(_cpu)
sys.argv = ["pooltrace", *sys.argv[1:]]
runpy.run_module("pooltrace", run_name="__main__", alter_sys=True)
"""

# pair_trace in-process: wall seconds in all and after the reader's last batch (the tail), as JSON
TAIL = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from pooltrace.dataset import pair_trace
from pooltrace.etl.reader import EtlReader
last, batches = [], EtlReader.batches
def marked(self, *a, **k):
    yield from batches(self, *a, **k)
    last.append(time.perf_counter())
EtlReader.batches = marked
t0 = time.perf_counter()
pair_trace(Path(sys.argv[1]), Path(sys.argv[3]), jobs=int(sys.argv[4]))
t1 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "tail": t1 - last[0]}))
"""

# the main process's work alone over chunks decoded beforehand: CPU seconds (all threads) per run, as JSON
MAIN_ONLY = r"""
import copy, json, shutil, sys, tempfile, time
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from pooltrace.arrowprobe import skip_pandas_probe
skip_pandas_probe()
from pooltrace import dataset
from pooltrace.etl.reader import EtlReader
chunks, decode = [], EtlReader._chunks
def keep(self, plan, jobs):
    for dc in decode(self, plan, 1):
        chunks.append(copy.deepcopy(dc))
        yield dc
EtlReader._chunks = keep
out = Path(tempfile.mkdtemp())
with EtlReader(sys.argv[1], chunk_bytes=dataset.CHUNK_BYTES) as r:
    dataset._pair(r, out, dataset.DEFAULT_WINDOW_S, None)
runs = []
for _ in range(int(sys.argv[3])):
    todo = copy.deepcopy(chunks)  # the reader numbers rows in place
    EtlReader._chunks = lambda self, plan, jobs: iter(todo)
    shutil.rmtree(out)
    out.mkdir()
    with EtlReader(sys.argv[1], chunk_bytes=dataset.CHUNK_BYTES) as r:
        t0 = time.process_time()
        dataset._pair(r, out, dataset.DEFAULT_WINDOW_S, None)
        runs.append(time.process_time() - t0)
print(json.dumps(runs))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--trace")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1, help="pair --jobs")
    ap.add_argument("--profile", action="store_true", help="print where the time goes (slower)")
    ap.add_argument("--main-only", action="store_true", help="time the main process's work alone")
    ap.add_argument("--tail", action="store_true", help="time from the reader's last batch to the end")
    args = ap.parse_args()
    if args.trace:
        path = Path(args.trace)
    else:
        from pooltrace.synthetic import classic_leak

        t0 = time.perf_counter()
        writer, truth = classic_leak(scale=max(1, round(args.events / 15_400)), cpus=2, duration_s=120.0)
        out_dir = ROOT / "benchmarks" / "out" if args.keep else Path(tempfile.mkdtemp())
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"pair-{truth.records}.etl"
        writer.save(path)
        print(f"generated {truth.records:,} records, {path.stat().st_size / 1e6:.0f} MB in "
              f"{time.perf_counter() - t0:.0f} s -> {path}")
    if args.main_only:
        res = subprocess.run([sys.executable, "-c", MAIN_ONLY, str(path), str(ROOT), str(args.repeat)],
                             capture_output=True, text=True, check=True)
        runs = sorted(json.loads(res.stdout))
        print(f"main process's work alone (time merge, stacks, pairing, row writer, summary; chunks decoded before): "
              f"{runs[len(runs) // 2]:.2f} s CPU, median of {len(runs)} (min {runs[0]:.2f} s)")
        return
    if args.tail:
        with tempfile.TemporaryDirectory() as tmp:
            runs = [json.loads(subprocess.run([sys.executable, "-c", TAIL, str(path), str(ROOT),
                                               str(Path(tmp) / f"d{i}"), str(args.jobs)],
                                              capture_output=True, text=True, check=True).stdout)
                    for i in range(args.repeat)]
        tails = sorted(r["tail"] for r in runs)
        whole = sorted(r["seconds"] for r in runs)
        print(f"pair --jobs {args.jobs} tail, from the reader's last batch to the end (median of {len(runs)}): "
              f"{tails[len(tails) // 2]:.3f} s (min {tails[0]:.3f} s); pair_trace in all "
              f"{whole[len(whole) // 2]:.2f} s")
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            if args.profile:
                res = subprocess.run([sys.executable, "-c", PROFILE, str(path), str(ROOT), str(Path(tmp) / "ds"),
                                      "1", str(args.jobs)], capture_output=True, text=True, check=True)
                runs.append(json.loads(res.stdout))
                continue
            cpu_file = Path(tmp) / "cpu"
            t0 = time.perf_counter()
            res = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", RUN, "pair", str(path),
                                  "-o", str(Path(tmp) / "ds"), "-q", "--json", "--jobs", str(args.jobs)],
                                 capture_output=True, text=True, check=True, cwd=ROOT,
                                 env={**os.environ, "POOLTRACE_BENCH_CPU": str(cpu_file)})
            seconds = time.perf_counter() - t0
            meta = json.loads(res.stdout)
            user, sys_ = (float(x) for x in cpu_file.read_text().split())
            runs.append({"seconds": seconds, "records": meta["records"], "pairing": meta["pairing"],
                         "peak_rss_mb": int(res.stderr.strip().splitlines()[-1]) / 1024, "profile": "",
                         "cpu": (user, sys_)})
    runs.sort(key=lambda r: r["seconds"])
    best = runs[len(runs) // 2]  # the median run
    p = best["pairing"]
    print(f"pair --jobs {args.jobs} (median of {len(runs)}): {best['records']:,} records in {best['seconds']:.2f} s = "
          f"{best['records'] / best['seconds'] / 1e6:.2f} M records/s; peak RSS {best['peak_rss_mb']:.0f} MB; "
          f"{p['allocs']:,} allocs, {p['frees']:,} frees, outstanding {p['outstanding']['count']:,}, "
          f"{p['distinct_stacks']:,} stacks")
    if args.profile:
        print(best["profile"])
    else:
        cpu = sorted(sum(r["cpu"]) for r in runs)[len(runs) // 2]
        user, sys_ = best["cpu"]
        print(f"pair process's own CPU (median of {len(runs)}): {cpu:.2f} s (median run: user {user:.2f} s, "
              f"sys {sys_:.2f} s; decode workers not included)")
    if args.jobs > 1 and not args.profile:
        decode_speedup(path, args.jobs, args.repeat)


def decode_speedup(path: Path, jobs: int, repeat: int) -> None:
    """bench_reader's two measures, each in a fresh process, at --jobs 1 and N: the decode stage alone
    (--stage decode: every chunk read, decoded and its stack frames digested, handed back to the main
    process; the issue's measure) and the reader (--stage reader: the same plus the time merge)."""
    from bench_reader import CHILD, STAGE

    from pooltrace.dataset import CHUNK_BYTES  # the chunks pair decodes

    for label, child, start in (("decode stage, workers' server started before the imports as pair does", STAGE,
                                 "before-imports"),
                                ("decode stage, the server's start timed with it", STAGE, "with-stage"),
                                ("reader: decode and time merge", CHILD, "")):
        med = {}
        for j in (1, jobs):
            runs = []
            for _ in range(repeat):
                res = subprocess.run([sys.executable, "-c", child, str(path), str(ROOT), str(CHUNK_BYTES >> 20),
                                      str(j), start], capture_output=True, text=True, check=True)
                runs.append(json.loads(res.stdout)["seconds"])
            med[j] = sorted(runs)[len(runs) // 2]
        print(f"{label} (median of {repeat}): --jobs 1 {med[1]:.2f} s, --jobs {jobs} {med[jobs]:.2f} s: "
              f"speed-up {med[1] / med[jobs]:.2f}x")


if __name__ == "__main__":
    main()
