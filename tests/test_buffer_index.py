"""The buffer index read at once (buffers._even_run) is the walk's index, byte for byte: evenly spaced
uncompressed buffers are read many headers at a time, and everything else (damage, compressed or mixed
sizes, a truncated file) goes back to the walk with the walk's rows, warnings and counts."""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import re
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace.etl.buffers import (
    BUFFER_HEADER_SIZE,
    FLAG_COMPRESSED,
    BufferIndex,
    FileBytes,
    _merge,
    reading_order,
    scan_buffers,
)
from pooltrace.etl.chunks import plan_chunks
from pooltrace.etl.writer import TraceWriter
from tests.conftest import ROOT, SAMPLES

BUF = 0x400


@functools.lru_cache(maxsize=8)
def _trace(buffer_size: int = BUF, cpus: int = 3, records: int = 2500, compressed: bool = False,
           seed: int = 5) -> bytes:
    """A small pool trace of about records / 14 buffers per CPU (~50-byte pool records)."""
    rnd = random.Random(seed)
    w = TraceWriter(cpus=cpus, buffer_size=buffer_size, compressed=compressed)
    ts = 1_000_000_000
    for i in range(records):
        ts += rnd.randrange(1, 500)
        w.pool(rnd.randrange(cpus), ts, 0x0E20, 0, "Test", 0x40 + i % 64, 0xFFFF800000000000 + 0x40 * i,
               pid=4, tid=8)
    return w.to_bytes()


def _same(a: BufferIndex, b: BufferIndex) -> None:
    for f in dataclasses.fields(BufferIndex):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype, f.name
            assert x.tolist() == y.tolist(), f.name
        else:
            assert x == y, f.name


def _both(data: bytes) -> BufferIndex:
    """The index with the fast path, asserted equal to the walk's; from bytes and from a file."""
    walked = scan_buffers(data, fast=False)
    fast = scan_buffers(data)
    _same(fast, walked)
    return fast


class CountingFile(FileBytes):
    """A file read the way the reader reads it, counting the walk's reads (one or two per walked buffer) and
    the headers read many at a time."""

    def __init__(self, path):
        self.fh = open(path, "rb")  # noqa: SIM115 - closed by the test
        super().__init__(self.fh.fileno(), os.fstat(self.fh.fileno()).st_size)
        self.slices = 0
        self.rows = 0

    def __getitem__(self, item):
        self.slices += 1
        return super().__getitem__(item)

    def strided(self, start, stride, count, length):
        self.rows += count
        return super().strided(start, stride, count, length)


def _buffers(data: bytes) -> list[int]:
    return scan_buffers(data, fast=False).offset.tolist()


def _scanned(path, fast: bool = True) -> tuple:
    """scan_buffers over a CountingFile of `path`: the index and the file, its reads counted."""
    f = CountingFile(path)
    try:
        return scan_buffers(f, fast=fast), f
    finally:
        f.fh.close()


def test_evenly_spaced_trace_is_read_without_walking_it(tmp_path):
    data = _trace()
    path = tmp_path / "t.etl"
    path.write_bytes(data)
    idx, f = _scanned(path)
    walked_idx, walked = _scanned(path, fast=False)
    _same(idx, walked_idx)
    assert len(idx) > 100 and set(idx.size.tolist()) == {BUF}
    assert f.slices <= 3  # the header buffer, then a run of them all (the end of the file needs no read)
    assert walked.slices >= len(idx)
    _same(idx, _both(data))


def test_compressed_trace_is_the_walk():
    data = _trace(compressed=True)
    idx = _both(data)
    assert (idx.flags[1:] & FLAG_COMPRESSED).all() and len(set(idx.size.tolist())) > 3


def test_compressed_buffers_are_read_once_each(tmp_path):
    """A compressed buffer's first record is decoded from the bytes read with its header (a plain LZXpress
    stream gives 32 bytes from its first 328): one read per buffer, not two."""
    path = tmp_path / "c.etl"
    path.write_bytes(_trace(buffer_size=0x2000, records=6000, compressed=True))
    idx, f = _scanned(path)
    _same(idx, _both(path.read_bytes()))
    assert (idx.size[1:] > 0x48 + 512).all() and (idx.first_ts[1:] != np.iinfo(np.int64).min).all()
    assert f.slices <= len(idx) + 3


