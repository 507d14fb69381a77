"""A run store: many paired runs in one directory of Hive-partitioned Parquet that pooltrace, DuckDB, Spark
or Trino read alike.

    STORE/
      runs.parquet                 the catalogue: one row per run (labels, trace facts, module identities)
      run_id=<ID>/allocations.parquet, stacks.parquet, modules.parquet, trace.json   (a dataset directory)
      .lock, .incoming-*/          the append lock and runs being written (hidden: no query sees them)

Appending pairs (or copies) the run into a hidden directory inside the store, then, holding the store's
lock, renames it to ``run_id=<ID>/`` and replaces ``runs.parquet`` by a new file (write, fsync, rename):
readers see a run completely or not at all, and two appends at once serialize on the lock. The catalogue is
the list of complete runs; queries read only the partitions it names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pooltrace.errors import PooltraceError

CATALOGUE = "runs.parquet"
LOCK = ".lock"
DATASET_FILES = ("allocations.parquet", "stacks.parquet", "modules.parquet", "trace.json")
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LABEL_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
LOCK_TIMEOUT_S = 600

MODULE_IDENTITY = pa.struct([("name", pa.string()), ("timedatestamp", pa.uint32()), ("size", pa.uint64()),
                             ("pdb_name", pa.string()), ("pdb_guid", pa.string()), ("pdb_age", pa.uint32())])
CATALOGUE_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("added", pa.timestamp("us", tz="UTC")), ("labels", pa.map_(pa.string(), pa.string())),
    ("source", pa.string()), ("source_size", pa.int64()), ("start_time", pa.string()), ("duration_ns", pa.int64()),
    ("os_build", pa.int64()), ("pointer_size", pa.int32()), ("cpus", pa.int32()), ("events_lost", pa.int64()),
    ("buffers_lost", pa.int64()), ("allocations", pa.int64()), ("outstanding_count", pa.int64()),
    ("outstanding_bytes", pa.int64()), ("pooltrace_version", pa.string()), ("modules", pa.list_(MODULE_IDENTITY)),
    ("notes", pa.list_(pa.string())), ("warnings", pa.list_(pa.string())),
])


def is_store(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CATALOGUE).is_file()


def partition(store: Path, run_id: str) -> Path:
    return Path(store) / f"run_id={run_id}"


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """``key=value`` items (a key given twice keeps the last value)."""
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not LABEL_KEY.fullmatch(key):
            raise PooltraceError(f"--label {item!r}: expected key=value (key: letters, digits, _ . -)")
        out[key] = value
    return out


def check_run_id(run_id: str) -> str:
    if not RUN_ID.fullmatch(run_id):
        raise PooltraceError(f"--run-id {run_id!r}: 1 to 128 letters, digits, '.', '_' or '-', not starting "
                             "with '.', '_' or '-'")
    return run_id


def default_run_id(source: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).stem).strip("-._")[:64] or "run"
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{stem}-{uuid.uuid4().hex[:6]}"


# ---- the catalogue -------------------------------------------------------------------------------------

def read_catalogue(store: Path) -> pa.Table:
    path = Path(store) / CATALOGUE
    try:
        table = pq.ParquetFile(path).read()
        if "run_id" not in table.column_names:
            raise ValueError("no run_id column")
        for f in CATALOGUE_SCHEMA:  # a catalogue written by an older pooltrace lacks the newer columns
            if f.name not in table.column_names:
                table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
        return table.select(CATALOGUE_SCHEMA.names).cast(CATALOGUE_SCHEMA)
    except FileNotFoundError:
        raise PooltraceError(f"{store}: not a pooltrace run store (no {CATALOGUE})") from None
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        raise PooltraceError(f"{path}: unreadable run catalogue ({exc})") from None


def runs(store: Path) -> list[dict]:
    """The catalogue's rows, in the order the runs were added; labels as a dict."""
    out = read_catalogue(store).to_pylist()
    for r in out:
        r["labels"] = dict(r["labels"] or [])
    return out


def _write_catalogue(store: Path, table: pa.Table) -> None:
    tmp = Path(store) / f".{CATALOGUE}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, Path(store) / CATALOGUE)
    finally:
        tmp.unlink(missing_ok=True)


def catalogue_row(run_id: str, labels: dict[str, str], meta: dict, modules: pa.Table) -> dict:
    src = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    p = meta.get("pairing", {})
    idents = []
    seen = set()
    cols = ["name", "timedatestamp", "size", "pdb_name", "pdb_guid", "pdb_age"]
    for m in modules.select(cols).to_pylist() if modules.num_rows else []:
        key = tuple(m[c] for c in cols)
        if key not in seen:
            seen.add(key)
            idents.append(m)
    return {"run_id": run_id, "added": datetime.now(UTC), "labels": list(labels.items()),
            "source": src.get("path"), "source_size": src.get("size"), "start_time": meta.get("start_time"),
            "duration_ns": meta.get("duration_ns"), "os_build": (meta.get("os") or {}).get("build"),
            "pointer_size": meta.get("pointer_size"), "cpus": meta.get("cpus"),
            "events_lost": (meta.get("lost") or {}).get("events"),
            "buffers_lost": (meta.get("lost") or {}).get("buffers"),
            "allocations": p.get("allocs"), "outstanding_count": (p.get("outstanding") or {}).get("count"),
            "outstanding_bytes": (p.get("outstanding") or {}).get("bytes"),
            "pooltrace_version": meta.get("pooltrace_version"), "modules": idents,
            "notes": [str(n) for n in meta.get("notes") or []],
            "warnings": [str(w) for w in meta.get("warnings") or []]}


