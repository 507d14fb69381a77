"""What is in a trace: one pass over an .etl that counts events by kind, losses, and whether pool
tracing and pool stacks were on — the data behind ``pooltrace info``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pooltrace.baseline import PoolSnapshots, choose
from pooltrace.definitions import definitions
from pooltrace.etl.decode import IS_ALLOC, in_set
from pooltrace.etl.images import count_joined
from pooltrace.etl.reader import EtlReader
from pooltrace.etl.stackkeys import StackKeyResolver
from pooltrace.sidecar import load_sidecar, tag_counters
from pooltrace.tags import format_tag
from pooltrace.verdicts import no_pool_verdict

D = definitions()
H = D.hooks
STACK_SAMPLE = 1_000_000  # pool allocations checked for an attached stack
POOL_BIT_INDEX, POOL_BIT = D.mask_index_bit(D.group_masks["PERF_POOL"])

EVENT_KINDS = {
    "pool_alloc": ["PoolAlloc"], "pool_alloc_session": ["PoolAllocSession"], "pool_free": ["PoolFree"],
    "pool_free_session": ["PoolFreeSession"], "pool_snapshot": [
        "PoolSnapDCStart", "PoolSnapDCEnd", "BigPoolSnapDCStart", "BigPoolSnapDCEnd", "PoolSnapSessionDCStart",
        "PoolSnapSessionDCEnd", "SessionBigPoolSnapDCStart", "SessionBigPoolSnapDCEnd"],
    "stacks": ["Stack"], "stack_key_refs": ["StackKeyKernel", "StackKeyUser"],
    "stack_key_defs": ["StackKeyCreate", "StackKeyDelete", "StackKeyRundown"],
    "image_load": ["ImageLoad"], "image_unload": ["ImageUnload"], "image_rundown": ["ImageDCStart", "ImageDCEnd"],
    "process": ["ProcessStart", "ProcessEnd", "ProcessDCStart", "ProcessDCEnd", "ProcessDefunct"],
    "thread": ["ThreadStart", "ThreadEnd", "ThreadDCStart", "ThreadDCEnd"],
}


def events_by_kind(st) -> dict[str, int]:
    """Record counts of the reader's stats by event kind (EVENT_KINDS), plus KernelTraceControl ImageId
    and debug-id (RSDS and IL-RSDS) records."""
    by = {kind: sum(st.by_hook.get(H[h], 0) for h in hooks) for kind, hooks in EVENT_KINDS.items()}
    ktc = str(D.guids["KernelTraceControl"])
    by["ktc_image_id"] = sum(n for (g, op), n in st.by_classic.items() if g == ktc and op == 0)
    by["ktc_rsds"] = sum(n for (g, op), n in st.by_classic.items() if g == ktc and op in (0x24, 0x25))
    return by


@dataclass
class TraceSummary:
    data: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return self.data["verdict"]


def _iso(dt) -> str | None:
    return dt.isoformat().replace("+00:00", "Z") if dt else None


def summarize(path: str | Path, progress: Callable[[int, int], None] | None = None) -> TraceSummary:
    with EtlReader(path) as reader:
        return _summarize(reader, progress)


def _summarize(reader: EtlReader, progress) -> TraceSummary:
    hdr = reader.header
    st = reader.stats
    resolver = StackKeyResolver()
    tables: dict[str, list[pa.Table]] = {"image": [], "ktc_rsds": [], "ktc_image_id": []}
    masks: list[list[int]] = []
    tags: set[int] = set()
    sample_pool: list[np.ndarray] = []
    sampled = 0
    stack_keys: list[np.ndarray] = []
    snapshots = PoolSnapshots()
    for batch in reader.batches(progress):
        resolver.feed(batch.get("key_refs"), batch.get("key_defs"))
        snapshots.feed(batch)
        for name in tables:
            if batch.get(name) is not None:
                tables[name].append(batch.get(name))
        ext = batch.get("header_extension")
        if ext is not None:
            masks += [[row[f"group_mask_{i}"] for i in range(8)] for row in ext.to_pylist()]
        pool = batch.get("pool")
        if pool is not None:
            tags.update(np.unique(pool["tag"].to_numpy()).tolist())
            if sampled < STACK_SAMPLE:  # recorders take stacks for allocations, frees only on request
                allocs = pool.filter(in_set(IS_ALLOC, pool["hook"].to_numpy()))
                take = allocs.slice(0, STACK_SAMPLE - sampled)
                sample_pool.append(_owner_key(take["cpu"], take["ts"]))
                sampled += take.num_rows
        for name in ("stacks", "key_refs"):
            t = batch.get(name)
            if t is not None:
                stack_keys.append(_owner_key(t["cpu"], t["event_ts"]))
    by = events_by_kind(st)
    images = pa.concat_tables(tables["image"]) if tables["image"] else None
    rsds = pa.concat_tables(tables["ktc_rsds"]) if tables["ktc_rsds"] else None
    by["rsds_joined_to_images"] = count_joined(images, rsds)
    by["stack_key_refs_unresolved"] = resolver.unresolved
    pool_events = sum(by[k] for k in ("pool_alloc", "pool_alloc_session", "pool_free", "pool_free_session"))
    kernel_events = sum(n for h, n in st.by_hook.items() if h >> 8 != 0)
    with_stack = None
    if sampled:
        keys = np.concatenate(stack_keys) if stack_keys else np.zeros(0, np.uint64)
        with_stack = float(np.isin(np.concatenate(sample_pool), keys).mean())
    pool_on = any(m[POOL_BIT_INDEX] & POOL_BIT for m in masks) if masks else None
    data = {
        "file": str(reader.path), "file_size": st.file_size,
        "os": {"version": hdr.os_version, "build": hdr.os_build}, "pointer_size": hdr.pointer_size,
        "cpus": hdr.cpus, "clock": {"type": hdr.clock_name, "ticks_per_second": hdr.ticks_per_second},
        "start_time": _iso(hdr.start_datetime), "end_time": _iso(hdr.end_datetime),
        "boot_time": _iso(hdr.boot_datetime),
        "duration_ns": (int(hdr.ticks_to_ns(st.last_ts)) if st.last_ts is not None and hdr.ticks_per_second
                        else None),
        "logger": hdr.logger_name, "log_file_mode": f"0x{hdr.log_file_mode:x}",
        "compressed": st.compressed_buffers > 0, "buffers": st.buffers, "records": st.records,
        "header_types": dict(sorted(st.by_header_type.items())),
        "kernel_events": kernel_events,
        "events": by,
        "lost": {
            "events_lost": hdr.events_lost, "buffers_lost": hdr.buffers_lost,
            "buffers_flagged_events_lost": st.buffers_flagged_events_lost,
            "buffers_flagged_buffer_lost": st.buffers_flagged_buffer_lost,
            "buffers_skipped": st.buffers_skipped, "bytes_skipped": st.bytes_skipped,
            "malformed_records": dict(st.malformed),
        },
        "pool": {
            "tracing_enabled": pool_on, "events": pool_events,
            "stacks_enabled": None if with_stack is None else with_stack > 0,
            "stack_ratio": with_stack, "events_checked_for_stack": sampled,
            "distinct_tags": len(tags),
            "tag_filter": sorted(format_tag(t) for t in tags) if 0 < len(tags) <= 4 else None,
        },
        "warnings": list(st.warnings),
    }
    data["baseline"] = _baseline(reader, snapshots, data["warnings"])
    data["verdict"] = _verdict(data)
    return TraceSummary(data)


def _baseline(reader: EtlReader, snapshots: PoolSnapshots, warnings: list[str]) -> dict:
    """Bytes in use per tag at the start and the stop, and where that comes from: the recorder's sidecar
    (wins when present) or the kernel's pool snapshot in the trace."""
    sidecar, problems = load_sidecar(reader.path)
    warnings.extend(problems)
    tags, source = choose(tag_counters(sidecar), snapshots)
    return {"source": source, "tags": tags, "pool_snapshot": snapshots.summary()}


