"""`pair` computes summary.npz from the rows as it writes them (pooltrace.summaryscan): the same arrays as
write_summary, which re-reads the finished dataset, for the shipped samples and for generated traces with odd
rows (frees without allocations, times before the trace and out of order, no duration, many row groups, tags
that are not text), and write_summary still takes over when the scan cannot (too many rows kept)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pooltrace.dataset as dataset
import pooltrace.summaryscan as summaryscan
from pooltrace.etl.writer import TraceWriter
from pooltrace.outputs import DATASET_FILES
from pooltrace.summary import NAME, write_summary
from tests.conftest import ROOT


def _no_reread(ds_dir):
    raise AssertionError("pair re-read its rows for the summary")


def _same_as_write_summary(ds: Path, tmp: Path) -> None:
    """ds's summary.npz holds exactly the arrays write_summary computes from its files."""
    again = tmp / "again"
    shutil.copytree(ds, again)
    (again / NAME).unlink()
    assert write_summary(again)
    with np.load(ds / NAME) as got, np.load(again / NAME) as want:
        assert sorted(got.files) == sorted(want.files)
        for name in want.files:
            assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name
    shutil.rmtree(again)


@pytest.mark.parametrize("name", ["sample-leak", "sample-growth", "sample-leak-fixed"])
@pytest.mark.parametrize("small", [False, True])
def test_the_summary_of_the_samples(tmp_path, monkeypatch, name, small):
    monkeypatch.setattr(dataset, "write_summary", _no_reread)
    if small:  # many row groups (each its own tag dictionary), written before the reader's last batch (kept)
        monkeypatch.setattr(dataset, "ROW_GROUP", 50)
        monkeypatch.setattr(dataset, "CHUNK_BYTES", 1 << 16)
    dataset.pair_trace(ROOT / "traces" / f"{name}.etl", tmp_path / "ds", window_s=0.01 if small else 2.0)
    _same_as_write_summary(tmp_path / "ds", tmp_path)


TAGS = ["Leak", "Irp ", "File", "MmSt", 0x5C00FF01, 0x20202020, 0x7F414243]  # raw ones: \x escapes, DEL


def _trace(path: Path, seed: int, events: int, cpus: int) -> None:
    """Allocations and frees at random times (some before the trace's start, some out of order on a CPU),
    frees of blocks never allocated, addresses reused (lost frees), random tags and stacks."""
    rng = random.Random(seed)
    w = TraceWriter(pointer_size=8, cpus=cpus, buffer_size=0x1000)
    start = w.start_qpc
    live: list[int] = []
    ts = start + rng.randrange(-50_000, 50_000)
    for _ in range(events):
        ts += rng.randrange(0, 20_000) if rng.random() < 0.9 else -rng.randrange(0, 400_000)  # times go back
        ts = max(ts, 1)
        alloc = rng.random() < 0.6 or not live
        addr = rng.randrange(1, 40) * 0x100 if alloc or rng.random() < 0.2 else rng.choice(live)
        if alloc:
            live.append(addr)
        elif addr in live:
            live.remove(addr)
        cpu = rng.randrange(cpus)
        w.pool(cpu, ts, 0x0E20 if alloc else 0x0E22, rng.choice([0x200, 0x1]), rng.choice(TAGS),
               rng.randrange(1, 1 << rng.choice([8, 20, 40])), 0xFFFF_A000_0000_0000 + addr, tid=8, pid=4)
        if rng.random() < 0.8:
            w.stack(cpu, ts, ts, 4, 8, [0xFFFFF80000000000 + rng.randrange(6) * 0x100 + k
                                        for k in range(rng.randrange(1, 4))])
    w.save(path)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 100_000), events=st.sampled_from([0, 1, 7, 60, 400]), cpus=st.integers(1, 3),
       row_group=st.sampled_from([3, 64, dataset.ROW_GROUP]))
def test_the_summary_of_generated_traces(tmp_path_factory, seed, events, cpus, row_group):
    tmp = tmp_path_factory.mktemp("scan")
    _trace(tmp / "t.etl", seed, events, cpus)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataset, "write_summary", _no_reread)
        mp.setattr(dataset, "ROW_GROUP", row_group)
        mp.setattr(dataset, "CHUNK_BYTES", 0x2000)  # many batches: rows written before the last one
        meta = dataset.pair_trace(tmp / "t.etl", tmp / "ds", window_s=0.0001)
    files = sorted(p.name for p in (tmp / "ds").iterdir())
    if meta["duration_ns"] is None:  # no events: no summary, as write_summary decides
        assert files == sorted(set(DATASET_FILES) - {NAME}) and not write_summary(tmp / "ds")
    else:
        assert files == sorted(DATASET_FILES)
        _same_as_write_summary(tmp / "ds", tmp)
    shutil.rmtree(tmp)


