"""Opening a paired dataset for analysis: a dataset directory, or an .etl paired on the fly into the cache
beside it (`<trace>.pooltrace/`, reused while fresh and trusted, rebuilt otherwise). Its schema is checked
when opened (datasetcheck); the allocation columns become numpy arrays when first used (Rows), part by part,
checked as they are read; stacks and modules are kept as Arrow tables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa

from pooltrace import __version__
from pooltrace.cachetrust import reused, trusted
from pooltrace.datasetcheck import (
    MODULE_KEYS,
    check_no_nulls,
    check_references,
    check_stacks,
    parquet_rows,
    read_parquet,
    read_row_groups,
    read_trace_json,
    rerun_error,
    verify_dataset,
)
from pooltrace.datasetschema import ALLOCATIONS_SCHEMA, default_output
from pooltrace.errors import OutputError, PooltraceError

COLUMNS = ["tag", "pool_type", "paged", "session", "session_id", "size", "address", "alloc_ns", "free_ns", "fate",
           "pid", "tid", "cpu", "alloc_stack"]


OPENED: list[str] = []  # read when a dataset is opened (tags: when first used, e.g. by a tag filter)
SCAN = ["size", "alloc_ns", "free_ns", "pid", "alloc_stack"]  # what a report reads, part by part (Rows.blocks)
NOT_NULL = ["tag", "fate", "pool_type", "size", "address", "pid", "tid", "cpu", "paged", "session"]
FATE_FLAGS = {"outstanding_at_end": "outstanding", "lost_free": "lost_free"}  # rows[flag]: fate == value


NULL_NS = np.iinfo(np.int64).min
FILL = {"alloc_ns": NULL_NS, "free_ns": NULL_NS, "alloc_stack": -1,
        "session_id": 0xFFFFFFFF}  # what a null reads as (NULL_NS, no stack, no session)
T = TypeVar("T")

DTYPES = {"tag": np.int32, "fate": np.int32, "paged": np.bool_, "session": np.bool_}  # others: their Arrow type


class Rows(dict):
    """The allocation columns as numpy arrays (nulls as FILL; tag as indices into `tags`; fate as the flags
    of FATE_FLAGS), each read from the dataset when first used (a report streams its columns part by part
    instead: `blocks`). A column is read part by part (Parquet row groups) into one preallocated array,
    without a whole-column Arrow copy beside it, and checked as it is read (no nulls in NOT_NULL; stack
    references against the stacks)."""

    def __init__(self, path: Path, n: int, parts: Callable[[list[str]], Iterable[pa.Table]]):
        super().__init__()
        self.path = path  # the file named in errors
        self.n = n
        self.tags: list[str] = []  # rows["tag"] indexes this list
        self.stacks = 0  # how many stacks there are (alloc_stack refers to them)
        self._parts = parts

    def blocks(self, names: list[str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(first row, columns) of consecutive parts of the rows: columns already read are sliced, the
        others read and converted one part at a time into buffers reused from part to part (valid until the
        next part; memory for one part, not for every row); checked like `load` (nulls; the stack
        references of each part before it is given out: stack ids index per-stack arrays)."""
        if "tag" in names and "tag" not in self:  # whole: its codes index self.tags
            self.load(["tag"])
        todo = [name for name in names if name not in self]
        if not todo:
            yield 0, {name: self[name] for name in names}
            return
        codes = {"tag": {t: i for i, t in enumerate(self.tags)}, "fate": {}}
        at = 0
        buffers: dict[str, np.ndarray] = {}
        for part in prefetched(self._parts(todo)):
            k = part.num_rows
            if at + k > self.n:
                raise rerun_error(self.path, f"more rows than its footer counts ({self.n:,})")
            out = {}
            for name in todo:
                col = part[name]
                if col.null_count and name in NOT_NULL:
                    self.load([name])  # refuses the column, with its whole count of nulls
                if name not in buffers or len(buffers[name]) < k:  # fresh memory costs page faults: reused
                    buffers[name] = np.empty(k, dtype=column_dtype(name))
                out[name] = buffers[name][:k]
                _copy(col, out[name], FILL.get(name, 0), codes.get(name))
            if "alloc_stack" in out and k:  # checked before the part is used: a stack id indexes per-stack arrays
                stack = out["alloc_stack"]
                check_references(self.path.parent, self.stacks, np.array([stack.min(), stack.max()]))
            yield at, {name: out[name] if name in out else self[name][at:at + k] for name in names}
            at += k
        if at != self.n:
            raise rerun_error(self.path, f"{at:,} rows where its footer counts {self.n:,}")

    def __missing__(self, name: str) -> np.ndarray:
        column = "fate" if name in FATE_FLAGS else name
        if column not in COLUMNS:
            raise KeyError(name)
        self.load([column])
        return dict.__getitem__(self, name)

    def load(self, names: list[str]) -> None:
        """Read the columns `names`: each part's columns decoded together (on Arrow's threads)."""
        out = {name: np.empty(self.n, dtype=column_dtype(name)) for name in names}
        nulls = dict.fromkeys(names, 0)
        codes: dict[str, dict[str, int]] = {"tag": {}, "fate": {}}  # value -> index, in order of appearance
        at = 0
        for part in self._parts(names):
            k = part.num_rows
            if at + k > self.n:
                raise rerun_error(self.path, f"more rows than its footer counts ({self.n:,})")
            for name in names:
                col = part[name]
                nulls[name] += col.null_count
                _copy(col, out[name][at:at + k], FILL.get(name, 0), codes.get(name))
            at += k
        if at != self.n:
            raise rerun_error(self.path, f"{at:,} rows where its footer counts {self.n:,}")
        for name in names:
            if nulls[name] and name in NOT_NULL:
                raise rerun_error(self.path, f"column {name!r} has {nulls[name]:,} nulls")
        if "tag" in out:
            self.tags = list(codes["tag"])
        if "alloc_stack" in out:
            check_references(self.path.parent, self.stacks, out["alloc_stack"])
        if "fate" in out:
            fate = out.pop("fate")
            values = list(codes["fate"])
            for flag, value in FATE_FLAGS.items():
                hit = [i for i, v in enumerate(values) if v == value]
                self[flag] = fate == hit[0] if len(hit) == 1 else np.isin(fate, hit)  # one pass for one code
        self.update(out)