# ---- appending -----------------------------------------------------------------------------------------

def _prepare(store: Path) -> None:
    """Create the store, or check that an existing directory is one (never write into anything else)."""
    if store.exists() and not store.is_dir():
        raise PooltraceError(f"{store}: exists and is not a directory")
    if store.is_dir() and not (store / CATALOGUE).exists():
        foreign = [p.name for p in store.iterdir() if not p.name.startswith(".") and not p.name.startswith("run_id=")]
        if foreign:
            raise PooltraceError(f"{store}: not a pooltrace run store (it holds {foreign[0]!r}); give a new or "
                                 "empty directory")
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PooltraceError(f"{store}: cannot create the run store: {exc.strerror or exc}") from None


def _lock(store: Path):
    from filelock import FileLock

    return FileLock(str(store / LOCK), timeout=LOCK_TIMEOUT_S)


def append_dataset(store: Path, dataset: Path, *, run_id: str | None = None, labels: dict[str, str] | None = None,
                   move: bool = False) -> dict:
    """Add a dataset directory to the store as run `run_id` (copied; moved when `move`, e.g. a directory
    pair_trace just wrote inside the store). Returns the catalogue row."""
    store, dataset = Path(store), Path(dataset)
    missing = [f for f in DATASET_FILES if not (dataset / f).is_file()]
    if missing:
        raise PooltraceError(f"{dataset}: not a pooltrace dataset (missing {', '.join(missing)})")
    meta = json.loads((dataset / "trace.json").read_text())
    run_id = check_run_id(run_id or default_run_id(Path((meta.get("source") or {}).get("path") or dataset.name)))
    _prepare(store)
    staged = dataset
    if not move:
        staged = store / f".incoming-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staged.mkdir()
        for f in DATASET_FILES:
            shutil.copyfile(dataset / f, staged / f)
    try:
        row = catalogue_row(run_id, labels or {}, meta, pq.read_table(staged / "modules.parquet"))
        with _lock(store):
            target = partition(store, run_id)
            old = read_catalogue(store) if (store / CATALOGUE).exists() else CATALOGUE_SCHEMA.empty_table()
            if run_id in set(old["run_id"].to_pylist()) or target.exists():
                raise PooltraceError(f"{store}: run {run_id!r} is already in the store (give another --run-id)")
            os.rename(staged, target)
            try:
                _write_catalogue(store, pa.concat_tables([old, pa.Table.from_pylist([row], CATALOGUE_SCHEMA)]))
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)  # not in the catalogue: not a run
                raise
    finally:
        if staged.exists() and staged != dataset:
            shutil.rmtree(staged, ignore_errors=True)
    row["labels"] = dict(row["labels"])
    return row