def test_damaged_compressed_streams_are_the_walk():
    """Bytes of compressed streams changed near their start (where the first record is decoded from) and
    further on: the index is the walk's, first timestamps and failures alike."""
    data = _trace(buffer_size=0x2000, records=6000, compressed=True)
    idx = scan_buffers(data, fast=False)
    rnd = random.Random(1415)
    seen_unknown = False
    for _ in range(80):
        bad = bytearray(data)
        for _ in range(rnd.randrange(1, 4)):
            b = rnd.randrange(1, len(idx))
            at = int(idx.offset[b]) + 0x48 + rnd.choice([rnd.randrange(8), rnd.randrange(64), rnd.randrange(600)])
            bad[at] = rnd.randrange(256)
        got = _both(bytes(bad))
        seen_unknown |= bool((got.first_ts[1:] == np.iinfo(np.int64).min).any())
    assert seen_unknown  # some streams became undecodable: their first timestamp is unknown in both


def _corrupt(data: bytes, buffer: int, field: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, _buffers(data)[buffer] + field, value)
    return bytes(out)


@pytest.mark.parametrize("field,fmt,value,said", [
    (0x00, "<I", 0x30, "corrupt buffer header"),  # BufferSize too small: the walk stops there
    (0x00, "<I", BUF * 3, None),  # a bigger BufferSize: steps over the next two (they are not indexed)
    (0x00, "<I", BUF - 8, "impossible|truncated|after the last"),  # off the grid: what follows is not buffers
    (0x30, "<I", BUF + 8, "impossible fill size"),  # fill size past the buffer
    (0x30, "<I", 0x20, "impossible fill size"),  # fill size inside the header
    (0x30, "<I", BUFFER_HEADER_SIZE, None),  # an empty buffer: first timestamp unknown
    (0x30, "<I", BUFFER_HEADER_SIZE + 16, None),  # too short for a record header
    (0x48, "<I", 0xFFFFFFFF, None),  # the first record is the end-of-data marker
    (0x4A, "<B", 0x77, None),  # an unknown header type
    (0x4B, "<B", 0x00, None),  # header flags that are not a record's
    (0x3C, "<H", 0x40, None),  # flagged compressed: decompressing garbage fails, first timestamp unknown
])
@pytest.mark.parametrize("where", [1, 2, 40, -2, -1])
def test_damaged_header_falls_back_to_the_walk(field, fmt, value, said, where):
    data = _trace()
    victim = where % len(_buffers(data))
    idx = _both(_corrupt(data, victim, field, fmt, value))
    if said:
        assert any(re.search(said, w) for w in idx.warnings)


@pytest.mark.parametrize("cut", [1, 0x30, 0x48, 0x48 + 0x20, 0x200, BUF - 1])
@pytest.mark.parametrize("buffer", [-1, 30])
def test_truncated_file_is_the_walk(cut, buffer):
    data = _trace()
    off = _buffers(data)[buffer]
    idx = _both(data[:off + cut])
    assert any("truncated" in w or "after the last buffer" in w for w in idx.warnings)


@pytest.mark.parametrize("tail", [b"\x00" * 5000, b"\xff" * 4096, b"\x00" * 100, b"junk" * 300,
                                  b"\x00" * BUF], ids=["zeros", "ff", "few-zeros", "junk", "zero-buffer"])
def test_bytes_after_the_last_buffer(tail):
    _both(_trace() + tail)


def test_mixed_buffer_sizes_are_the_walk():
    """Buffers of different sizes back to back (as in merged files): runs of each size, walked in between."""
    small, big = _trace(BUF), _trace(0x800, seed=9)
    s, b = _buffers(small), _buffers(big)
    mixed = small[:s[50]] + big[b[1]:b[40]] + small[s[50]:s[51]] + big[b[40]:b[41]] + small[s[51]:]
    idx = _both(mixed)
    assert {BUF, 0x800} <= set(idx.size.tolist()) and not idx.warnings
    assert len(idx) == len(s) + 40