_END = object()


def prefetched(items: Iterable[T]) -> Iterator[T]:
    """The items of `items`, each next one produced on a worker thread while the caller works on the
    current one (Parquet decoding releases the GIL): one item ahead, in order; an error raised by `items`
    is raised here, at the item it replaces."""
    source = iter(items)
    with ThreadPoolExecutor(1, thread_name_prefix="pooltrace-read") as pool:
        ahead = pool.submit(next, source, _END)
        while (item := ahead.result()) is not _END:
            ahead = pool.submit(next, source, _END)
            yield item


def column_dtype(name: str) -> np.dtype:
    """The numpy dtype an allocation column is read as."""
    return np.dtype(DTYPES.get(name) or str(ALLOCATIONS_SCHEMA.field(name).type))


def _copy(col: pa.ChunkedArray, out: np.ndarray, null: int, codes: dict[str, int] | None) -> None:
    """Copy a column part into `out` straight from the Arrow buffers: integers with `null` for nulls,
    booleans, and strings (dictionary or not) as indices into `codes` (extended with new values)."""
    at = 0
    for arr in col.chunks:
        n = len(arr)
        part = out[at:at + n]
        at += n
        if not n:
            continue
        if codes is not None:
            if not pa.types.is_dictionary(arr.type):
                arr = arr.dictionary_encode()
            remap = np.array([codes.setdefault(v, len(codes)) for v in arr.dictionary.to_pylist()], dtype=out.dtype)
            if arr.null_count:  # a NOT_NULL column: refused once counted; nothing to look up
                part[:] = 0
            elif len(remap):
                part[:] = remap[arr.indices.to_numpy()]
            continue
        if pa.types.is_boolean(arr.type):
            part[:] = arr.to_numpy(zero_copy_only=False) if not arr.null_count else arr.fill_null(False).to_numpy(
                zero_copy_only=False)
            continue
        values = arr.buffers()[1]
        if values is None:  # no value buffer: every row is null
            part[:] = null
            continue
        part[:] = np.frombuffer(values, dtype=out.dtype, count=n + arr.offset)[arr.offset:]
        if arr.null_count:
            bits = np.frombuffer(arr.buffers()[0], dtype=np.uint8)
            valid = np.unpackbits(bits, bitorder="little", count=n + arr.offset)[arr.offset:].view(bool)
            part[~valid] = null