def append_trace(store: Path, trace: Path, *, run_id: str | None = None, labels: dict[str, str] | None = None,
                 window_s: float | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Pair `trace` straight into the store as a new run (see append_dataset)."""
    from pooltrace.dataset import DEFAULT_WINDOW_S, pair_trace

    store = Path(store)
    run_id = check_run_id(run_id or default_run_id(trace))
    _prepare(store)
    work = store / f".incoming-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        pair_trace(trace, work / "ds", window_s=DEFAULT_WINDOW_S if window_s is None else window_s,
                   progress=progress)
        return append_dataset(store, work / "ds", run_id=run_id, labels=labels, move=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- selecting -----------------------------------------------------------------------------------------

def select(store: Path, run_ids: Iterable[str] = (), labels: Iterable[str] = ()) -> list[dict]:
    """Runs of the store chosen by id (in the order given) and/or labels (``key=value``; the same key twice
    means either value, different keys must all match), else every run, in the order they were added."""
    rows = runs(store)
    run_ids = list(run_ids)
    wanted: dict[str, set[str]] = {}
    for item in labels:
        key, eq, value = item.partition("=")
        if not eq:
            raise PooltraceError(f"--label {item!r}: expected key=value")
        wanted.setdefault(key, set()).add(value)
    if run_ids:
        by_id = {r["run_id"]: r for r in rows}
        unknown = [r for r in run_ids if r not in by_id]
        if unknown:
            raise PooltraceError(f"{store}: no run {unknown[0]!r} (the store has {len(rows)} run(s))")
        rows = [by_id[r] for r in run_ids]
    rows = [r for r in rows if all(r["labels"].get(k) in vs for k, vs in wanted.items())]
    if not rows:
        what = " and ".join([f"--run {', '.join(run_ids)}"] * bool(run_ids) +
                            [f"--label {k}={'|'.join(sorted(v))}" for k, v in wanted.items()])
        raise PooltraceError(f"{store}: no run matches {what}" if what else f"{store}: the store has no run")
    return rows


def expand_inputs(paths: Iterable[Path], run_ids: Iterable[str] = (), labels: Iterable[str] = ()) -> list[dict]:
    """Inputs of report, diff and trend: .etl files and datasets as given, and each STORE replaced by the
    runs the selectors pick from it. Each: ``{"path", "name", "labels", "store", "run_id", "row"}`` (row: the
    run's catalogue row)."""
    run_ids, labels = list(run_ids), list(labels)
    out, stores = [], 0
    for p in map(Path, paths):
        if is_store(p):
            stores += 1
            for r in select(p, run_ids, labels):
                out.append({"path": partition(p, r["run_id"]), "name": r["run_id"], "labels": r["labels"],
                            "store": p, "run_id": r["run_id"], "row": r})
        else:
            out.append({"path": p, "name": p.name, "labels": {}, "store": None, "run_id": None, "row": None})
    if (run_ids or labels) and not stores:
        raise PooltraceError("--run and --label select runs of a run store: give the STORE directory")
    return out


# ---- the DuckDB query behind trend over a store ------------------------------------------------------

# the allocation columns a report needs, read by DuckDB; `fate` comes back as a flag (lost_free or not)
QUERY_COLUMNS = ["tag", "pool_type", "paged", "session", "session_id", "size", "address", "alloc_ns", "free_ns",
                 "pid", "tid", "cpu", "alloc_stack"]


def trace_facts(row: dict) -> dict:
    """The trace.json facts a report shows, from a catalogue row (the store checked them when appending)."""
    return {"pooltrace_version": row.get("pooltrace_version"),
            "source": {"path": row.get("source"), "size": row.get("source_size")}, "os": {"build": row.get("os_build")},
            "pointer_size": row.get("pointer_size") or 8, "cpus": row.get("cpus"), "start_time": row.get("start_time"),
            "duration_ns": row.get("duration_ns"),
            "lost": {"events": row.get("events_lost") or 0, "buffers": row.get("buffers_lost") or 0},
            "pairing": {"allocs": row.get("allocations"),
                        "outstanding": {"count": row.get("outstanding_count"), "bytes": row.get("outstanding_bytes")}},
            "notes": list(row.get("notes") or []), "warnings": list(row.get("warnings") or [])}


def outstanding_datasets(items: list[dict], window: str | None) -> list:
    """For runs of stores (items of expand_inputs), Datasets holding only the rows outstanding in `window`
    (allocated inside it, not freed before its end), read with one DuckDB query over the runs' partitions,
    with the trace facts of the catalogue. The groups and outstanding totals of build_report on them are
    those of the whole run (lifetime totals and the time series are not)."""
    import duckdb
    import numpy as np

    from pooltrace.analysis import parse_window
    from pooltrace.datasetopen import dataset_from_tables

    if not items:
        return []
    traces = [trace_facts(it["row"]) for it in items]
    parts = []
    for k, (it, trace) in enumerate(zip(items, traces, strict=True)):
        w = parse_window(window, trace.get("duration_ns"))
        path = str(Path(it["path"]) / "allocations.parquet").replace("'", "''")
        parts.append(f"SELECT {k} AS k, {', '.join(QUERY_COLUMNS)}, fate = 'lost_free' AS lost "
                     f"FROM read_parquet('{path}') WHERE alloc_ns >= {int(w.start_ns)} AND alloc_ns < {int(w.end_ns)} "
                     f"AND (free_ns IS NULL OR free_ns >= {int(w.end_ns)})")
    con = duckdb.connect()
    try:
        rel = con.sql(" UNION ALL ".join(parts))
        table = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()  # duckdb 2 / 1
    except duckdb.Error as exc:
        raise PooltraceError(f"{items[0]['store']}: the run store's Parquet files are unreadable "
                             f"({str(exc).splitlines()[0]})") from None
    finally:
        con.close()
    k = table["k"].to_numpy()
    order = np.argsort(k, kind="stable")
    table = table.take(pa.array(order)) if len(k) and np.any(np.diff(k) < 0) else table
    k = k[order]
    bounds = np.searchsorted(k, np.arange(len(items) + 1))
    out = []
    for i, it in enumerate(items):
        part = Path(it["path"])
        rows = table.slice(bounds[i], bounds[i + 1] - bounds[i])
        lost = rows["lost"].to_numpy(zero_copy_only=False).astype(np.int8)
        fate = pa.DictionaryArray.from_arrays(pa.array(lost), pa.array(["outstanding", "lost_free"]))
        rows = rows.drop_columns(["k", "lost"]).append_column("fate", fate)
        out.append(dataset_from_tables(part, traces[i], rows, _read(part / "stacks.parquet"),
                                       _read(part / "modules.parquet")))
    return out


def _read(path: Path) -> pa.Table:
    """A small Parquet file of a run (ParquetFile: no dataset machinery for 2 files x 100 runs)."""
    try:
        return pq.ParquetFile(path).read()
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise PooltraceError(f"{path}: unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                             "re-add the run to the store") from None