def _owner_key(cpu: pa.ChunkedArray, ts: pa.ChunkedArray) -> np.ndarray:
    """(cpu, timestamp) folded into one uint64: the key that ties a stack to its event (etl-format.md §2.2)."""
    return (ts.to_numpy().astype(np.uint64) * np.uint64(4099)) ^ cpu.to_numpy().astype(np.uint64)


def _verdict(d: dict) -> str:
    lost = d["lost"]
    none = no_pool_verdict(d["pool"]["events"], d["kernel_events"], d["logger"], d["pool"]["tracing_enabled"],
                           bool(d["warnings"]))
    if none is not None:
        v = none
    elif not d["pool"]["stacks_enabled"]:
        v = ("pool events without stacks: leaks can be found by tag but not by call stack; record with pool "
             "stacks (`pooltrace record` enables them)")
    else:
        v = "pool events with stacks: ready for `pooltrace report`"
    n_lost = lost["events_lost"] + lost["buffers_lost"] + lost["buffers_skipped"]
    if n_lost:
        v += (f"; WARNING: {lost['events_lost']} events and {lost['buffers_lost']} buffers lost while recording, "
              f"{lost['buffers_skipped']} buffers unreadable")
    if d["warnings"] or lost["bytes_skipped"]:
        # a truncated or damaged file is never just "ready": say what is missing
        what = d["warnings"][0] if d["warnings"] else "damaged records"
        more = f" (+{len(d['warnings']) - 1} more warnings)" if len(d["warnings"]) > 1 else ""
        skipped = f"{lost['bytes_skipped']:,} bytes not read: " if lost["bytes_skipped"] else ""
        v += f"; DAMAGED: {skipped}{what}{more}"
    return v
