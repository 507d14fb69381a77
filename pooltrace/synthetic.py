"""Realistic synthetic pool-leak scenarios written as byte-exact .etl files (through etl.writer), with
their ground truth. Used by the shipped sample traces (traces/generate.py), the tests and the
benchmarks.

The "classic" scenario: a driver (leaky.sys) allocates tag ``Leak`` at two call sites; one of them never
frees (the leak), the other frees after a while. Around it, normal kernel traffic with the tags ``Irp ``,
``MmSt``, ``File``, ``Ntfr`` and session-pool ``Gh05`` allocations, which are freed (a few stay
outstanding at the end, as in any real trace). Image, process and thread rundown name every module.
"""

from __future__ import annotations

import heapq
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field

from pooltrace.etl.writer import TraceWriter

HOOK = {"alloc": 0x0E20, "alloc_session": 0x0E21, "free": 0x0E22, "free_session": 0x0E23}
NONPAGED_NX, PAGED = 0x200, 0x1
BIG_POOL = 0x10000000  # the kernel marks blocks above 0xFE0 bytes
BIG_BLOCK = 0xFE0
PERF_FREQ = 10_000_000


@dataclass(frozen=True)
class Module:
    name: str
    base: int
    size: int
    path: str
    pdb: str
    guid: uuid.UUID
    age: int = 1
    timedatestamp: int = 0x5F3E1A2B
    pid: int = 0


def kernel_modules(shift: int = 0) -> dict[str, Module]:
    """Kernel images; `shift` moves every base (a different boot / ASLR layout)."""
    k = 0xFFFFF80412000000 + shift
    return {
        # nt and leaky are the symbol fixtures (tests/fixtures/symbols, layout.json): their real SizeOfImage,
        # TimeDateStamp and PDB identity, so the sample reports resolve with the PDBs in traces/symbols
        "nt": Module("ntoskrnl.exe", k, 0x6000, r"\SystemRoot\system32\ntoskrnl.exe", "ntkrnlmp.pdb",
                     uuid.UUID("b739d544-1a8e-bb9e-4c4c-44205044422e"), age=1, timedatestamp=0x5F80B584),
        "hal": Module("hal.dll", k + 0x2000000, 0x6F000, r"\SystemRoot\system32\hal.dll", "hal.pdb",
                      uuid.UUID("0b1d4c1e-6d67-4b59-9d9e-7c4a0d53a8b1")),
        "ntfs": Module("Ntfs.sys", k + 0x3000000, 0x2F9000, r"\SystemRoot\System32\Drivers\Ntfs.sys", "ntfs.pdb",
                       uuid.UUID("f5a3b0f6-2c4c-4b0f-8b5e-5d1c7e3f2a11")),
        "leaky": Module("leaky.sys", k + 0x7A40000, 0x5000, r"\??\C:\drivers\leaky.sys", "leaky.pdb",
                        uuid.UUID("8ac9c1fc-370f-91ac-4c4c-44205044422e"), age=2, timedatestamp=0x6A7D8326),
        "w32k": Module("win32kbase.sys", 0xFFFFF96000000000 + shift, 0x2A0000,
                       r"\SystemRoot\System32\win32kbase.sys", "win32kbase.pdb",
                       uuid.UUID("a1b2c3d4-e5f6-4711-8899-aabbccddeeff")),
    }


# Call sites as (module key, rva) frames, innermost first; the first frame is inside ntoskrnl's allocator.
# Every nt/leaky frame is the return address after a call instruction in the fixture images (layout.json
# "calls"), so the sample reports show the functions that really make those calls.
NT_ALLOC = ("nt", 0x108D)  # ExAllocatePoolWithTag+0x4d, after its call to ExAllocateHeapPool
SYSCALL_TAIL = [("nt", 0x1161),  # IopSynchronousServiceTail+0x11
                ("nt", 0x119E),  # IopXxxControlFile+0x2e
                ("nt", 0x11C7),  # NtDeviceIoControlFile+0x17
                ("nt", 0x11ED)]  # KiSystemServiceCopyEnd+0x1d


