"""Generate the speed benchmarks' pool trace with the project's writer (TraceWriter).

    python benchmarks/make_trace.py --records 4000000 [--cpus 8] [--compressed] -o benchmarks/out/pool-4m.etl

An x64 kernel-logger trace like a busy server's: pool allocations and frees with SYSTEM headers (thread and
process in the header), every pool event followed by its StackWalk event of 8 to 24 frames (kernel frames,
about a third with a user part), a few thousand distinct call sites, blocks living from microseconds to past
the end of the trace, 8 CPUs, plus image/process/thread rundown. --records is approximate (pool + stack
records). Prints the record count and the seconds taken. Not a test.
"""

from __future__ import annotations

import argparse
import heapq
import random
import time
from pathlib import Path

from pooltrace.etl.writer import TraceWriter
from pooltrace.synthetic import HOOK, NONPAGED_NX, PAGED, PERF_FREQ, kernel_modules

TAGS = ["Irp ", "MmSt", "File", "Ntfr", "Leak", "Vad ", "Toke", "Even", "ObNm", "Sema", "CcSc", "FMfc"]


def call_sites(rng: random.Random, n: int, mods: dict) -> list[tuple[str, int, int, list[int]]]:
    """n call sites: (tag, pool type, size, frames of 8..24 kernel addresses)."""
    kernel = [m for k, m in mods.items() if k != "w32k"]
    sites = []
    for _ in range(n):
        depth = rng.randint(8, 24)
        frames = [kernel[rng.randrange(len(kernel))] for _ in range(depth)]
        frames = [m.base + rng.randrange(0x1000, m.size) for m in frames]
        sites.append((rng.choice(TAGS), rng.choice((NONPAGED_NX, PAGED)), rng.choice((0x40, 0x60, 0x100, 0x1F0)),
                      frames))
    return sites


def generate(records: int, cpus: int = 8, compressed: bool = False, seed: int = 7, sites: int = 3000,
             duration_s: float = 60.0) -> TraceWriter:
    rng = random.Random(seed)
    mods = kernel_modules()
    start = 1_000_000_000
    w = TraceWriter(pointer_size=8, cpus=cpus, compressed=compressed, perf_freq=PERF_FREQ, start_qpc=start,
                    logger_name="pooltrace", logfile_name=r"C:\traces\bench.etl")
    ts = start + 10
    for m in mods.values():
        w.image(0, ts, 0x1403, m.base, m.size, m.pid, m.path, checksum=m.size ^ 0x5A5A, timedatestamp=m.timedatestamp)
        ts += 1
    w.process(0, ts, 0x0303, 4, 0, "System", "")
    threads = [(4, 8 + 4 * k) for k in range(64)]
    user_frames = [0x7FFE1C8CD0C4, 0x7FF6A1B21A2B, 0x7FF6A1B22C3D, 0x7FFE1B4E7034]
    site_list = call_sites(rng, sites, mods)
    end = start + int(duration_s * PERF_FREQ)
    n_allocs = int(records / 4.33)  # alloc + stack + free + stack, a third with a user part
    step = (end - start - 2000) / max(n_allocs, 1)
    frees: list[tuple[int, int, int]] = []  # (ts, address, site)
    free_addrs: list[int] = []
    next_addr = 0xFFFFA28000000000
    t = float(start + 1000)

    def event(cpu: int, ets: int, hook: int, s: int, addr: int) -> None:
        tag, pool, size, frames = site_list[s]
        pid, tid = threads[(s + cpu) % len(threads)]
        w.pool(cpu, ets, hook, pool, tag, size, addr, header="system", tid=tid, pid=pid)
        w.stack(cpu, ets, ets, pid, tid, frames)

    for _ in range(n_allocs):
        t += step
        ets = int(t)
        while frees and frees[0][0] < ets:
            fts, addr, s = heapq.heappop(frees)
            event(rng.randrange(cpus), fts, HOOK["free"], s, addr)
            free_addrs.append(addr)
        s = rng.randrange(len(site_list))
        if free_addrs and rng.random() < 0.8:
            addr = free_addrs.pop(rng.randrange(len(free_addrs)))
        else:
            addr = next_addr
            next_addr += 0x200
        cpu = rng.randrange(cpus)
        event(cpu, ets, HOOK["alloc"], s, addr)
        if s % 3 == 0:  # a user part when the call returns to user mode
            pid, tid = threads[(s + cpu) % len(threads)]
            w.stack(cpu, ets + 1, ets, pid, tid, user_frames)
        if rng.random() < 0.97:  # 3 % outlive the trace
            heapq.heappush(frees, (ets + 1 + int(rng.expovariate(1 / 20_000)), addr, s))
    while frees:
        fts, addr, s = heapq.heappop(frees)
        if fts >= end:
            break
        event(rng.randrange(cpus), fts, HOOK["free"], s, addr)
    return w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=4_000_000)
    ap.add_argument("--cpus", type=int, default=8)
    ap.add_argument("--compressed", action="store_true")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    w = generate(args.records, args.cpus, args.compressed)
    n = w.record_count
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    w.save(args.output)
    print(f"{args.output}: {n:,} records, {Path(args.output).stat().st_size / 1e6:.0f} MB, "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
