"""Symbolization speed: PDB load (purepdb parse + function table), the on-disk table cache, and frame lookups.

    python benchmarks/bench_symbols.py [--functions 20000] [--pdb FILE] [--frames 1000000]

Without --pdb, a large driver PDB is generated with clang + lld (``--functions`` C functions, a fifth of them
static; cached in benchmarks/out/) when those are installed; the small fixture PDBs are always measured.
Lookups go through ``Symbolizer.lookup`` (the report's path: numpy row/RVA arrays in, tuples out) with
return-address semantics, over random RVAs in the code section spread over two modules.
Not a test: run it by hand and quote the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from pooltrace.datasetschema import MODULES_SCHEMA  # noqa: E402
from pooltrace.pe import parse_pe  # noqa: E402
from pooltrace.symbols import Symbolizer  # noqa: E402
from pooltrace.symbols.pdbtable import FunctionTable, read_pdb  # noqa: E402

FX = ROOT / "tests" / "fixtures" / "symbols"
OUT = ROOT / "benchmarks" / "out"


def big_source(n: int) -> str:
    lines = ["volatile unsigned long g_sink;"]
    for i in range(n):
        static = "static " if i % 5 == 0 else ""
        callee = f"return BigFunc{i - 1:05d}(x ^ {i}u) + 1u;" if i % 5 == 1 else f"g_sink += x * {i}u; return g_sink;"
        lines.append(f"__declspec(noinline) {static}unsigned long BigFunc{i:05d}(unsigned long x) {{"
                     f" for (unsigned long k = 0; k < (x & 7u); k++) g_sink ^= k + {i}u; {callee} }}")
    lines.append("long DriverEntry(void *d, void *r) { (void)d; (void)r; return (long)BigFunc00001(3); }")
    return "\n".join(lines) + "\n"


def build_big(n: int) -> tuple[Path, Path] | None:
    sys_, pdb = OUT / f"bigdrv{n}.sys", OUT / f"bigdrv{n}.pdb"
    if sys_.exists() and pdb.exists():
        return sys_, pdb
    if not (shutil.which("clang") and shutil.which("lld-link")):
        return None
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "bigdrv.c"
        src.write_text(big_source(n))
        t0 = time.perf_counter()
        subprocess.run(["clang", "--target=x86_64-pc-windows-msvc", "-O1", "-g", "-gcodeview", "-ffreestanding",
                        "-funwind-tables", "-fno-stack-protector", "-mno-stack-arg-probe", "-c", str(src), "-o",
                        str(Path(tmp) / "bigdrv.obj")], check=True)
        subprocess.run(["lld-link", "/nologo", "/driver", "/subsystem:native", "/entry:DriverEntry", "/nodefaultlib",
                        "/debug", f"/pdb:{pdb}", "/pdbaltpath:%_PDB%", "/Brepro", "/machine:x64",
                        f"/out:{sys_}", str(Path(tmp) / "bigdrv.obj")], check=True)
        print(f"built {sys_.name} + {pdb.name} ({pdb.stat().st_size:,} bytes) in {time.perf_counter() - t0:.1f} s")
    return sys_, pdb


def measure_load(pdb: Path, repeat: int = 3) -> dict:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        ident, table = read_pdb(pdb)
        best = min(best, time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "t.npz"
        t0 = time.perf_counter()
        table.save(cache)
        save = time.perf_counter() - t0
        cached = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            FunctionTable.load(cache)
            cached = min(cached, time.perf_counter() - t0)
        size = cache.stat().st_size
    return {"pdb": pdb.name, "pdb_bytes": pdb.stat().st_size, "functions": len(table),
            "public_only": table.meta["public_only"], "parse_s": round(best, 4), "cache_save_s": round(save, 4),
            "cache_load_s": round(cached, 4), "cache_bytes": size}


def measure_lookups(pdbs: list[tuple[Path, Path]], frames: int, seed: int = 1) -> dict:
    rows, text = [], []
    base = 0xFFFFF80412000000
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "pdbs"
        d.mkdir()
        for i, (image, pdb) in enumerate(pdbs):
            pe = parse_pe(image)
            shutil.copy(pdb, d / pe.codeview.pdb_path)
            rows.append({"base": base + i * 0x10000000, "size": pe.size_of_image, "name": image.name,
                         "path": image.name, "pid": 0, "timedatestamp": pe.timedatestamp, "checksum": 0,
                         "pdb_name": pe.codeview.pdb_path, "pdb_guid": str(pe.codeview.guid),
                         "pdb_age": pe.codeview.age, "load_ns": None, "unload_ns": None})
            t = next(s for s in pe.sections if s.name == ".text")
            text.append((t.rva, t.rva + t.virtual_size))
        modules = pa.Table.from_pylist(rows, schema=MODULES_SCHEMA)
        sym = Symbolizer(modules, symbol_path="", local_dirs=[d], cache_dir=Path(tmp) / "cache", progress=False)
        rng = np.random.default_rng(seed)
        mod = rng.integers(0, len(rows), frames).astype(np.int64)
        lo = np.array([a for a, _ in text], dtype=np.uint64)[mod]
        hi = np.array([b for _, b in text], dtype=np.uint64)[mod]
        rva = (lo + (rng.random(frames) * (hi - lo).astype(np.float64)).astype(np.uint64)).astype(np.uint64)
        t0 = time.perf_counter()
        sym.lookup(mod[:1], rva[:1])  # load (parse) every PDB once ...
        sym.lookup(np.arange(len(rows)), np.array([a for a, _ in text], dtype=np.uint64))
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = sym.lookup(mod, rva)  # ... then the timed lookups
        dt = time.perf_counter() - t0
        resolved = sum(g is not None for g in got)
        # the report's pattern: one call per distinct stack of ~12 frames
        calls = min(frames // 12, 50_000)
        t0 = time.perf_counter()
        for k in range(calls):
            sym.lookup(mod[k * 12:(k + 1) * 12], rva[k * 12:(k + 1) * 12])
        per_stack = (time.perf_counter() - t0) / calls
    return {"modules": [r["name"] for r in rows], "frames": frames, "first_load_s": round(load, 3),
            "lookup_s": round(dt, 3), "lookups_per_s": int(frames / dt), "resolved": resolved,
            "us_per_lookup": round(dt / frames * 1e6, 3), "us_per_12_frame_call": round(per_stack * 1e6, 1),
            "lookups_per_s_in_12_frame_calls": int(12 / per_stack)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--functions", type=int, default=20000)
    ap.add_argument("--pdb", help="measure the load of this PDB too")
    ap.add_argument("--frames", type=int, default=1_000_000)
    args = ap.parse_args()
    results = {"load": [measure_load(FX / "leaky.pdb"), measure_load(FX / "ntkrnlmp.pdb")]}
    pairs = [(FX / "leaky.sys", FX / "leaky.pdb"), (FX / "ntoskrnl.exe", FX / "ntkrnlmp.pdb")]
    big = build_big(args.functions)
    if big is not None:
        results["load"].append(measure_load(big[1]))
        pairs = [big, (FX / "ntoskrnl.exe", FX / "ntkrnlmp.pdb")]
    else:
        print("clang/lld not installed: no large PDB generated (use --pdb FILE for a real one)")
    if args.pdb:
        results["load"].append(measure_load(Path(args.pdb)))
    results["lookups"] = measure_lookups(pairs, args.frames)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