def test_too_many_rows_kept_leave_the_summary_to_write_summary(tmp_path, monkeypatch):
    """Beyond KEEP_BYTES of columns kept before the trace's end is known, the scan gives up (memory stays
    bounded) and write_summary re-reads the file: the same summary."""
    calls = []
    monkeypatch.setattr(dataset, "write_summary", lambda ds: calls.append(ds) or write_summary(ds))
    monkeypatch.setattr(dataset, "ROW_GROUP", 40)
    monkeypatch.setattr(summaryscan, "KEEP_BYTES", 2000)
    monkeypatch.setattr(dataset, "CHUNK_BYTES", 1 << 16)  # many batches: rows written before the last one
    dataset.pair_trace(ROOT / "traces" / "sample-leak.etl", tmp_path / "ds", window_s=0.001)
    assert len(calls) == 1
    _same_as_write_summary(tmp_path / "ds", tmp_path)


def test_stacks_merged_after_the_rows_are_written(tmp_path, monkeypatch):
    """A stack key whose definition holds the frames of an explicit stack: the two stack ids become one and
    the rows are rewritten, so the summary computed while they were written is dropped (no file of it is
    left) and write_summary reads the rewritten rows."""
    calls = []
    monkeypatch.setattr(dataset, "write_summary", lambda ds: calls.append(ds) or write_summary(ds))
    w = TraceWriter(pointer_size=8, cpus=1)
    t = w.start_qpc + 100
    key = 0xFFFFC00000001000
    w.pool(0, t, 0x0E20, 0, "Leak", 32, 0xA000, tid=8, pid=4)
    w.stack(0, t, t, 4, 8, [1, 2, 3])
    w.pool(0, t + 20, 0x0E20, 0, "Leak", 48, 0xB000, tid=8, pid=4)
    w.stack_key_ref(0, t + 20, t + 20, 4, 8, key)
    w.stack_key_def(0, t + 30, key, [1, 2, 3])
    w.save(tmp_path / "k.etl")
    meta = dataset.pair_trace(tmp_path / "k.etl", tmp_path / "ds")
    assert meta["pairing"]["distinct_stacks"] == 1 and len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == sorted(DATASET_FILES)
    _same_as_write_summary(tmp_path / "ds", tmp_path)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 120), st.integers(-5, 130), st.integers(0, 1 << 40), st.integers(-1, 9)),
                max_size=60), st.integers(0, 60), st.integers(0, 4), st.integers(0, 10))
def test_growth_counts_grown_as_keys_come_are_the_counts_of_all_keys(rows, cut, first, more):
    """GrowthCounts.grow (the summary's scan meets stacks as it goes): rows counted before and after the
    table grows give the arrays of a table made for every key at once, the rows not counted included."""
    from pooltrace.datasetopen import NULL_NS
    from pooltrace.growth import GrowthCounts

    a = np.array([r[0] if r[0] >= 0 else NULL_NS for r in rows], dtype=np.int64)
    f = np.array([r[1] if r[1] >= 0 else NULL_NS for r in rows], dtype=np.int64)
    size = np.array([r[2] for r in rows], dtype=np.uint64)
    keys = first + more
    key = np.array([min(r[3], keys - 1) if keys else -1 for r in rows], dtype=np.int64)
    key[:cut] = np.minimum(key[:cut], first - 1)  # the first rows only know the first keys
    whole = GrowthCounts(keys, 0, 100, NULL_NS, points=8)
    whole.add(a, f, size, key)
    grown = GrowthCounts(first, 0, 100, NULL_NS, points=8)
    grown.add(a[:cut], f[:cut], size[:cut], key[:cut])
    grown.grow(keys)
    grown.add(a[cut:], f[cut:], size[cut:], key[cut:])
    assert grown.keys == whole.keys
    for name in ("up_w", "up_c", "down_w", "down_c"):
        assert np.array_equal(getattr(grown, name), getattr(whole, name)), name
