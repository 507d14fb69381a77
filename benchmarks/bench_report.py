"""`pooltrace report` speed over a large dataset (default 10 M allocations), and on the cached dataset of a
real trace.

    python benchmarks/bench_report.py [--rows 10000000] [--stacks 5000] [--dataset DIR] [--trace T.etl]
                                      [--no-summary]

Writes a dataset directory directly (allocations/stacks/modules Parquet + trace.json, with the schema of
`pooltrace pair`, and its summary.npz as `pair` writes it, see pooltrace.summary; into DIR with --dataset,
reused when DIR already holds one; --no-summary: without summary.npz, so that the reports read the rows, as
on a dataset of an older version), then times `pooltrace report
DIR` (JSON and text, --by stack and --by function) in a fresh process each. With --trace, also `pooltrace
report T.etl` on its cached dataset: the trace is linked into a temporary directory, paired there once (the
cache `report` reuses), then reported. Each run prints wall seconds end to end (interpreter start
included), the process's CPU seconds (user + system; on a shared, loaded machine the CPU figure is the one
to compare) and its peak RSS. Not a test: run it by hand and quote the figures.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pooltrace import __version__  # noqa: E402
from pooltrace.datasetschema import ALLOCATIONS_SCHEMA, MODULES_SCHEMA, STACKS_SCHEMA  # noqa: E402
from pooltrace.summary import NAME as SUMMARY  # noqa: E402
from pooltrace.summary import write_summary  # noqa: E402

K = 0xFFFFF80412000000


def build(out: Path, rows: int, stacks: int) -> None:
    rng = np.random.default_rng(1)
    out.mkdir(parents=True, exist_ok=True)
    mods = [{"base": K + i * 0x1000000, "size": 0x800000, "name": f"drv{i}.sys" if i else "ntoskrnl.exe",
             "path": f"\\SystemRoot\\drv{i}.sys", "pid": 0, "timedatestamp": 0, "checksum": 0, "pdb_name": None,
             "pdb_guid": None, "pdb_age": None, "load_ns": None, "unload_ns": None} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(mods, schema=MODULES_SCHEMA), out / "modules.parquet")
    frames = []
    for _ in range(stacks):
        n = int(rng.integers(6, 30))
        f = K + rng.integers(0, 40, n).astype(np.uint64) * np.uint64(0x1000000) + rng.integers(0, 0x7FFFF, n).astype(
            np.uint64)
        f[0] = K + 0x3A41F2
        frames.append(f.astype(np.uint64))
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in frames])]).astype(np.int32)
    pq.write_table(pa.Table.from_arrays([pa.array(np.arange(stacks, dtype=np.int64)), pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(np.concatenate(frames)))], schema=STACKS_SCHEMA), out / "stacks.parquet")
    writer = pq.ParquetWriter(out / "allocations.parquet", ALLOCATIONS_SCHEMA, compression="snappy")
    tags = np.array(["Leak", "Irp ", "MmSt", "File", "Ntfr", "Vi54", "Gh05", "Even"])
    fates = ["freed", "lost_free", "free_without_alloc", "outstanding"]
    step = 1_000_000
    for lo in range(0, rows, step):
        n = min(step, rows - lo)
        alloc = np.sort(rng.integers(0, 60_000_000_000, n))
        freed = rng.random(n) < 0.9
        free = alloc + rng.integers(1000, 1_000_000_000, n)
        fate = np.where(freed, 0, 3).astype(np.int8)
        t = pa.Table.from_arrays([
            pa.array(tags[rng.integers(0, len(tags), n)]), pa.array(np.full(n, 0x200, np.uint32)),
            pa.array(np.zeros(n, bool)), pa.array(np.zeros(n, bool)), pa.nulls(n, pa.uint32()),
            pa.array(rng.integers(16, 8192, n).astype(np.uint64)),
            pa.array(np.uint64(0xFFFFA00000000000) + np.arange(lo, lo + n, dtype=np.uint64) * np.uint64(64)),
            pa.array(alloc.astype(np.int64)), pa.array(free.astype(np.int64), mask=~freed),
            pa.DictionaryArray.from_arrays(pa.array(fate), pa.array(fates)),
            pa.array(np.full(n, 4, np.uint32)), pa.array(np.full(n, 8, np.uint32)), pa.array(np.zeros(n, np.uint16)),
            pa.array(rng.integers(0, stacks, n).astype(np.int64)), pa.nulls(n, pa.int64())], schema=ALLOCATIONS_SCHEMA)
        writer.write_table(t)
    writer.close()
    (out / "trace.json").write_text(json.dumps({"pooltrace_version": __version__, "notes": [], "warnings": [],
                                                "source": {"path": "synthetic", "size": 0}, "os": {"build": 19045},
                                                "pointer_size": 8, "cpus": 8, "duration_ns": 62_000_000_000,
                                                "lost": {"events": 0, "buffers": 0},
                                                "pairing": {"allocs": rows}}))


def timed(args: list[str], label: str, repeat: int) -> None:
    """Run `python -m pooltrace ARGS` `repeat` times; print each run's wall and CPU seconds and peak RSS
    (the last two from the OS's accounting of that very process: os.wait4; not on Windows)."""
    for _ in range(repeat):
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.perf_counter()
            p = subprocess.Popen([sys.executable, "-m", "pooltrace", *args], stdout=out, stderr=err, cwd=ROOT)
            if hasattr(os, "wait4"):
                _, status, usage = os.wait4(p.pid, 0)
                dt = time.perf_counter() - t0
                code = os.waitstatus_to_exitcode(status)
                p.returncode = code
                figures = (f"{usage.ru_utime + usage.ru_stime:.2f} s CPU, peak RSS {usage.ru_maxrss // 1024} MB "
                           "(whole process)")
            else:
                code = p.wait()
                dt = time.perf_counter() - t0
                figures = "(CPU and RSS: not on this OS)"
            err.seek(0)
            assert code == 0, err.read().decode(errors="replace")
        print(f"{label}: {dt:.2f} s wall, {figures}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--stacks", type=int, default=5000)
    ap.add_argument("--dataset", type=Path, help="build the dataset here (reused when it holds one)")
    ap.add_argument("--trace", type=Path, help="also time report on this trace's cached dataset")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each command")
    ap.add_argument("--no-summary", action="store_true", help="the dataset without summary.npz (the rows path)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ds = args.dataset or Path(tmp) / "big.pooltrace"
        if not (ds / "trace.json").is_file():
            t0 = time.perf_counter()
            build(ds, args.rows, args.stacks)
            print(f"dataset: {args.rows:,} allocations, {args.stacks:,} stacks, built in "
                  f"{time.perf_counter() - t0:.0f} s")
        if args.no_summary and (ds / SUMMARY).exists():
            sys.exit(f"--no-summary: {ds / SUMMARY} exists; give another --dataset DIR")
        if not args.no_summary and not (ds / SUMMARY).exists():
            write_summary(ds)  # as `pair` does
        print(f"dataset {ds}: {'without' if args.no_summary else 'with'} {SUMMARY}")
        rows = json.loads((ds / "trace.json").read_text())["pairing"]["allocs"]
        for extra in (["--format", "json"], ["--by", "function", "--format", "json"], []):
            timed(["report", str(ds), "--no-symbols", *extra], f"report {rows:,} allocations "
                  f"{' '.join(extra) or '(text)'}", args.repeat)
        if args.trace:
            trace = Path(tmp) / args.trace.name
            trace.symlink_to(args.trace.resolve())
            subprocess.run([sys.executable, "-m", "pooltrace", "pair", str(trace), "--quiet"], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
            if args.no_summary:  # the cache is this run's own
                trace.with_suffix(".pooltrace").joinpath(SUMMARY).unlink(missing_ok=True)
            meta = json.loads(trace.with_suffix(".pooltrace").joinpath("trace.json").read_text())
            what = f"{meta['records']:,} records, {meta['pairing']['allocs']:,} allocations"
            for extra in (["--format", "json"], []):
                timed(["report", str(trace), *extra], f"report {args.trace.name} (cached dataset: {what}) "
                      f"{' '.join(extra) or '(text)'}", args.repeat)


if __name__ == "__main__":
    main()