def test_spacing_that_keeps_changing_is_read_at_most_twice(tmp_path):
    """Pairs of equal-size buffers with the size changing after each pair: every try to read ahead fails
    at its first header; the headers read in vain are paid back by walking before the next try."""
    small, big = _trace(BUF), _trace(0x800, seed=9)
    s, b = _buffers(small), _buffers(big)
    parts = [small[:s[1]]]
    for k in range(1, 40, 2):
        parts += [small[s[k]:s[k + 2]], big[b[k]:b[k + 2]]]
    path = tmp_path / "pairs.etl"
    path.write_bytes(b"".join(parts))
    idx, f = _scanned(path)
    _same(idx, _both(path.read_bytes()))
    assert len(idx) == 81
    assert f.rows <= len(idx) + 32


def test_random_header_damage_is_the_walk():
    data = _trace(cpus=2, records=900)
    offsets = _buffers(data)
    rnd = random.Random(1414)
    for _ in range(60):
        bad = bytearray(data)
        for _ in range(rnd.randrange(1, 4)):
            at = rnd.choice(offsets[1:]) + rnd.randrange(0x68)
            bad[at] = rnd.randrange(256)
        _both(bytes(bad))


def test_real_and_shipped_traces_index_as_the_walk(tmp_path):
    paths = sorted(SAMPLES.glob("*.etl")) + sorted((ROOT / "traces").glob("*.etl"))
    assert paths
    for p in paths:
        with open(p, "rb") as fh:
            fast = scan_buffers(FileBytes(fh.fileno(), os.fstat(fh.fileno()).st_size))
        _same(fast, _both(p.read_bytes()))


# -- reading order ---------------------------------------------------------------------------------------

def _index(cpu, seq, first_ts) -> BufferIndex:
    n = len(cpu)
    z = np.zeros(n, dtype=np.int64)
    return BufferIndex(offset=np.arange(n, dtype=np.int64), size=z + 1, filled=z + 0x1000,
                       cpu=np.array(cpu, dtype=np.int64), seq=np.array(seq, dtype=np.uint64), flags=z, state=z,
                       first_ts=np.array(first_ts, dtype=np.int64))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40), st.sampled_from([-(1 << 63), 0, 5, 7, 9, 100])),
                min_size=1, max_size=40),
       st.booleans())
def test_reading_order_is_the_merge_of_the_cpu_queues(rows, in_time_order):
    """The vectorized order (queues in time order) and the heap merge are the same order."""
    cpu, seq, ts = (list(c) for c in zip(*rows, strict=True))
    if in_time_order:  # each CPU's buffers in SequenceNumber order start no earlier than the one before
        idx = _index(cpu, seq, ts)
        queued = np.lexsort((np.arange(len(cpu)), idx.seq, idx.cpu))
        by_cpu: dict[int, list[int]] = {}
        for i in queued[queued >= 1].tolist():
            by_cpu.setdefault(cpu[i], []).append(i)
        for members in by_cpu.values():
            for i, t in zip(members, sorted(ts[i] for i in members), strict=True):
                ts[i] = t
    idx = _index(cpu, seq, ts)
    order, wm = reading_order(idx)
    ids = np.arange(1, len(cpu))
    merged = _merge(idx, ids[np.lexsort((ids, idx.seq[ids], idx.cpu[ids]))])
    assert order.tolist() == merged.tolist()
    assert order.dtype == np.int64 and wm.dtype == np.int64


@pytest.mark.parametrize("chunk_bytes", [0, 1, 0x1000, 0x2800, 0x10000, 1 << 30])
def test_plan_groups_buffers_until_a_chunk_is_full(chunk_bytes):
    data = _trace()
    idx = scan_buffers(data)
    plan = plan_chunks(idx, chunk_bytes)
    order, wm = reading_order(idx)
    assert plan[0][0] == [0]
    assert [b for group, _ in plan[1:] for b in group] == order.tolist()
    ends = np.cumsum([len(g) for g, _ in plan[1:]]) - 1
    assert [w for _, w in plan[1:]] == wm[ends].tolist()
    for group, _ in plan[1:-1]:  # every group but the last reaches chunk_bytes, and only with its last buffer
        filled = idx.filled[group]
        assert filled.sum() >= chunk_bytes and filled[:-1].sum() < max(chunk_bytes, 1)
