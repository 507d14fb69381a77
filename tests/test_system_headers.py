"""Pool records with a SYSTEM header (as the kernel logs them): the thread and process come from the
record, and a stack attaches by (StackThread, EventTimeStamp) = (ThreadId, timestamp) with the CPU as a
tie-break — exact reports when the stack is logged on another CPU or two CPUs log the same timestamp."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from pooltrace.dataset import pair_trace
from pooltrace.etl.writer import TraceWriter
from pooltrace.stackjoin import NO_ID
from pooltrace.synthetic import classic_leak
from tests.conftest import ROOT, read_all

TRACES = ROOT / "traces"

K = 0xFFFFF80400000000


def frames(n: int) -> list[int]:
    return [K + 0x1000 * n + k for k in range(3)]


def report(path) -> dict:
    result = CliRunner().invoke(cli, ["report", str(path), "--format", "json", "--no-symbols"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_cross_cpu_stacks_and_same_timestamp_collisions_attach_exactly(tmp_path):
    w = TraceWriter(pointer_size=8, cpus=3)
    t = w.start_qpc + 1000
    # 1. the kernel stack of an allocation on CPU 0 is logged on CPU 1, where another event has that timestamp
    w.pool(0, t, 0x0E20, 0x200, "Aaaa", 0x10, 0xA000, tid=10, pid=100)
    w.pool(1, t, 0x0E20, 0x200, "Bbbb", 0x20, 0xB000, tid=20, pid=200)
    w.stack(1, t, t, 100, 10, frames(1))  # belongs to Aaaa (thread 10), not to Bbbb on its CPU
    w.stack(0, t, t, 200, 20, frames(2))  # belongs to Bbbb (thread 20)
    # 2. two events on one CPU with the same timestamp, stacks in the other order
    w.pool(2, t + 50, 0x0E20, 1, "Cccc", 0x40, 0xC000, tid=30, pid=300)
    w.pool(2, t + 50, 0x0E20, 1, "Dddd", 0x80, 0xD000, tid=31, pid=300)
    w.stack(2, t + 50, t + 50, 300, 31, frames(4))
    w.stack(2, t + 50, t + 50, 300, 30, frames(3))
    # 3. a stack alone on another CPU with no event of its timestamp there
    w.pool(0, t + 90, 0x0E20, 0x200, "Eeee", 0x100, 0xE000, tid=40, pid=400)
    w.stack(2, t + 90, t + 90, 400, 40, frames(5))
    w.save(tmp_path / "s.etl")
    rep = report(tmp_path / "s.etl")
    got = [(g["tags"], g["count"], g["bytes"], g["frames"]) for g in rep["groups"]]  # sorted by bytes
    want = [({tag: size}, 1, size, [f"0x{f:x}" for f in frames(n)])
            for n, tag, size in ((5, "Eeee", 0x100), (4, "Dddd", 0x80), (3, "Cccc", 0x40), (2, "Bbbb", 0x20),
                                 (1, "Aaaa", 0x10))]
    assert got == want
    assert rep["totals"]["outstanding_count"] == 5 and rep["totals"]["outstanding_bytes"] == 0x1F0
    trace = json.loads((tmp_path / "s.pooltrace" / "trace.json").read_text())["pairing"]
    assert (trace["stack_events_attached"], trace["stack_events_with_no_owner"]) == (5, 0)
    rows = {r["tag"]: (r["pid"], r["tid"]) for r in pq.read_table(tmp_path / "s.pooltrace" /
                                                                   "allocations.parquet").to_pylist()}
    assert rows == {"Aaaa": (100, 10), "Bbbb": (200, 20), "Cccc": (300, 30), "Dddd": (300, 31), "Eeee": (400, 40)}


def test_pid_and_tid_come_from_the_pool_record(tmp_path):
    """A SYSTEM record's own ThreadId/ProcessId are kept even when the stack (same thread) names another
    process; a PERFINFO record takes them from its stack."""
    w = TraceWriter(pointer_size=8, cpus=1)
    t = w.start_qpc + 10
    w.pool(0, t, 0x0E20, 0x200, "Sys ", 0x10, 0xA000, tid=10, pid=100)
    w.stack(0, t, t, 4, 10, frames(1))
    w.pool(0, t + 5, 0x0E20, 0x200, "Perf", 0x10, 0xB000, header="perfinfo")
    w.stack(0, t + 5, t + 5, 7, 70, frames(2))
    w.save(tmp_path / "p.etl")
    rep = report(tmp_path / "p.etl")
    assert sorted((list(g["tags"]), g["frames"][0]) for g in rep["groups"]) == [
        (["Perf"], f"0x{frames(2)[0]:x}"), (["Sys "], f"0x{frames(1)[0]:x}")]
    rows = {r["tag"]: (r["pid"], r["tid"]) for r in pq.read_table(tmp_path / "p.pooltrace" /
                                                                   "allocations.parquet").to_pylist()}
    assert rows == {"Sys ": (100, 10), "Perf": (7, 70)}


def test_a_stack_of_another_thread_does_not_attach(tmp_path):
    """Same CPU and timestamp but another thread: the stack is not this event's."""
    w = TraceWriter(pointer_size=8, cpus=1)
    t = w.start_qpc + 10
    w.pool(0, t, 0x0E20, 0x200, "Leak", 0x10, 0xA000, tid=10, pid=100)
    w.stack(0, t, t, 100, 11, frames(1))
    w.save(tmp_path / "o.etl")
    rep = report(tmp_path / "o.etl")
    assert [g["frames"] for g in rep["groups"]] == [["<no stack>"]]
    trace = json.loads((tmp_path / "o.pooltrace" / "trace.json").read_text())["pairing"]
    assert (trace["stack_events_attached"], trace["stack_events_with_no_owner"]) == (0, 1)


@pytest.mark.parametrize("name", ["sample-leak", "sample-leak-fixed"])
def test_shipped_samples_have_system64_pool_records(name):
    reader, tables, _ = read_all(TRACES / f"{name}.etl")
    pool = tables["pool"]
    assert reader.stats.by_header_type.get("SYSTEM64", 0) >= pool.num_rows
    assert not pa.compute.any(pa.compute.equal(pool["tid"], NO_ID)).as_py()
    assert set(pool["pid"].to_pylist()) == {4, 4242}


@pytest.mark.parametrize("header", ["system", "perfinfo"])
def test_classic_scenario_pairs_the_same_with_either_pool_header(tmp_path, header):
    w, truth = classic_leak(pool_header=header, scale=1, lost_frees=1, frees_before=3)
    w.save(tmp_path / "c.etl")
    meta = pair_trace(tmp_path / "c.etl", tmp_path / "ds")
    want = truth.expected_pair()
    assert {k: meta["pairing"][k] for k in want} == want