@dataclass
class Dataset:
    path: Path
    trace: dict
    rows: Rows  # allocation columns as numpy, read when first used (see Rows)
    stacks: pa.ListArray
    modules: pa.Table
    whole: bool = False  # every row of its allocations.parquet (load_dataset), so its summary may answer
    summary: object = False  # its pooltrace.summary.Summary once read (None: none to use); False: not read yet

    @property
    def tags(self) -> list[str]:
        """The tag strings; rows["tag"] holds indices into this list (the tag column is read when first used)."""
        if "tag" not in self.rows:
            self.rows.load(["tag"])
        return self.rows.tags

    @property
    def n(self) -> int:
        return self.rows.n


def is_dataset(path: Path) -> bool:
    try:
        return path.is_dir() and (path / "trace.json").is_file()
    except OSError:  # e.g. a name too long for the file system (the cache of a 250-character trace name)
        return False


def open_input(path: Path, *, progress: Callable | None = None) -> Dataset:
    """A dataset directory, or an .etl paired on the fly into `<trace>.pooltrace/` beside it (reused while
    newer than the trace and written by this version; in a temporary directory if that is not writable)."""
    path = Path(path)
    if is_dataset(path):
        return load_dataset(path)
    if path.is_dir():
        raise PooltraceError(f"{path}: not a pooltrace dataset (no trace.json); give an .etl or a `pair` output")
    if not path.exists():
        raise PooltraceError(f"{path}: no such file")
    cache = default_output(path)
    if is_dataset(cache) and fresh_cache(cache, path) and trusted(cache):
        try:
            ds = load_dataset(cache)
        except PooltraceError:
            pass  # a damaged cache is rebuilt, not trusted
        else:
            reused(cache)
            return ds
    from pooltrace.dataset import pair_trace

    try:
        pair_trace(path, cache, progress=progress)
        return load_dataset(cache)
    except OutputError:  # not writable beside the trace, or a directory of that name that is not ours
        pass
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="pooltrace-")) / "ds"
    pair_trace(path, tmp, progress=progress)
    return load_dataset(tmp)


def fresh_cache(cache: Path, trace: Path) -> bool:
    """The cache beside a trace was written by this version from this very file (size and time)."""
    try:
        meta = read_trace_json(cache)
        return (meta["pooltrace_version"] == __version__ and
                (cache / "trace.json").stat().st_mtime >= trace.stat().st_mtime and
                (meta.get("source") or {}).get("size") == trace.stat().st_size)
    except (OSError, PooltraceError):
        return False


def load_dataset(path: Path) -> Dataset:
    """Open a dataset directory: its schema is checked first (verify_dataset), so a tampered or truncated
    file is a one-line error naming it, whatever reads the dataset next. The OPENED allocation columns are
    read now, the others when first used (Rows)."""
    trace = verify_dataset(path, COLUMNS)
    allocations = path / "allocations.parquet"

    def parts(columns: list[str]) -> Iterable[pa.Table]:
        return read_row_groups(allocations, columns, read_dictionary=[c for c in ("tag", "fate") if c in columns])

    stacks = read_parquet(path / "stacks.parquet")
    modules = read_parquet(path / "modules.parquet")
    check_no_nulls(path / "stacks.parquet", stacks, ["stack_id"])
    check_no_nulls(path / "modules.parquet", modules, MODULE_KEYS)
    ds = _dataset(path, trace, Rows(allocations, parquet_rows(allocations), parts), stacks, modules)
    ds.whole = True
    return ds


def dataset_from_tables(path: Path, trace: dict, table: pa.Table, stacks: pa.Table, modules: pa.Table) -> Dataset:
    """A Dataset from its tables (allocation COLUMNS, tag and fate read as dictionaries or not): a run
    store selects only the rows a query needs and builds the Dataset from them."""
    return _dataset(path, trace, Rows(path / "allocations.parquet", table.num_rows, lambda c: [table.select(c)]),
                    stacks, modules)


def _dataset(path: Path, trace: dict, rows: Rows, stacks: pa.Table, modules: pa.Table) -> Dataset:
    rows.load(OPENED)
    stack_id = stacks["stack_id"].to_numpy()
    check_stacks(path, stack_id, np.zeros(0, dtype=np.int64))  # references: when alloc_stack is read
    rows.stacks = len(stack_id)
    frames = stacks["frames"].combine_chunks() if stacks.num_rows else pa.array([], pa.list_(pa.uint64()))
    if (np.diff(stack_id) < 0).any():  # in stack id order (as `pair` writes them, with no take)
        frames = frames.take(pa.array(np.argsort(stack_id)))
    return Dataset(path, trace, rows, frames, modules)

