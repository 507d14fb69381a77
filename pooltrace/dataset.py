"""`pooltrace pair`: read a trace once, attach stacks, pair allocations with frees, and write the
dataset users analyze (schema in README.md, "Dataset"):

    allocations.parquet  one row per allocation seen through its alloc and/or free event
    stacks.parquet       stack_id, frames (innermost first), deduplicated
    modules.parquet      every image seen, with its PDB identity when the trace carries it
    trace.json           trace facts, events by kind, losses and pairing diagnostics

Memory holds the open allocations, the distinct stacks and a short window of recent events, not the
whole trace. The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pooltrace import __version__
from pooltrace.baseline import PoolSnapshots, choose, fill_free_without_alloc
from pooltrace.datasetopen import NULL_NS
from pooltrace.datasetschema import ALLOCATIONS_SCHEMA, MODULES_SCHEMA, STACKS_SCHEMA
from pooltrace.definitions import definitions
from pooltrace.errors import OutputError
from pooltrace.etl.columns import Columns
from pooltrace.etl.decode import IS_ALLOC, IS_SESSION, in_set
from pooltrace.etl.images import join_debug_ids
from pooltrace.etl.reader import EtlReader
from pooltrace.etl.workerstart import decode_jobs, start_for
from pooltrace.outputs import TMP_PREFIX, check_dataset_dir, install_dataset, os_reason
from pooltrace.pairing import (
    CLOSED_FREE,
    CLOSED_LOST_FREE,
    FREE_WITHOUT_ALLOC,
    NO_STACK,
    NO_TS,
    OUTSTANDING,
    Pairer,
    PoolEvents,
)
from pooltrace.pairoptions import DEFAULT_WINDOW_S
from pooltrace.sidecar import load_sidecar, merge_pdb_identities, tag_counters
from pooltrace.stackjoin import StackJoiner
from pooltrace.summary import NAME as SUMMARY_NAME
from pooltrace.summary import crc_read, write_summary
from pooltrace.summaryscan import COLUMNS as SCAN_COLUMNS
from pooltrace.summaryscan import RowScan
from pooltrace.tags import format_tag
from pooltrace.traceinfo import POOL_BIT, POOL_BIT_INDEX, events_by_kind
from pooltrace.verdicts import no_pool_verdict

D = definitions()
H = D.hooks
FATES = {CLOSED_FREE: "freed", CLOSED_LOST_FREE: "lost_free", FREE_WITHOUT_ALLOC: "free_without_alloc",
         OUTSTANDING: "outstanding"}
ROW_GROUP = 1 << 19  # allocation rows per Parquet row group
CHUNK_BYTES = 4 << 20  # buffers decoded together (the unit of work of a decode process)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pool_events(t: Columns) -> PoolEvents:
    """The joiner's released pool events (numpy columns, session_id 0 where null) as pairing input."""
    c = t.cols
    hook = c["hook"]
    session = in_set(IS_SESSION, hook)
    sid = c["session_id"].astype(np.uint32, copy=False)
    return PoolEvents(
        ts=c["ts"], alloc=in_set(IS_ALLOC, hook),
        namespace=np.where(session, sid.astype(np.int64) + 1, 0), address=c["entry"],
        tag=c["tag"], pool_type=c["pool_type"], size=c["size"],
        session_id=np.where(session, sid, np.uint32(0xFFFFFFFF)).astype(np.uint32), cpu=c["cpu"],
        pid=c["pid"], tid=c["tid"], stack=c["stack"])


# a row group's columns as written (before Arrow; the tags as raw values), filled part by part; nulls are
# masks (the values under a mask never reach the file: times hold NULL_NS and stacks -1 there, as datasetopen
# reads them back, so that the summary's scan can take SCANNED as they are)
_GROUP_COLUMNS = {"tag": np.uint32, "pool_type": np.uint32, "paged": np.bool_, "session": np.bool_,
                  "session_id": np.uint32, "size": np.uint64, "address": np.uint64, "alloc_null": np.bool_,
                  "alloc_ns": np.int64, "free_null": np.bool_, "free_ns": np.int64, "kind": np.int8, "pid": np.uint32,
                  "tid": np.uint32, "cpu": np.uint16, "alloc_stack": np.int64, "stack_null": np.bool_,
                  "free_stack": np.int64, "free_stack_null": np.bool_}
