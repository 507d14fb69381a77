"""The Python API: a paired trace as pandas DataFrames, and the report, diff and whose answers as data.

    >>> import pooltrace
    >>> ds = pooltrace.open("traces/sample-leak.etl")      # paired on the fly, cached beside it
    >>> ds.allocations.dtypes["address"]                   # uint64[pyarrow]: exact 64-bit addresses
    >>> ds.outstanding(by="function").head()               # the groups of `pooltrace report --format json`

The CLI's report and diff go through the same functions (`analyze`), so the numbers are the same.
pandas is imported when a DataFrame is built, never by ``import pooltrace``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pooltrace import pooltypes
from pooltrace.analysis import BY, Filters, Report, build_report, parse_window
from pooltrace.datasetopen import Dataset, open_input
from pooltrace.errors import PooltraceError
from pooltrace.frames import FrameRenderer

if TYPE_CHECKING:
    import pandas as pd

    from pooltrace.compare import Diff
    from pooltrace.trends import RunReport  # noqa: F401

__all__ = ["TraceDataset", "Owners", "open", "diff", "trend", "whose", "analyze", "make_symbolizer", "run_reports"]

Warn = Callable[[str], None]


# ---- the one code path of report, diff, trend and the API ----------------------------------------------

def make_symbolizer(ds: Dataset, input_path: Path, symbols: str | None = None, no_symbols: bool = False,
                    quiet: bool = True, warn: Warn | None = None):
    """The Symbolizer for a dataset, searching the trace's own directory (shipped sample PDBs) offline."""
    from pooltrace.symbols import Symbolizer

    input_path = Path(input_path)
    local = [input_path.parent if input_path.is_file() else input_path, ds.path]
    return Symbolizer(ds.modules, symbol_path=symbols, enabled=not no_symbols, local_dirs=local,
                      progress=not quiet, warn=warn)


def analyze(ds: Dataset, input_path: Path, *, by: str = "stack", window: str | None = None,
            filters: Filters | None = None, symbols: str | None = None, no_symbols: bool = False,
            top: int | None = None, quiet: bool = True, warn: Warn | None = None,
            render: FrameRenderer | None = None, sort: str = "bytes",
            rows: bool = False) -> tuple[Report, FrameRenderer]:
    """The outstanding report of one dataset, as `pooltrace report` builds it, and its frame renderer
    (`render`: reuse one, with its symbols, across calls on the same dataset); `sort`: bytes or growth;
    `rows`: the Report's outstanding rows are wanted (else they may stay unread: the dataset's summary)."""
    if by not in BY:
        raise PooltraceError(f"by={by!r}: one of {', '.join(BY)}")
    if render is None:
        render = FrameRenderer(ds, make_symbolizer(ds, input_path, symbols, no_symbols, quiet, warn))
    rep = build_report(ds, window=parse_window(window, ds.trace.get("duration_ns")), by=by,
                       filters=filters or Filters(), render=render, top=top, sort=sort, summary=not rows,
                       warn=warn)
    return rep, render


def _filters(tag: str | Sequence[str] | None, pool: str | None, pid: int | Sequence[int] | None,
             module: str | Sequence[str] | None, min_bytes: int) -> Filters:
    def many(v):
        return [] if v is None else [v] if isinstance(v, str | int) else list(v)

    if pool is not None and pool not in pooltypes.FILTERS:
        raise PooltraceError(f"pool={pool!r}: one of {', '.join(pooltypes.FILTERS)}")
    return Filters(many(tag), pool, [int(p) for p in many(pid)], many(module), int(min_bytes))


# ---- DataFrames with faithful dtypes -------------------------------------------------------------------

def _frame(table) -> pd.DataFrame:
    """An Arrow table as pandas with Arrow-backed dtypes: nullable integers stay integers, uint64 stays
    exact, strings stay strings (dictionary columns are decoded, not turned into categoricals)."""
    import pandas as pd
    import pyarrow as pa

    cols = []
    for i, f in enumerate(table.schema):
        col = table.column(i)
        cols.append(col.cast(f.type.value_type) if pa.types.is_dictionary(f.type) else col)
    names = table.schema.names
    table = pa.Table.from_arrays(cols, names=names)
    return table.to_pandas(types_mapper=pd.ArrowDtype)


