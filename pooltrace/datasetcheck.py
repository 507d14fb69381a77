"""Check a dataset directory (`pooltrace pair`'s output) once, when a command opens it: trace.json against its
rules, each Parquet file's schema against what `pair` writes, and the references between the files. A
dataset that fails is a one-line error naming the file and the problem ("re-run `pooltrace pair`"), never a
traceback from deep inside an analysis; the detail (pyarrow's message) is only its first line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pooltrace.datasetschema import ALLOCATIONS_SCHEMA, MODULES_SCHEMA, STACKS_SCHEMA
from pooltrace.errors import DamagedDataset, PooltraceError
from pooltrace.jsonrules import DROP, U32, U64, Field, load_json, opt, validate

MODULE_KEYS = ["base", "size", "name", "pid"]  # modules.parquet columns every module row has
FILES = ("trace.json", "allocations.parquet", "stacks.parquet", "modules.parquet")
I64 = (-(1 << 63), (1 << 63) - 1)

_COUNT = opt("int", hi=U64)
TRACE_RULES = Field("object", members={
    "pooltrace_version": Field("str", required=True),
    "source": opt("object", members={"path": opt("str"), "size": _COUNT}),
    "os": opt("object"), "pointer_size": Field("int", required=True, lo=4, hi=8), "cpus": opt("int", hi=U32),
    "clock": opt("str"), "start_time": opt("str"), "duration_ns": opt("int", lo=I64[0], hi=I64[1]),
    "events": opt("object", values=_COUNT), "records": _COUNT,
    "lost": opt("object", members={"events": _COUNT, "buffers": _COUNT}),
    "modules": _COUNT, "modules_with_pdb": _COUNT,
    "pairing": Field("object", required=True, members={
        "outstanding": opt("object", members={"count": _COUNT, "bytes": _COUNT}),
        "allocs": _COUNT, "frees": _COUNT, "freed": _COUNT, "lost_free": _COUNT, "free_without_alloc": _COUNT,
        "bytes_skipped": _COUNT, "buffers_unreadable": _COUNT, "events_lost": _COUNT, "buffers_lost": _COUNT,
        "malformed_records": opt("object", values=_COUNT), "stack_window_s": opt("number"),
    }),
    "notes": Field("list", required=True, item=Field("str")),
    "warnings": Field("list", required=True, item=Field("str")),
    "recording": opt("object"),
    "tag_baseline": opt("object", values=Field("object", members={
        w: opt("object", members={k: _COUNT for k in ("allocs", "bytes", "paged_allocs", "paged_bytes",
                                                       "nonpaged_allocs", "nonpaged_bytes", "session_allocs",
                                                       "session_bytes")})
        for w in ("start", "stop")})),
    "tag_baseline_source": opt("str"),
    "pool_snapshot": opt("object", members={
        w: opt("object", members={"tags": _COUNT, "big_blocks": _COUNT, "big_bytes": _COUNT})
        for w in ("start", "stop")}),
})


def rerun_error(path: Path, problem: str) -> DamagedDataset:
    """The one-line error for a damaged dataset file: its path, the problem, and what to do."""
    return DamagedDataset(f"{path}: {problem}; re-run `pooltrace pair`", Path(path))



def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_trace_json(ds: Path) -> dict:
    """trace.json of dataset `ds`, checked (PooltraceError otherwise)."""
    path = ds / "trace.json"
    try:
        data = load_json(path, "pooltrace dataset's trace.json")
    except PooltraceError as exc:
        raise DamagedDataset(f"{exc}; re-run `pooltrace pair`", path) from None
    clean, problems = validate(data, TRACE_RULES)
    if clean is DROP or problems:
        raise rerun_error(path, f"not a pooltrace trace.json ({problems[0] if problems else 'invalid'})")
    if clean["pointer_size"] not in (4, 8):
        raise rerun_error(path, f"pointer_size {clean['pointer_size']} (expected 4 or 8)")
    return clean


def _plain_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_large_string(t):
        return pa.string()
    return t


def parquet_schema(path: Path, expected: pa.Schema, columns: list[str] | None = None) -> int:
    """Check that `path` is a readable Parquet file holding `columns` (default: all of `expected`) with
    their expected types; returns its row count."""
    if not path.is_file():
        raise rerun_error(path, "missing or not a regular file")
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise rerun_error(path, f"not a readable Parquet file ({_first_line(exc)})") from None
    for name in columns or expected.names:
        want = expected.field(name).type
        if name not in schema.names:
            raise rerun_error(path, f"no column {name!r}")
        got = schema.field(name).type
        if _plain_type(got) != _plain_type(want):
            raise rerun_error(path, f"column {name!r} is {got}, expected {want}")
    return meta.num_rows


def verify_dataset(ds: Path, alloc_columns: list[str] | None = None) -> dict:
    """Check dataset directory `ds` before anything reads it: trace.json and the schemas of the three Parquet
    files (of allocations.parquet only `alloc_columns` when given). Returns trace.json's content."""
    ds = Path(ds)
    if not ds.is_dir():
        raise PooltraceError(f"{ds}: not a directory")
    trace = read_trace_json(ds)
    parquet_schema(ds / "allocations.parquet", ALLOCATIONS_SCHEMA, alloc_columns)
    parquet_schema(ds / "stacks.parquet", STACKS_SCHEMA)
    parquet_schema(ds / "modules.parquet", MODULES_SCHEMA)
    return trace