SCANNED = tuple(SCAN_COLUMNS)


class _RowWriter:
    def __init__(self, path: Path, to_ns: Callable[[np.ndarray], np.ndarray], scan: RowScan | None = None):
        # snappy, dictionaries and statistics only where they serve queries: 3x faster than the defaults
        self.writer = pq.ParquetWriter(path, ALLOCATIONS_SCHEMA, compression="snappy", use_dictionary=["tag", "fate"],
                                       write_statistics=["tag", "size", "alloc_ns", "free_ns", "pid"])
        self.to_ns = to_ns
        self.scan = scan  # given each row group's SCANNED columns (pooltrace.summaryscan)
        # the file's size and CRC-32 (the summary's identity of it), read back as each row group is written
        self._readback = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close)
        self.size, self.crc = 0, 0
        self._known = np.zeros(0, dtype=np.uint32)  # every tag seen, ascending, and its name
        self._names = pa.array([], pa.string())
        self.rows = 0
        self.with_stack = 0
        self.without_stack = 0
        self.snapshots: PoolSnapshots | None = None  # big blocks at the start size pre-trace frees
        self.sized_from_snapshot = 0
        self._pending_rows = 0  # rows queued for the next row group
        # the rows are converted (into self._cols) and their row groups encoded and written by one thread, in
        # order, while this one pairs the next batches: Parquet encoding releases the GIL, and when the last
        # batch is paired only its own rows are left to convert
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pooltrace-parquet")
        self._inflight: Future | None = None
        self._cols: dict[str, np.ndarray] = {}  # reused from group to group, but SCANNED when given to the scan
        self._filled = 0
        self._tag_parts: list[pa.StringArray] = []  # the next group's tag names, part by part ...
        self._tag_order: dict[int, str] = {}  # ... and its distinct tags in the order of their first row, named
        self._error: BaseException | None = None  # of a conversion, raised by the next row group's write

    def write(self, rows: Columns) -> None:
        """Queue rows; they are written in row groups of about ROW_GROUP rows (fewer, larger groups write
        and read faster than one per batch; row order is kept)."""
        if not len(rows):
            return
        if self.snapshots is not None:  # now, with the snapshots seen so far
            c = rows.cols
            self.sized_from_snapshot += fill_free_without_alloc(c["kind"], c["address"], c["size"], c["tag"],
                                                                self.snapshots.big_blocks(), FREE_WITHOUT_ALLOC)
        self._thread.submit(self._add, rows)
        self._pending_rows += len(rows)
        if self._pending_rows >= ROW_GROUP:
            self._flush()

    def flush(self) -> None:
        """Start writing the rows queued as the last row group (close waits for it)."""
        self._flush(last=True)

    def _flush(self, last: bool = False) -> None:
        if not self._pending_rows:
            return
        self._pending_rows = 0
        self._wait()
        self._inflight = self._thread.submit(self._write_group, last)

    def _wait(self) -> None:
        """Wait for the row group being written (its error, if any, is raised here)."""
        if self._inflight is not None:
            done, self._inflight = self._inflight, None
            done.result()

    def _add(self, rows: Columns) -> None:
        """Convert queued rows into the next row group's columns (on the writer's thread)."""
        if self._error is not None:
            return
        try:
            c = rows.cols
            n = len(rows)
            at = self._filled
            self._room(at + n)
            out = {name: a[at:at + n] for name, a in self._cols.items()}
            alloc_known = c["alloc_ts"] != NO_TS
            free_known = c["free_ts"] != NO_TS
            np.logical_not(alloc_known, out=out["alloc_null"])
            np.logical_not(free_known, out=out["free_null"])
            out["alloc_ns"][:] = np.where(alloc_known, self.to_ns(np.where(alloc_known, c["alloc_ts"], 0)), NULL_NS)
            out["free_ns"][:] = np.where(free_known, self.to_ns(np.where(free_known, c["free_ts"], 0)), NULL_NS)
            np.not_equal(c["session_id"], 0xFFFFFFFF, out=out["session"])
            has_stack = c["alloc_stack"] != NO_STACK
            np.logical_not(has_stack, out=out["stack_null"])
            np.equal(c["free_stack"], NO_STACK, out=out["free_stack_null"])
            self.with_stack += int((has_stack & alloc_known).sum())
            self.without_stack += int((~has_stack & alloc_known).sum())
            for name in ("tag", "pool_type", "session_id", "size", "address", "kind", "pid", "tid", "cpu",
                         "alloc_stack", "free_stack"):
                out[name][:] = c[name]
            out["paged"][:] = c["pool_type"] & 1
            names, distinct, pos = self._tags(c["tag"])
            self._tag_parts.append(names)
            for raw, p in zip(distinct.tolist(), pos.tolist(), strict=True):
                if raw not in self._tag_order:
                    self._tag_order[raw] = self._names[p].as_py()
            self._filled += n
        except BaseException as exc:  # noqa: BLE001 (raised by the row group's write, on the caller's thread)
            self._error = exc

    def _room(self, n: int) -> None:
        """Columns for at least n rows (the rows filled so far kept)."""
        cap = max(n, ROW_GROUP + (ROW_GROUP >> 2))
        for name, dtype in _GROUP_COLUMNS.items():
            have = self._cols.get(name)
            if have is None or len(have) < n:
                a = np.empty(max(cap, 2 * len(have)) if have is not None else cap, dtype=dtype)
                if have is not None:
                    a[:self._filled] = have[:self._filled]
                self._cols[name] = a

    def _tags(self, tags: np.ndarray) -> tuple[pa.StringArray, np.ndarray, np.ndarray]:
        """Tag names of rows, from every tag seen so far (a few dozen): the distinct tags found by Arrow's
        hash (dictionary_encode), only those searched in the sorted known tags, no sort of the rows. Also the
        distinct tags, in the order of their first row, and their positions in the names."""
        enc = pa.array(tags, type=pa.uint32()).dictionary_encode()
        distinct = enc.dictionary.to_numpy()
        pos = np.searchsorted(self._known, distinct)
        found = pos < len(self._known)
        found[found] = self._known[pos[found]] == distinct[found]
        if not found.all():
            self._known = np.union1d(self._known, distinct[~found]).astype(np.uint32)
            self._names = pa.array([format_tag(t) for t in self._known.tolist()])
            pos = np.searchsorted(self._known, distinct)
        return self._names.take(pa.array(pos.astype(np.int32)[enc.indices.to_numpy()])), distinct, pos

    def _write_group(self, last: bool = False) -> None:
        if self._error is not None:
            raise self._error
        n, self._filled = self._filled, 0
        c = {name: a[:n] for name, a in self._cols.items()}
        tags = pa.concat_arrays(self._tag_parts) if len(self._tag_parts) > 1 else self._tag_parts[0]
        order, self._tag_parts, self._tag_order = self._tag_order, [], {}
        fate = pa.DictionaryArray.from_arrays(pa.array(c["kind"]), pa.array([FATES[k] for k in range(4)]))
        table = pa.Table.from_arrays([
            tags, pa.array(c["pool_type"]), pa.array(c["paged"]), pa.array(c["session"]),
            pa.array(c["session_id"], mask=~c["session"]), pa.array(c["size"]), pa.array(c["address"]),
            pa.array(c["alloc_ns"], mask=c["alloc_null"]), pa.array(c["free_ns"], mask=c["free_null"]), fate,
            pa.array(c["pid"]), pa.array(c["tid"]), pa.array(c["cpu"]),
            pa.array(c["alloc_stack"], mask=c["stack_null"]), pa.array(c["free_stack"], mask=c["free_stack_null"]),
        ], schema=ALLOCATIONS_SCHEMA)
        if self.scan is not None:  # the scan keeps its columns: the next group gets new ones
            self.scan.add(self.rows, {name: c[name] for name in SCANNED}, np.array(list(order), dtype=np.uint32),
                          list(order.values()), last)
            for name in SCANNED:
                del self._cols[name]
        self.writer.write_table(table)
        del table, tags, fate
        self.rows += n
        self._read_back()

    def _read_back(self) -> None:
        """Add the bytes written since the last call to the file's size and CRC-32 (a Parquet file is written
        front to back, its footer last)."""
        self.size, self.crc = crc_read(self._readback, self.size, self.crc)

    def close(self) -> None:
        try:
            self._flush()
            self._wait()
            if self._error is not None:
                raise self._error
        finally:
            self._thread.shutdown(wait=True)
            try:
                self.writer.close()
                self._read_back()  # the footer
            finally:
                self._readback.close()