def _sites() -> dict[str, dict]:
    call_driver = ("nt", 0x1142)  # IofCallDriver+0x22, after calling the driver's dispatch routine
    return {
        "leak": {"tag": "Leak", "pool": NONPAGED_NX, "size": 0x100,  # AllocateLeakyBuffer+0x22, DispatchIoctl+0x2f
                 "frames": [NT_ALLOC, ("leaky", 0x1022), ("leaky", 0x11BF), call_driver] + SYSCALL_TAIL},
        "leak_ok": {"tag": "Leak", "pool": NONPAGED_NX, "size": 0x60,  # AllocateScratchBuffer+0x1d, DispatchIoctl+0x5d
                    "frames": [NT_ALLOC, ("leaky", 0x10BD), ("leaky", 0x11ED), call_driver] + SYSCALL_TAIL},
        "new_leak": {"tag": "Lea2", "pool": PAGED, "size": 0x40,  # AllocateTelemetry+0x1d, DispatchIoctl+0x4d
                     "frames": [NT_ALLOC, ("leaky", 0x110D), ("leaky", 0x11DD), call_driver] + SYSCALL_TAIL},
        "irp": {"tag": "Irp ", "pool": NONPAGED_NX, "size": 0x118,  # IoAllocateIrp+0x33
                "frames": [NT_ALLOC, ("nt", 0x1103), ("ntfs", 0x1B3C0), call_driver] + SYSCALL_TAIL},
        "mmst": {"tag": "MmSt", "pool": PAGED, "size": 0x1F0,  # MiCreateImageFileMap, MmCreateSection, NtCreateSection
                 "frames": [NT_ALLOC, ("nt", 0x1287), ("nt", 0x12A5), ("nt", 0x12E4)] + SYSCALL_TAIL},
        "file": {"tag": "File", "pool": NONPAGED_NX, "size": 0xD8,  # ObpAllocateObject+0x24, ObCreateObject+0x12
                 "frames": [NT_ALLOC, ("nt", 0x1224), ("nt", 0x1242), ("ntfs", 0x10A4C)] + SYSCALL_TAIL},
        "ntfr": {"tag": "Ntfr", "pool": PAGED, "size": 0x2000,
                 "frames": [NT_ALLOC, ("ntfs", 0x2A7C1), ("ntfs", 0x28E10), call_driver]},
        "gh05": {"tag": "Gh05", "pool": PAGED | 0x20, "size": 0x80, "session": 1,
                 "frames": [NT_ALLOC, ("w32k", 0x2C1F0), ("w32k", 0x2B0A4)] + SYSCALL_TAIL},
    }


@dataclass
class Truth:
    """What a scenario planted: per call site allocation, free and outstanding counts and bytes."""

    allocs: Counter = field(default_factory=Counter)
    frees: Counter = field(default_factory=Counter)
    outstanding: Counter = field(default_factory=Counter)
    outstanding_bytes: Counter = field(default_factory=Counter)
    stacks: int = 0
    records: int = 0
    lost_free: int = 0
    free_without_alloc: int = 0
    # the kernel's pool snapshot: per tag, bytes in use at the start and the stop per pool
    # ({"Leak": {"start": {"paged_bytes", "nonpaged_bytes"}, "stop": {...}}}) and the big blocks before the
    # trace that it frees ([{"address", "tag", "size"}])
    baseline: dict = field(default_factory=dict)
    pre_trace_big_frees: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"allocs": dict(self.allocs), "frees": dict(self.frees), "outstanding": dict(self.outstanding),
                "outstanding_bytes": dict(self.outstanding_bytes), "stacks": self.stacks, "records": self.records,
                "lost_free": self.lost_free, "free_without_alloc": self.free_without_alloc,
                "baseline": self.baseline, "pre_trace_big_frees": self.pre_trace_big_frees}

    def expected_pair(self) -> dict:
        """The pairing diagnostics `pooltrace pair` must report for this scenario."""
        allocs = sum(self.allocs.values())
        return {"allocs": allocs, "frees": sum(self.frees.values()) + self.free_without_alloc,
                "outstanding": {"count": sum(self.outstanding.values()),
                                "bytes": sum(self.outstanding_bytes.values())},
                "lost_free": self.lost_free, "free_without_alloc": self.free_without_alloc,
                "allocations_with_stack": allocs, "allocations_without_stack": 0,
                "stack_events_attached": self.stacks, "stack_events_with_no_owner": 0}


USER_IMAGE = Module("leakapp.exe", 0x7FF6A1B20000, 0x24000, r"\Device\HarddiskVolume3\tools\leakapp.exe",
                    "leakapp.pdb", uuid.UUID("11223344-5566-4778-899a-abbccddeeff0"), pid=4242)
USER_FRAMES = [0x7FFE1C8CD0C4, USER_IMAGE.base + 0x1A2B, USER_IMAGE.base + 0x2C3D, 0x7FFE1B4E7034]