def _groups_frame(groups: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    import pandas as pd
    import pyarrow as pa

    frames = pa.array([g["frames"] for g in groups], pa.list_(pa.string()))
    data: dict[str, Any] = {"frames": pd.Series(frames, dtype=pd.ArrowDtype(frames.type))}
    for c in columns:
        data[c] = [g[c] for g in groups]
    return pd.DataFrame(data, columns=["frames", *columns])


class TraceDataset:
    """One paired run: `allocations`, `stacks` and `modules` as DataFrames, `trace` (trace.json), and the
    report's outstanding groups. Symbols: `symbols` is a symbol path (_NT_SYMBOL_PATH syntax; default
    $_NT_SYMBOL_PATH, offline when unset); `no_symbols` keeps module+0xrva frames."""

    def __init__(self, ds: Dataset, source: Path, *, symbols: str | None = None, no_symbols: bool = False):
        self._ds = ds
        self.source = Path(source)
        self.path = ds.path
        self._symbols, self._no_symbols = symbols, no_symbols
        self._render: FrameRenderer | None = None
        self._cache: dict[str, pd.DataFrame] = {}

    def __repr__(self) -> str:
        return f"<TraceDataset {self.source} ({self._ds.n:,} allocations)>"

    @property
    def trace(self) -> dict:
        """trace.json: trace facts, events by kind, losses and pairing diagnostics."""
        return self._ds.trace

    def _table(self, name: str) -> pd.DataFrame:
        if name not in self._cache:
            import pyarrow.parquet as pq

            self._cache[name] = _frame(pq.read_table(self.path / f"{name}.parquet"))
        return self._cache[name].copy(deep=False)

    @property
    def allocations(self) -> pd.DataFrame:
        """One row per allocation (schema in the README, "Dataset"); unknown times and stacks are <NA>."""
        return self._table("allocations")

    @property
    def stacks(self) -> pd.DataFrame:
        """stack_id and frames (return addresses, innermost first, uint64)."""
        return self._table("stacks")

    @property
    def modules(self) -> pd.DataFrame:
        """Every image seen, with its PDB identity when the trace carries it."""
        return self._table("modules")

    def _renderer(self) -> FrameRenderer:
        if self._render is None:
            self._render = FrameRenderer(self._ds, make_symbolizer(self._ds, self.source, self._symbols,
                                                                   self._no_symbols))
        return self._render

    def frames(self, stack_id: int, pid: int = 0, ns: int = 0) -> list[str]:
        """The stack's frames, innermost first: ``module!function+0xoff``, ``module+0xrva`` or ``0xaddress``
        (`pid` and `ns` place user-mode frames in the right process image)."""
        if not 0 <= int(stack_id) < len(self._ds.stacks):
            raise PooltraceError(f"stack {stack_id}: no such stack (0..{len(self._ds.stacks) - 1})")
        return list(self._renderer().stack(int(stack_id), pid, ns)[0])

    def report(self, *, by: str = "stack", window: str | None = None, tag: str | Sequence[str] | None = None,
               pool: str | None = None, pid: int | Sequence[int] | None = None,
               module: str | Sequence[str] | None = None, min_bytes: int = 0, top: int | None = None,
               sort: str = "bytes") -> Report:
        """The report object `pooltrace report` renders (analysis.Report)."""
        return analyze(self._ds, self.source, by=by, window=window, filters=_filters(tag, pool, pid, module, min_bytes),
                       top=top, render=self._renderer(), sort=sort)[0]

    def outstanding(self, *, by: str = "stack", window: str | None = None, tag: str | Sequence[str] | None = None,
                    pool: str | None = None, pid: int | Sequence[int] | None = None,
                    module: str | Sequence[str] | None = None, min_bytes: int = 0,
                    top: int | None = None, sort: str = "bytes") -> pd.DataFrame:
        """Outstanding allocations (allocated in `window` and not freed by its end) grouped `by` stack,
        function, module or tag: one row per group, largest first, with the columns of the JSON report's
        groups (frames, count, bytes, tags, growth); `sort` "growth" orders them as ``--sort growth``.
        ``.attrs`` holds the totals and the window."""
        from pooltrace.reporters.structured import report_data

        data = report_data(self.report(by=by, window=window, tag=tag, pool=pool, pid=pid, module=module,
                                       min_bytes=min_bytes, top=top, sort=sort))
        df = _groups_frame(data["groups"], ["count", "bytes", "tags", "growth"])
        df = df.astype({"count": "int64", "bytes": "int64"})
        df.attrs.update({k: v for k, v in data.items() if k != "groups"})
        return df


def open(path: str | Path, *, run: str | None = None, label: Sequence[str] = (), symbols: str | None = None,  # noqa: A001
         no_symbols: bool = False, progress: Callable[[int, int], None] | None = None) -> TraceDataset:
    """A dataset directory, an .etl paired on the fly into ``<trace>.pooltrace/`` (reused while fresh), or
    one run of a run store (`run` id, or `label` items ``key=value`` that select exactly one run)."""
    path = Path(path)
    if run is not None or label:
        from pooltrace.store import expand_inputs

        items = expand_inputs([path], [run] if run is not None else [], list(label))
        if len(items) != 1:
            raise PooltraceError(f"{path}: the selection picks {len(items)} runs; open needs one")
        path = items[0]["path"]
    return TraceDataset(open_input(path, progress=progress), path, symbols=symbols, no_symbols=no_symbols)


def _dataset(x: str | Path | TraceDataset, symbols: str | None, no_symbols: bool) -> TraceDataset:
    return x if isinstance(x, TraceDataset) else open(x, symbols=symbols, no_symbols=no_symbols)


def diff_runs(base: TraceDataset, new: TraceDataset, *, by: str = "stack", window: str | None = None,
              filters: Filters | None = None, normalize: str | None = None) -> Diff:
    """The Diff object `pooltrace diff` renders."""
    from pooltrace.compare import diff_reports

    reports = []
    for d in (base, new):
        reports.append(analyze(d._ds, d.source, by=by, window=window, filters=filters, render=d._renderer())[0])
    return diff_reports(reports[0], reports[1], normalize)


def diff(base: str | Path | TraceDataset, new: str | Path | TraceDataset, *, by: str = "stack",
         window: str | None = None, tag: str | Sequence[str] | None = None, pool: str | None = None,
         pid: int | Sequence[int] | None = None, module: str | Sequence[str] | None = None, min_bytes: int = 0,
         normalize: str | None = None, symbols: str | None = None, no_symbols: bool = False) -> pd.DataFrame:
    """Outstanding groups of `base` and `new` matched as `pooltrace diff` does: one row per group with the
    columns of its JSON groups (frames, base/new/delta count and bytes, status); ``.attrs["totals"]``."""
    import json

    from pooltrace.reporters.diffout import to_json

    d = diff_runs(_dataset(base, symbols, no_symbols), _dataset(new, symbols, no_symbols), by=by, window=window,
                  filters=_filters(tag, pool, pid, module, min_bytes), normalize=normalize)
    data = json.loads(to_json(d))
    cols = ["base_count", "base_bytes", "new_count", "new_bytes", "delta_count", "delta_bytes", "status"]
    df = _groups_frame(data["groups"], cols)
    df.attrs.update({"totals": data["totals"], "normalize": data["normalize"],
                     "base_scale_ratio": data["base_scale_ratio"]})
    return df


# ---- trend -------------------------------------------------------------------------------------------

def run_reports(paths: Sequence[str | Path], *, run_ids: Sequence[str] = (), labels: Sequence[str] = (),
                by: str = "stack", window: str | None = None, filters: Filters | None = None,
                symbols: str | None = None, no_symbols: bool = False, quiet: bool = True, warn: Warn | None = None,
                progress_for: Callable[[Path], Any] | None = None) -> list[RunReport]:
    """The report of every run, in order: .etl files and datasets as given, runs of a store selected by id
    or label (their outstanding rows read with one DuckDB query). `progress_for(path)`: a context manager
    yielding a pairing progress callback (the CLI's bar)."""
    from contextlib import nullcontext

    from pooltrace.store import expand_inputs, outstanding_datasets
    from pooltrace.trends import RunReport

    items = expand_inputs([Path(p) for p in paths], run_ids, labels)
    stored = [it for it in items if it["store"] is not None]
    from_store = dict(zip([id(it) for it in stored], outstanding_datasets(stored, window), strict=True))
    out = []
    for it in items:
        ds = from_store.get(id(it))
        if ds is None:
            with progress_for(it["path"]) if progress_for else nullcontext(None) as progress:
                ds = open_input(it["path"], progress=progress)
        rep = analyze(ds, it["path"], by=by, window=window, filters=filters, symbols=symbols, no_symbols=no_symbols,
                      quiet=quiet, warn=warn)[0]
        source = (ds.trace.get("source") or {}).get("path") or str(it["path"])
        out.append(RunReport(it["name"], source, rep, it["labels"]))
    return out


def trend(*runs: str | Path, run: Sequence[str] = (), label: Sequence[str] = (), by: str = "stack",
          window: str | None = None, tag: str | Sequence[str] | None = None, pool: str | None = None,
          pid: int | Sequence[int] | None = None, module: str | Sequence[str] | None = None, min_bytes: int = 0,
          tolerance: float = 0.10, symbols: str | None = None, no_symbols: bool = False) -> pd.DataFrame:
    """`pooltrace trend` as a DataFrame: one row per group (frames, status, first_run, then bytes_K and
    count_K for every run K); ``.attrs["runs"]`` describes the runs."""
    from pooltrace.reporters.trendout import to_data
    from pooltrace.trends import build_trend

    reports = run_reports(runs, run_ids=run, labels=label, by=by, window=window,
                          filters=_filters(tag, pool, pid, module, min_bytes), symbols=symbols, no_symbols=no_symbols)
    data = to_data(build_trend(reports, tolerance))
    n = len(reports)
    groups = [{"frames": g["frames"], "status": g["status"], "first_run": g["first_run"],
               **{f"bytes_{k + 1}": g["bytes"][k] for k in range(n)},
               **{f"count_{k + 1}": g["count"][k] for k in range(n)}} for g in data["groups"]]
    cols = ["status", "first_run", *[f"bytes_{k}" for k in range(1, n + 1)], *[f"count_{k}" for k in range(1, n + 1)]]
    df = _groups_frame(groups, cols)
    df.attrs.update({"runs": data["runs"], "by": by})
    return df.astype({c: "int64" for c in cols[1:]})


# ---- whose ----------------------------------------------------------------------------------------------

@dataclass
class Owners:
    """The three answers of `pooltrace whose`: call sites in the trace, pooltag.txt entries, driver files."""

    tag: str
    trace: pd.DataFrame  # module, site, caller, allocations, outstanding, outstanding_bytes
    pooltag: pd.DataFrame  # tag, binary, module, component, description, line, wildcard
    files: pd.DataFrame  # path, count, code_loads, offsets
    verdict: str
    warnings: list[str]
    answer: dict  # everything, as `pooltrace whose --json` prints it


def whose(tag: str, *paths: str | Path, pooltag: str | Path | None = None, symbols: str | None = None,
          no_symbols: bool = False, scan: bool = True, top: int = 10) -> Owners:
    """Who owns pool tag `tag` (``?``/``*`` wildcards): `paths` are at most one trace (.etl or dataset) and
    directories or files to scan for the tag's bytes."""
    import pandas as pd

    from pooltrace.owners import find_owners

    a = find_owners(tag, [Path(p) for p in paths], pooltag=Path(pooltag) if pooltag else None, symbols=symbols,
                    no_symbols=no_symbols, scan=scan, top=top)
    sites = [{"module": o["module"], **s} for o in (a.get("trace") or {}).get("owners", []) for s in o["sites"]]
    trace = pd.DataFrame(sites, columns=["module", "site", "caller", "allocations", "outstanding",
                                         "outstanding_bytes"])
    pt = pd.DataFrame(a["pooltag"]["entries"], columns=["tag", "binary", "module", "component", "description",
                                                        "line", "wildcard"])
    files = pd.DataFrame((a.get("scan") or {}).get("files", []), columns=["path", "count", "code_loads", "offsets"])
    return Owners(a["tag"], trace, pt, files, a["verdict"], a["warnings"], a)