def read_parquet(path: Path, columns: list[str] | None = None,
                 read_dictionary: list[str] | None = None) -> pa.Table:
    """One Parquet file (as pq.read_table, without loading pyarrow.dataset) that verify_dataset accepted: a
    body damaged past its footer is the same one-line error."""
    try:
        with pq.ParquetFile(path, read_dictionary=read_dictionary) as f:
            return f.read(columns=columns)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise rerun_error(path, f"unreadable ({_first_line(exc)})") from None


def parquet_rows(path: Path) -> int:
    """The row count the footer of a Parquet file that verify_dataset accepted gives."""
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise rerun_error(path, f"unreadable ({_first_line(exc)})") from None


def read_row_groups(path: Path, columns: list[str], read_dictionary: list[str] | None = None) -> Iterator[pa.Table]:
    """The columns of a Parquet file that verify_dataset accepted, one row group at a time (the columns of a
    group decoded on Arrow's threads): a reader copies each into its arrays and lets it go, so no whole
    column is held twice. Damage found while reading is the same one-line error as read_parquet's."""
    try:
        with pq.ParquetFile(path, read_dictionary=read_dictionary) as f:
            for i in range(f.num_row_groups):
                yield f.read_row_group(i, columns=columns)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise rerun_error(path, f"unreadable ({_first_line(exc)})") from None


def check_stacks(ds: Path, stack_id: np.ndarray, referenced: np.ndarray) -> None:
    """stack ids are 0..n-1 (each once) and every stack an allocation refers to exists."""
    n = len(stack_id)
    if n and (stack_id.min() != 0 or stack_id.max() != n - 1 or np.bincount(stack_id, minlength=n).max() != 1):
        raise rerun_error(ds / "stacks.parquet", "stack_id is not 0..n-1")
    check_references(ds, n, referenced)


def check_references(ds: Path, n: int, referenced: np.ndarray) -> None:
    """Every stack the allocations `referenced` refer to (-1: none) is one of the n stacks."""
    top = int(referenced.max()) if len(referenced) else -1  # the largest reference, when one is >= 0
    if top >= 0 and (top >= n or referenced.min() < -1):
        raise rerun_error(ds / "allocations.parquet", f"refers to stack {top} of {n}")


def check_no_nulls(path: Path, table: pa.Table, columns: list[str]) -> None:
    for name in columns:
        if table[name].null_count:
            raise rerun_error(path, f"column {name!r} has {table[name].null_count:,} nulls")