def _module_row(r: dict, load_ns: int | None) -> dict:
    """A modules.parquet row from a joined image event (join_debug_ids already named the file)."""
    return {"base": r["base"], "size": r["size"], "name": r["name"], "path": r["filename"], "pid": r["pid"],
            "timedatestamp": r["timedatestamp"], "checksum": r["checksum"], "pdb_name": r["pdb_name"],
            "pdb_guid": r["pdb_guid"], "pdb_age": r["pdb_age"], "load_ns": load_ns, "unload_ns": None}


def _modules(tables: dict[str, list[pa.Table]], to_ns) -> pa.Table:
    images = pa.concat_tables(tables["image"]) if tables["image"] else None
    if images is None:
        return MODULES_SCHEMA.empty_table()
    rsds = pa.concat_tables(tables["ktc_rsds"]) if tables["ktc_rsds"] else None
    ids = pa.concat_tables(tables["ktc_image_id"]) if tables["ktc_image_id"] else None
    joined = join_debug_ids(images, rsds, ids).to_pylist()
    open_: dict[tuple[int, int], dict] = {}
    out: list[dict] = []
    for r in joined:  # time order; a few thousand rows
        key = (r["pid"], r["base"])
        cur = open_.get(key)
        if r["hook"] in (H["ImageLoad"], H["ImageDCStart"], H["ImageDCEnd"]):
            if cur is not None and cur["path"] == r["filename"]:
                for k in ("pdb_name", "pdb_guid", "pdb_age"):
                    cur[k] = cur[k] or r[k]
                cur["timedatestamp"] = cur["timedatestamp"] or r["timedatestamp"]
                continue
            # rundown (DCStart/DCEnd) images were loaded before the trace: no load time
            cur = _module_row(r, int(to_ns(r["ts"])) if r["hook"] == H["ImageLoad"] else None)
            open_[key] = cur
            out.append(cur)
        elif r["hook"] == H["ImageUnload"]:
            if cur is None:
                cur = _module_row(r, None)
                out.append(cur)
            cur["unload_ns"] = int(to_ns(r["ts"]))
            open_.pop(key, None)
    return pa.Table.from_pylist(out, schema=MODULES_SCHEMA)


