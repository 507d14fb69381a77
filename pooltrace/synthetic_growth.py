"""Synthetic traces with planted growth patterns, written byte-exact through etl.writer, with their ground
truth: which call site leaks, which one is a cache, which blocks are outstanding only because the trace
ended. Used by the shipped sample `traces/sample-growth.etl` (traces/generate.py) and the tests.

`write_planted` writes any plan (call sites with their frames, allocation and free times); `growth_plan`
is the shipped scenario over 60 s:

- `leak`       leaky.sys!AllocateLeakyBuffer, tag Leak: 10 blocks/s, never freed — a linear leak (`leak`);
- `cache`      ntoskrnl's MiCreateImageFileMap, tag MmSt: fills 1,500 blocks in the first 10 s, then only
               replaces entries (a free and an allocation) — holds the most bytes, a `plateau`;
- `big_cache`  Ntfs.sys+0x10a4c, tag File: 2,000 blocks in the first 8 s, kept — a `plateau`;
- `slow_leak`  Ntfs.sys+0x3f1e0, also tag File: one block every 2 s, never freed — a `leak` hidden under
               the big cache of the same tag when grouped by tag;
- `burst`      Ntfs.sys+0x1b3c0, tag Irp: 400 blocks in 55..58 s, still outstanding when the trace ends
               (freed after it) — `transient`;
- `requests`   Ntfs.sys+0x2a7c1, tag Ntfr: short-lived (0.2..1 s) all along — a few in flight at the end,
               `transient`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pooltrace.etl.writer import TraceWriter
from pooltrace.synthetic import HOOK, NONPAGED_NX, NT_ALLOC, PAGED, PERF_FREQ, SYSCALL_TAIL, Module, kernel_modules

START = 1_000_000_000  # QPC ticks at the start of the trace


@dataclass
class Site:
    tag: str
    pool: int
    size: int
    frames: list[tuple[str, int]]  # (module key, rva), innermost first
    allocs: list[int]  # allocation times, ticks after the start
    frees: list[int | None]  # free time of each allocation (None: never freed inside the trace)
    expected: str = ""  # the planted growth class


def write_planted(sites: dict[str, Site], mods: dict[str, Module], *, duration_s: float, compressed: bool = False,
                  debug_ids: bool = True, logfile: str = r"C:\traces\planted.etl") -> tuple[TraceWriter, dict]:
    """A trace of `sites` (every allocation with its stack, every free before the end), the modules
    `mods` in the rundown (with their PDB identities when `debug_ids`), and its truth per site."""
    w = TraceWriter(pointer_size=8, cpus=2, compressed=compressed, perf_freq=PERF_FREQ, start_qpc=START,
                    os_build=19045, logger_name="pooltrace", logfile_name=logfile)
    ts = START + 10
    for m in mods.values():
        if debug_ids:
            w.ktc_image_id(0, ts, m.base, m.size, m.pid, m.timedatestamp, m.name)
            w.ktc_rsds(0, ts, m.base, m.pid, m.guid, m.age, m.pdb)
        w.image(0, ts, 0x1403, m.base, m.size, m.pid, m.path, checksum=m.size ^ 0x5A5A, timedatestamp=m.timedatestamp)
        ts += 1
    w.process(0, ts, 0x0303, 4, 0, "System", "")
    w.thread(0, ts + 1, 0x0503, 4, 8, name="worker")
    end = START + int(duration_s * PERF_FREQ)
    events = []  # (ts, kind 0 alloc / 1 free, site, index)
    for name, s in sites.items():
        for i, (a, f) in enumerate(zip(s.allocs, s.frees, strict=True)):
            events.append((START + 1000 + a, 0, name, i))
            if f is not None and START + 1000 + f < end:
                events.append((START + 1000 + f, 1, name, i))
    events.sort()
    addr = {}
    nxt = 0xFFFFA28000000000
    truth = {name: {"tag": s.tag, "size": s.size, "class": s.expected, "allocs": len(s.allocs), "frees": 0,
                    "outstanding": 0, "outstanding_bytes": 0} for name, s in sites.items()}
    last = START
    for k, (ets, kind, name, i) in enumerate(events):
        ets = max(ets, last + 1)  # distinct timestamps: each stack belongs to exactly one event
        last = ets
        s = sites[name]
        cpu = k % 2
        if kind == 0:
            addr[name, i] = nxt
            nxt += (s.size + 0x1F) & ~0xF
            w.pool(cpu, ets, HOOK["alloc"], s.pool, s.tag, s.size, addr[name, i], tid=8, pid=4)
            w.stack(cpu, ets, ets, 4, 8, [mods[m].base + rva for m, rva in s.frames])
        else:
            w.pool(cpu, ets, HOOK["free"], s.pool, s.tag, s.size, addr.pop((name, i)), tid=8, pid=4)
            truth[name]["frees"] += 1
    for name, _ in addr:
        truth[name]["outstanding"] += 1
        truth[name]["outstanding_bytes"] += sites[name].size
    ts = end + 100
    for m in mods.values():
        w.image(1, ts, 0x1404, m.base, m.size, m.pid, m.path, checksum=m.size ^ 0x5A5A, timedatestamp=m.timedatestamp)
        ts += 1
    return w, truth


def _ticks(seconds: float) -> int:
    return int(seconds * PERF_FREQ)


def growth_plan(seed: int = 13, duration_s: float = 60.0) -> dict[str, Site]:
    """The shipped scenario (see the module docstring); deterministic for a seed."""
    rng = random.Random(seed)
    dur = _ticks(duration_s) - 2000

    def uniform(n: int, lo: float, hi: float) -> list[int]:
        return sorted(rng.randrange(_ticks(lo), min(dur, _ticks(hi))) for _ in range(n))

    call_driver = ("nt", 0x1142)
    # the cache: 1,500 entries in the first 10 s; afterwards 3 replacements a second (evict one, add one)
    cache_a = uniform(1500, 0, 10)
    cache_f: list[int | None] = [None] * 1500
    repl = uniform(150, 12, duration_s)
    victims = rng.sample(range(1500), 150)
    for t, v in zip(repl, victims, strict=True):
        cache_f[v] = t
    cache_a += [t + 5 for t in repl]
    cache_f += [None] * len(repl)
    req_a = uniform(1200, 0, duration_s)
    req_f: list[int | None] = [a + rng.randrange(_ticks(0.2), _ticks(1.0)) for a in req_a]
    return {
        "leak": Site("Leak", NONPAGED_NX, 0x100, [NT_ALLOC, ("leaky", 0x1022), ("leaky", 0x11BF), call_driver]
                     + SYSCALL_TAIL, uniform(600, 0, duration_s), [None] * 600, "leak"),
        "cache": Site("MmSt", PAGED, 0x1F0, [NT_ALLOC, ("nt", 0x1287), ("nt", 0x12A5), ("nt", 0x12E4)] + SYSCALL_TAIL,
                      cache_a, cache_f, "plateau"),
        "big_cache": Site("File", NONPAGED_NX, 0xD8, [NT_ALLOC, ("nt", 0x1224), ("nt", 0x1242), ("ntfs", 0x10A4C)]
                          + SYSCALL_TAIL, uniform(2000, 0, 8), [None] * 2000, "plateau"),
        "slow_leak": Site("File", NONPAGED_NX, 0xD8, [NT_ALLOC, ("nt", 0x1224), ("nt", 0x1242), ("ntfs", 0x3F1E0)]
                          + SYSCALL_TAIL, [_ticks(1 + 2 * k) for k in range(int(duration_s // 2) - 1)],
                          [None] * (int(duration_s // 2) - 1), "leak"),
        "burst": Site("Irp ", NONPAGED_NX, 0x118, [NT_ALLOC, ("nt", 0x1103), ("ntfs", 0x1B3C0), call_driver]
                      + SYSCALL_TAIL, uniform(400, duration_s - 5, duration_s - 2), [None] * 400, "transient"),
        "requests": Site("Ntfr", PAGED, 0x2000, [NT_ALLOC, ("ntfs", 0x2A7C1), ("ntfs", 0x28E10), call_driver],
                         req_a, req_f, "transient"),
    }


def growth_sample(seed: int = 13, duration_s: float = 60.0, compressed: bool = False) -> tuple[TraceWriter, dict]:
    """The shipped growth sample: `growth_plan` with the kernel modules of the classic sample (the symbol
    fixtures' ntoskrnl.exe and leaky.sys, so traces/symbols names their functions)."""
    mods = kernel_modules(0)
    return write_planted(growth_plan(seed, duration_s), mods, duration_s=duration_s, compressed=compressed,
                         logfile=r"C:\traces\sample-growth.etl")
