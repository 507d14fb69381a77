"""The dataset's Parquet schemas and where `pair` puts a trace's dataset by default: what the writer
(pooltrace.dataset) and every reader (datasetcheck, analysis) share, without the writer's imports (a
report on a cached dataset loads no trace decoder)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

ALLOCATIONS_SCHEMA = pa.schema([
    ("tag", pa.string()), ("pool_type", pa.uint32()), ("paged", pa.bool_()), ("session", pa.bool_()),
    ("session_id", pa.uint32()), ("size", pa.uint64()), ("address", pa.uint64()), ("alloc_ns", pa.int64()),
    ("free_ns", pa.int64()), ("fate", pa.dictionary(pa.int8(), pa.string())), ("pid", pa.uint32()),
    ("tid", pa.uint32()), ("cpu", pa.uint16()), ("alloc_stack", pa.int64()), ("free_stack", pa.int64()),
])
STACKS_SCHEMA = pa.schema([("stack_id", pa.int64()), ("frames", pa.list_(pa.uint64()))])
MODULES_SCHEMA = pa.schema([
    ("base", pa.uint64()), ("size", pa.uint64()), ("name", pa.string()), ("path", pa.string()),
    ("pid", pa.uint32()), ("timedatestamp", pa.uint32()), ("checksum", pa.uint32()), ("pdb_name", pa.string()),
    ("pdb_guid", pa.string()), ("pdb_age", pa.uint32()), ("load_ns", pa.int64()), ("unload_ns", pa.int64()),
])


def default_output(trace: Path) -> Path:
    """The dataset of `trace` when `pair` is given no -o, and the cache `report TRACE` reuses: beside it."""
    return trace.with_name(trace.stem + ".pooltrace")
