"""`pooltrace report` speed over a large dataset (default 10 M allocations).

    python benchmarks/bench_report.py [--rows 10000000] [--stacks 5000]

Writes a dataset directory directly (allocations/stacks/modules Parquet + trace.json, with the schema of
`pooltrace pair`), then times `pooltrace report DIR` (text and JSON, --by stack and --by function) in a
fresh process each: wall seconds and the process's CPU seconds (user + system; on a shared, loaded machine
the CPU figure is the one to compare). Not a test: run it by hand and quote the figures.
"""

from __future__ import annotations

import argparse
import json
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
from pooltrace.dataset import ALLOCATIONS_SCHEMA, MODULES_SCHEMA, STACKS_SCHEMA  # noqa: E402

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


def children_cpu() -> float:
    """User + system seconds of the finished child processes (0 where the OS does not say: Windows)."""
    try:
        import resource
    except ImportError:
        return 0.0
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--stacks", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ds = Path(tmp) / "big.pooltrace"
        t0 = time.perf_counter()
        build(ds, args.rows, args.stacks)
        print(f"dataset: {args.rows:,} allocations, {args.stacks:,} stacks, built in {time.perf_counter() - t0:.0f} s")
        for extra in (["--format", "json"], ["--by", "function", "--format", "json"], []):
            before = children_cpu()
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "pooltrace", "report", str(ds), "--no-symbols", *extra],
                                 capture_output=True, text=True, cwd=ROOT)
            dt = time.perf_counter() - t0
            cpu = children_cpu() - before
            assert res.returncode == 0, res.stderr
            print(f"report {' '.join(extra) or '(text)'}: {dt:.2f} s wall, {cpu:.2f} s CPU (whole process)")


if __name__ == "__main__":
    main()