def classic_leak(*, fixed: bool = False, new_leak: bool = False, scale: int = 1, cpus: int = 2,
                 pointer_size: int = 8, compressed: bool = False, seed: int = 1, shift: int = 0,
                 duration_s: float = 10.0, with_user_stacks: bool = True, debug_ids: bool | None = None,
                 lost_frees: int = 3, frees_before: int = 40,
                 pool_header: str = "system", snapshots: bool = True) -> tuple[TraceWriter, Truth]:
    """The classic case. `fixed` makes the leaking site free its blocks; `new_leak` plants a second leak
    (tag Lea2); `scale` multiplies the event volume; `shift` moves kernel module bases (ASLR).
    `debug_ids` (default: when compressed, i.e. a merged trace) adds KernelTraceControl ImageId and
    DbgID_RSDS records; `lost_frees` free events are dropped (counted in the header's EventsLost) and
    their addresses reused; `frees_before` frees hit blocks allocated before the trace. Pool records have a
    SYSTEM header with the thread and process, as the kernel writes them; `pool_header="perfinfo"` writes
    the PERFINFO variant without them (the stacks then name the thread). `snapshots` adds the kernel's pool
    snapshot at the start and the stop (PoolSnap per-tag counters, BigPoolSnap big blocks), with big blocks
    allocated before the trace, one of which the trace frees (its free event names neither tag nor size)."""
    if pointer_size != 8:
        raise ValueError("the classic scenario is an x64 trace; see tests for x86 traces")
    rng = random.Random(seed)
    mods = kernel_modules(shift)
    sites = _sites()
    start = 1_000_000_000
    w = TraceWriter(pointer_size=8, cpus=cpus, compressed=compressed, perf_freq=PERF_FREQ, start_qpc=start,
                    os_build=19045, logger_name="pooltrace", logfile_name=r"C:\traces\sample-leak.etl",
                    events_lost=lost_frees)
    if debug_ids is None:
        debug_ids = compressed
    truth = Truth()

    def pool(cpu: int, ts: int, hook: int, s: dict, addr: int, pid: int, tid: int) -> None:
        ids = {"tid": tid, "pid": pid} if pool_header != "perfinfo" else {}
        pool_type = s["pool"] | (BIG_POOL if s["size"] > BIG_BLOCK else 0)  # as the kernel marks big blocks
        w.pool(cpu, ts, hook, pool_type, s["tag"], s["size"], addr, s.get("session"), header=pool_header, **ids)
    # rundown at the start: images (kernel, then the app), processes, threads
    ts = start + 10
    for m in list(mods.values()) + [USER_IMAGE]:
        if debug_ids:  # merged traces: same timestamp as the image event (etl-format.md §2.5)
            w.ktc_image_id(0, ts, m.base, m.size, m.pid, m.timedatestamp, m.name)
            w.ktc_rsds(0, ts, m.base, m.pid, m.guid, m.age, m.pdb)
        w.image(0, ts, 0x1403, m.base, m.size, m.pid, m.path, checksum=m.size ^ 0x5A5A, timedatestamp=m.timedatestamp)
        ts += 1
    w.process(0, ts, 0x0303, 4, 0, "System", "")
    w.process(0, ts + 1, 0x0303, 4242, 1000, "leakapp.exe", r'"C:\tools\leakapp.exe" --ioctl 0x222003 --loop',
              session_id=1)
    threads = {4: [8, 12, 16], 4242: [5100, 5104]}
    for pid, tids in threads.items():
        for tid in tids:
            w.thread(0, ts + 2, 0x0503, pid, tid, name="worker" if pid == 4 else None)
    end = start + int(duration_s * PERF_FREQ)
    # allocation plan: (site, count)
    plan = {"leak": 500, "leak_ok": 300, "irp": 2000, "mmst": 800, "file": 1200, "ntfr": 150, "gh05": 200}
    if new_leak:
        plan["new_leak"] = 250
    plan = {k: v * scale for k, v in plan.items()}
    live: dict[int, tuple] = {}
    free_addrs: list[int] = []
    next_addr = [0xFFFFA28000000000]
    events = []
    for site, n in plan.items():
        for _ in range(n):
            events.append((rng.randrange(start + 1000, end - PERF_FREQ // 2), site))
    events.sort()
    pending_frees: list[tuple[int, int, str, int, int]] = []  # (free ts, addr, site, pid, tid)
    never_freed = {"leak"} if not fixed else set()
    if new_leak:
        never_freed.add("new_leak")

    def alloc_addr(size: int) -> int:
        if reuse:  # reuse a block whose free was lost right away: that makes the lost free visible
            return reuse.pop()
        if free_addrs and rng.random() < 0.7:
            return free_addrs.pop(rng.randrange(len(free_addrs)))
        a = next_addr[0]
        next_addr[0] += (size + 0x1F) & ~0xF
        return a

    dropped = [0]
    reuse: set[int] = set()

    def flush_frees(until: int) -> None:
        while pending_frees and pending_frees[0][0] <= until:
            fts, addr, site, fpid, ftid = heapq.heappop(pending_frees)
            s = sites[site]
            cpu = rng.randrange(cpus)
            if site == "irp" and dropped[0] < lost_frees:  # the free event is lost; the block is reused
                dropped[0] += 1
                truth.lost_free += 1
                live.pop(addr, None)
                reuse.add(addr)
                continue
            hook = HOOK["free_session"] if "session" in s else HOOK["free"]
            pool(cpu, fts, hook, s, addr, fpid, ftid)
            truth.frees[site] += 1
            live.pop(addr, None)
            free_addrs.append(addr)

    last = start
    for ets, site in events:
        ets = max(ets, last + 1)  # distinct timestamps per event keep the ground truth simple
        last = ets
        flush_frees(ets - 1)
        s = sites[site]
        cpu = rng.randrange(cpus)
        addr = alloc_addr(s["size"])
        pid = 4242 if site in ("leak", "leak_ok", "new_leak", "gh05") else 4
        tid = rng.choice(threads[pid])
        hook = HOOK["alloc_session"] if "session" in s else HOOK["alloc"]
        pool(cpu, ets, hook, s, addr, pid, tid)
        frames = [mods[m].base + rva for m, rva in s["frames"]]
        w.stack(cpu, ets, ets, pid, tid, frames)
        truth.stacks += 1
        if with_user_stacks and pid == 4242:  # the syscall returns to user mode: a user part follows
            w.stack(cpu, ets + rng.randrange(5, 4000), ets, pid, tid, USER_FRAMES)
            truth.stacks += 1
        truth.allocs[site] += 1
        live[addr] = (site,)
        lifetime_free = site not in never_freed and rng.random() > 0.02  # 2 % of normal traffic outlives the trace
        if lifetime_free:
            fts = ets + rng.randrange(100, PERF_FREQ // 4)
            if fts < end:
                heapq.heappush(pending_frees, (fts, addr, site, pid, tid))
                continue
        # stays outstanding: remember it so its address is not reused
    flush_frees(end)
    # frees of blocks allocated before the trace began (AOFI)
    for k in range(frees_before):
        fts = start + 500 + k * 997
        pool(k % cpus, fts, HOOK["free"], sites["irp"], 0xFFFFA27000000000 + 0x200 * k, 4, threads[4][k % 3])
        truth.free_without_alloc += 1
    for (site,) in live.values():
        truth.outstanding[site] += 1
        truth.outstanding_bytes[site] += sites[site]["size"]
    if snapshots:
        _plant_snapshots(w, truth, sites, live, start, end, cpus, frees_before,
                         lambda cpu, ts, addr: pool(cpu, ts, HOOK["free"], {"pool": PAGED | BIG_POOL, "tag": 0,
                                                                            "size": 0}, addr, 4, threads[4][0]))
    # rundown at the end
    ts = end + 100
    for m in list(mods.values()) + [USER_IMAGE]:
        w.image(1 % cpus, ts, 0x1404, m.base, m.size, m.pid, m.path, checksum=m.size ^ 0x5A5A,
                timedatestamp=m.timedatestamp)
        ts += 1
    truth.records = w.record_count
    return w, truth


# Tag counters before the trace: (outstanding blocks, bytes per block) for the scenario's tags, plus the
# kernel's own tracking tables (tag Pool) and enough other tags that the snapshot spans several events.
_PRE_TRACE = {"Leak": (12, 0x100), "Irp ": (400, 0x118), "MmSt": (90, 0x1F0), "File": (700, 0xD8),
              "Ntfr": (3, 0x2000), "Lea2": (0, 0x40), "Pool": (2, 0x3000)}
_BIG_BEFORE = [(0xFFFFA26000000000, "Ntfr", 0x2000, False), (0xFFFFA26000010000, "Ntfr", 0x2000, False),
               (0xFFFFA26000020000, "Ntfr", 0x2000, False), (0xFFFFA26000030000, "Pool", 0x3000, True),
               (0xFFFFA26000040000, "Pool", 0x3000, True)]
_FREED_BIG = 0  # index into _BIG_BEFORE of the pre-trace block the trace frees


def _plant_snapshots(w: TraceWriter, truth: Truth, sites: dict, live: dict, start: int, end: int, cpus: int,
                     frees_before: int, free_event) -> None:
    """PoolSnap/BigPoolSnap at the start and the stop, consistent with the trace's events: at the stop
    each tag has the allocations and frees of the trace added (lost free events included: the kernel
    counted those frees) and its bytes changed by what stayed outstanding and what pre-trace blocks were
    freed. Session pool (Gh05) has its own snapshot, per session."""
    counters: dict[str, list[int]] = {}  # tag -> [paged allocs, frees, used, nonpaged allocs, frees, used]
    paged_tag = {s["tag"]: bool(s["pool"] & PAGED) for s in sites.values() if "session" not in s}
    paged_tag["Pool"] = False
    for k, (tag, (n, size)) in enumerate(_PRE_TRACE.items()):
        at = 0 if paged_tag[tag] else 3
        c = [0] * 6
        c[at:at + 3] = [50_000 + 7 * k + n, 50_000 + 7 * k, n * size]
        counters[tag] = c
    for i in range(110):  # other kernel tags, unchanged during the trace
        counters[f"K{i:03d}"] = [1000 + i, 990, 0x80 * (i + 1), 20 + i, 20, 0x40 * i]
    start_counters = {t: list(c) for t, c in counters.items()}
    # what the trace changed
    for site, n in truth.allocs.items():
        s = sites[site]
        if "session" in s:
            continue
        at = 0 if paged_tag[s["tag"]] else 3
        counters[s["tag"]][at] += n
        counters[s["tag"]][at + 1] += truth.frees[site] + (truth.lost_free if site == "irp" else 0)
        counters[s["tag"]][at + 2] += truth.outstanding_bytes[site]
    counters["Irp "][4] += frees_before
    counters["Irp "][5] -= frees_before * sites["irp"]["size"]
    addr, tag, size, _ = _BIG_BEFORE[_FREED_BIG]
    counters[tag][1] += 1
    counters[tag][2] -= size
    free_event(1 % cpus, start + 600, addr)
    truth.free_without_alloc += 1
    truth.pre_trace_big_frees.append({"address": addr, "tag": tag, "size": size})
    # session pool (older kernels log one snapshot per session): Gh05 in session 1, paged
    gh05 = sites["gh05"]
    session_start = [3000 + 30, 3000, 30 * gh05["size"]]
    session_stop = [session_start[0] + truth.allocs["gh05"], session_start[1] + truth.frees["gh05"],
                    session_start[2] + truth.outstanding_bytes["gh05"]]
    for when, snap, sess, ts in (("start", start_counters, session_start, start + 20),
                                 ("stop", counters, session_stop, end + 50)):
        w.pool_snapshot(0, ts, [(t, *c) for t, c in snap.items()], end=when == "stop")
        w.pool_snapshot(0, ts, [(gh05["tag"], *sess, 0, 0, 0)], end=when == "stop", session_id=gh05["session"])
        for t, c in snap.items():
            truth.baseline.setdefault(t, {})[when] = {"paged_allocs": c[0] - c[1], "paged_bytes": c[2],
                                                       "nonpaged_allocs": c[3] - c[4], "nonpaged_bytes": c[5]}
        truth.baseline.setdefault(gh05["tag"], {})[when] = {
            "paged_allocs": 0, "paged_bytes": 0, "nonpaged_allocs": 0, "nonpaged_bytes": 0,
            "session_allocs": sess[0] - sess[1], "session_bytes": sess[2]}
    big_start = [(a, size, tag, nonpaged) for a, tag, size, nonpaged in _BIG_BEFORE]
    big_stop = [b for k, b in enumerate(big_start) if k != _FREED_BIG]
    big_stop += sorted((a, sites[site]["size"], sites[site]["tag"], not sites[site]["pool"] & PAGED)
                       for a, (site,) in live.items() if sites[site]["size"] > BIG_BLOCK)
    w.big_pool_snapshot(0, start + 21, big_start)
    w.big_pool_snapshot(0, end + 51, big_stop, end=True)