def _dedup_stacks(frames: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Canonical stack ids when two ids hold the same frames (possible only through stack keys whose
    definitions matched an explicit stack); None when every id is already distinct."""
    seen: dict[bytes, int] = {}
    remap = np.arange(len(frames), dtype=np.int64)
    out: list[np.ndarray] = []
    dup = False
    for i, f in enumerate(frames):
        k = f.tobytes()
        j = seen.get(k)
        if j is None:
            seen[k] = len(out)
            remap[i] = len(out)
            out.append(f)
        else:
            remap[i] = j
            dup = True
    return (out, remap) if dup else (frames, None)


def _name_max(parent: Path) -> int:
    try:
        return os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such directory yet, or Windows (255 on NTFS)
        return 255


def pair_trace(trace: Path, out_dir: Path, *, window_s: float = DEFAULT_WINDOW_S,
               progress: Callable[[int, int], None] | None = None, jobs: int | None = None) -> dict:
    """Pair a trace into a dataset directory; returns the trace.json content. The dataset is the same
    for every `jobs` (decode worker processes; see decode_jobs)."""
    trace = Path(trace)
    out_dir = Path(os.path.abspath(out_dir))
    if len(os.fsencode(out_dir.name)) > _name_max(out_dir.parent):  # e.g. the cache of a 250-character trace name
        raise OutputError(f"{out_dir}: cannot create the dataset directory: {os.strerror(errno.ENAMETOOLONG)}")
    check_dataset_dir(out_dir, [trace])
    existing = out_dir.is_dir()
    parent = out_dir if existing else out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent))
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the dataset directory: {os_reason(exc)}") from None
    try:
        start_for(trace, jobs)  # the workers' server loads while the buffer index is read (the CLI started it sooner)
        with EtlReader(trace, chunk_bytes=CHUNK_BYTES) as reader:
            meta = _pair(reader, tmp, window_s, progress, decode_jobs(jobs, reader.stats.file_size))
        (tmp / "trace.json").write_text(json.dumps(meta, indent=2) + "\n")
        if meta["duration_ns"] is not None and not (tmp / SUMMARY_NAME).is_file():  # _pair could not compute it
            write_summary(tmp)  # the default report's figures (pooltrace.summary)
        if existing:
            install_dataset(tmp, out_dir)
        else:
            os.chmod(tmp, 0o777 & ~_umask())
            tmp.rename(out_dir)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot write the dataset: {os_reason(exc)}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _pair(reader: EtlReader, out: Path, window_s: float, progress, jobs: int = 1) -> dict:
    hdr = reader.header
    tps = hdr.ticks_per_second or 10_000_000
    joiner = StackJoiner(hdr.start_ticks, int(window_s * tps), hdr.pointer_size)
    pairer = Pairer()
    to_ns = hdr.ticks_to_ns if hdr.ticks_per_second else (lambda t: t - hdr.start_ticks)
    scan = RowScan(out)  # the summary, computed from the rows as they are written (pooltrace.summaryscan)
    rows = _RowWriter(out / "allocations.parquet", to_ns, scan)
    rows.snapshots = snapshots = PoolSnapshots()
    rare: dict[str, list[pa.Table]] = {"image": [], "ktc_rsds": [], "ktc_image_id": [], "header_extension": []}
    try:
        try:
            for batch in reader.batches(progress, fragments=joiner.fragments, jobs=jobs, columns=True):
                snapshots.feed(batch)  # before the joiner releases the pool events of the same time
                for name in rare:
                    if batch.get(name) is not None:
                        rare[name].append(batch.get(name))
                released = joiner.feed(batch, batch.last_ts())
                if released is not None and len(released):
                    rows.write(pairer.feed(_pool_events(released)))
            scan.start(_duration_ns(reader))  # the rows written so far are scanned while the rest comes
            released = joiner.finish()
            if released is not None and len(released):
                rows.write(pairer.feed(_pool_events(released)))
            rows.write(pairer.finish())
            rows.flush()  # the last row group is encoded while the stacks and modules are written
            frames, unresolved = joiner.stacks.frames()
            frames, remap = _dedup_stacks(frames)
            _write_stacks(frames, out / "stacks.parquet")
            # `pooltrace record` writes PDB identities and tag counters beside it; a bad one is a warning
            sidecar, sidecar_warnings = load_sidecar(reader.path)
            modules = merge_pdb_identities(_modules(rare, to_ns), sidecar)
            pq.write_table(modules, out / "modules.parquet", compression="zstd")
        finally:
            rows.close()
        if remap is not None:  # the rows' stack ids change: write_summary reads them back
            _remap_stacks(out / "allocations.parquet", remap)
        else:
            scan.write(rows.rows, len(frames), rows.size, rows.crc)
    finally:
        scan.close()
    meta = _trace_json(reader, pairer, joiner, rows, len(frames), unresolved, modules, window_s)
    # what info's verdict needs when there are no pool events (pooltrace.verdicts): the same sentence everywhere
    masks = [row for t in rare["header_extension"] for row in t.to_pylist()]
    meta["logger"] = reader.header.logger_name
    meta["kernel_events"] = sum(n for h, n in reader.stats.by_hook.items() if h >> 8 != 0)
    meta["pool_tracing_enabled"] = (any(m[f"group_mask_{POOL_BIT_INDEX}"] & POOL_BIT for m in masks)
                                    if masks else None)
    if meta["pairing"]["allocs"] + meta["pairing"]["frees"] == 0:
        meta["notes"][:1] = [no_pool_verdict(0, meta["kernel_events"], meta["logger"], meta["pool_tracing_enabled"],
                                             bool(meta["warnings"]))]
    if sidecar is not None:
        meta["recording"] = {k: v for k, v in (sidecar.get("recording") or {}).items()}
    meta["warnings"].extend(sidecar_warnings)
    meta["tag_baseline"], meta["tag_baseline_source"] = choose(tag_counters(sidecar), snapshots)
    meta["pool_snapshot"] = snapshots.summary()
    return meta


def _write_stacks(frames: list[np.ndarray], path: Path) -> None:
    lens = np.array([len(f) for f in frames], dtype=np.int64)
    offsets = np.zeros(len(frames) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    values = np.concatenate(frames) if frames else np.zeros(0, np.uint64)
    pq.write_table(pa.Table.from_arrays(
        [pa.array(np.arange(len(frames), dtype=np.int64)),
         pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.uint64)))],
        schema=STACKS_SCHEMA), path, compression="zstd")


def _duration_ns(reader: EtlReader) -> int | None:
    """The trace's duration: its last event's time (None without events or a clock)."""
    hdr, st = reader.header, reader.stats
    return int(hdr.ticks_to_ns(st.last_ts)) if st.last_ts is not None and hdr.ticks_per_second else None


def _remap_stacks(path: Path, remap: np.ndarray) -> None:
    table = pq.read_table(path)
    for name in ("alloc_stack", "free_stack"):
        col = table[name].combine_chunks()
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        vals = col.fill_null(0).to_numpy()
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pa.array(remap[vals], mask=~valid, type=pa.int64()))
    pq.write_table(table, path, compression="zstd")


def _trace_json(reader, pairer, joiner, rows, n_stacks, unresolved, modules, window_s) -> dict:
    hdr, st = reader.header, reader.stats
    ps, js = pairer.stats, joiner.stats
    by = events_by_kind(st)
    pool_events = ps.allocs + ps.frees
    diag = {
        "allocs": ps.allocs, "frees": ps.frees,
        "outstanding": {"count": ps.outstanding, "bytes": ps.outstanding_bytes},
        "freed": ps.freed, "lost_free": ps.lost_free, "free_without_alloc": ps.free_without_alloc,
        "free_without_alloc_sized_from_snapshot": rows.sized_from_snapshot,
        "allocations_with_stack": rows.with_stack, "allocations_without_stack": rows.without_stack,
        "stack_events": js.stack_events, "stack_events_attached": js.attached,
        "stack_events_attached_by_thread": js.attached_by_thread,
        "stack_events_with_no_owner": js.unattached, "stack_parts_ignored": js.extra_parts,
        "stacks_with_unresolved_key": unresolved, "distinct_stacks": n_stacks,
        "events_lost": hdr.events_lost, "buffers_lost": hdr.buffers_lost,
        "buffers_flagged_events_lost": st.buffers_flagged_events_lost,
        "buffers_unreadable": st.buffers_skipped, "bytes_skipped": st.bytes_skipped,
        "malformed_records": dict(st.malformed), "stack_window_s": window_s,
    }
    notes = []
    if pool_events == 0:
        notes.append("no pool events: this trace cannot show pool leaks; record with `pooltrace record`")
    if js.stack_events and not js.attached and pool_events:
        notes.append("no stack event belongs to a pool event: pool stacks were not recorded")
    return {
        "pooltrace_version": __version__,
        "source": {"path": str(reader.path.resolve()), "size": st.file_size},
        "os": {"version": hdr.os_version, "build": hdr.os_build}, "pointer_size": hdr.pointer_size,
        "cpus": hdr.cpus, "clock": hdr.clock_name,
        "start_time": hdr.start_datetime.isoformat().replace("+00:00", "Z") if hdr.start_datetime else None,
        "duration_ns": _duration_ns(reader),
        "events": by, "records": st.records,
        "lost": {"events": hdr.events_lost, "buffers": hdr.buffers_lost},
        "modules": modules.num_rows,
        "modules_with_pdb": modules.num_rows - modules["pdb_guid"].null_count,  # no pyarrow.compute: not loaded
        "pairing": diag, "notes": notes, "warnings": list(st.warnings),
    }
