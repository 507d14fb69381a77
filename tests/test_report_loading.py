"""How `report` opens a dataset (pooltrace.datasetopen.Rows): only the allocation columns an analysis uses
are read, each checked when it is read; a report streams its columns part by part and holds no full
column but the tags; a report on a dataset loads no trace decoder and no pandas."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pooltrace import api
from pooltrace.cli import cli
from pooltrace.datasetopen import OPENED, load_dataset
from tests.conftest import ROOT, pair_sample

SAMPLE = ROOT / "traces" / "sample-leak.etl"


@pytest.fixture(scope="module")
def paired(tmp_path_factory) -> Path:
    return pair_sample(tmp_path_factory, SAMPLE)


def test_columns_are_read_when_first_used(paired):
    ds = load_dataset(paired)
    assert set(ds.rows) == set(OPENED)
    rep, _ = api.analyze(ds, paired, no_symbols=True)  # the report streams its columns: none is kept
    assert set(ds.rows) == set(OPENED) and rep.outstanding_count > 0
    full = pq.read_table(paired / "allocations.parquet")
    assert ds.rows["tid"].tolist() == full["tid"].to_pylist()
    assert ds.rows["lost_free"].tolist() == [f == "lost_free" for f in full["fate"].to_pylist()]
    assert {"tid", "lost_free", "outstanding_at_end"} <= set(ds.rows)
    with pytest.raises(KeyError):
        ds.rows["no_such_column"]


def test_a_null_in_a_column_is_found_when_it_is_read(paired, tmp_path):
    """A report does not read tid: the plain report is the intact one; --list reads tid and refuses the file."""
    ds = tmp_path / "ds"
    shutil.copytree(paired, ds)
    table = pq.read_table(ds / "allocations.parquet")
    tid = table["tid"].to_pylist()
    pq.write_table(table.set_column(table.schema.get_field_index("tid"), "tid",
                                    pa.array([None] + tid[1:], pa.uint32())), ds / "allocations.parquet")
    intact = CliRunner().invoke(cli, ["report", str(paired), "--no-symbols"])
    plain = CliRunner().invoke(cli, ["report", str(ds), "--no-symbols"])
    assert plain.exit_code == 0 and plain.output == intact.output.replace(str(paired), str(ds))
    listed = CliRunner().invoke(cli, ["report", str(ds), "--no-symbols", "--list"])
    lines = listed.output.strip().splitlines()
    assert listed.exit_code == 2 and len(lines) == 1, listed.output
    assert str(ds / "allocations.parquet") in lines[0] and "column 'tid' has 1 nulls" in lines[0]


def test_a_report_on_a_dataset_loads_no_decoder_and_no_pandas(paired):
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print(sorted(m for m in ('pandas', 'pooltrace.dataset', 'pooltrace.etl.reader') "
            "if m in sys.modules), file=sys.stderr))\n"
            "from pooltrace.cli import main\n"
            f"sys.argv = ['pooltrace', 'report', {str(paired)!r}, '--no-symbols', '--format', 'json']\n"
            "main()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "[]"


def test_a_streamed_report_equals_one_over_loaded_columns(paired):
    """build_report over parts read one at a time gives the report of the same rows already in memory
    (and the part boundaries do not matter): groups, growth, totals, outstanding rows."""
    from pooltrace.reporters import structured

    def report(ds, by):
        rep, _ = api.analyze(ds, paired, by=by, no_symbols=True, window="1:")
        return structured.to_json(rep), rep.rows.tolist()

    for by in ("stack", "function", "tag"):
        streamed = load_dataset(paired)
        loaded = load_dataset(paired)
        loaded.rows.load(["size", "alloc_ns", "free_ns", "pid", "alloc_stack"])
        assert report(streamed, by) == report(loaded, by)
    small = load_dataset(paired)
    parts = small.rows._parts
    small.rows._parts = lambda names: (p for part in parts(names)  # an empty part first, then 7 rows each
                                       for p in [part.slice(0, 0), *(part.slice(i, 7)
                                                                     for i in range(0, part.num_rows, 7))])
    assert report(small, "stack") == report(load_dataset(paired), "stack")


def test_prefetched_keeps_order_errors_and_early_stops():
    """Row groups read one ahead on a thread come in order; an error of the reader is raised at its place;
    a consumer that stops early does not leave the reader running."""
    from pooltrace.datasetopen import prefetched

    assert list(prefetched(iter(range(50)))) == list(range(50))
    assert list(prefetched([])) == []

    def failing():
        yield 1
        yield 2
        raise ValueError("damaged part")

    got = []
    with pytest.raises(ValueError, match="damaged part"):
        for x in prefetched(failing()):
            got.append(x)
    assert got == [1, 2]

    produced = []

    def counting():
        for i in range(100):
            produced.append(i)
            yield i

    it = prefetched(counting())
    assert next(it) == 0
    it.close()
    assert len(produced) <= 2  # at most the one read ahead


@pytest.mark.parametrize("by", ["stack", "function", "tag"])
def test_a_stack_id_past_the_stacks_is_refused_before_a_part_is_used(paired, tmp_path, by):
    """The streamed report indexes per-stack arrays with each part's stack ids: an id past the stacks (a
    tampered or bit-flipped file) is the one-line error naming the file, for every grouping."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = tmp_path / "ds"
    shutil.copytree(paired, ds)
    t = pq.read_table(ds / "allocations.parquet")
    n_stacks = pq.read_metadata(ds / "stacks.parquet").num_rows
    stack = t["alloc_stack"].to_pylist()
    stack[next(i for i in range(len(stack) // 2, len(stack)) if stack[i] is not None)] = n_stacks + 250
    t = t.set_column(t.schema.get_field_index("alloc_stack"), t.schema.field("alloc_stack"),
                     pa.array(stack, t.schema.field("alloc_stack").type))
    pq.write_table(t, ds / "allocations.parquet")
    r = CliRunner().invoke(cli, ["report", str(ds), "--by", by, "--format", "json"])
    assert r.exit_code == 2, r.output
    assert f"refers to stack {n_stacks + 250} of {n_stacks}" in r.stderr and "Traceback" not in r.output
