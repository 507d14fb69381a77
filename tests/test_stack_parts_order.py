"""The reader hands the joiner each batch's stack parts in no particular order (it does not sort them by
time): stack attachment must not depend on that order. Pairing with every batch's stack parts shuffled
gives the same dataset, byte for byte — on a generated trace with kernel and late user parts (on another
CPU), second parts for one event, PERFINFO pool records and stack keys, and on the shipped sample."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pooltrace import dataset
from pooltrace.dataset import pair_trace
from pooltrace.etl import reader as reader_mod
from pooltrace.etl.writer import TraceWriter
from tests.conftest import ROOT

FILES = ("allocations.parquet", "stacks.parquet", "modules.parquet")


def _trace(path):
    w = TraceWriter(pointer_size=8, cpus=4, buffer_size=0x1000)
    kbase, ubase = 0xFFFFF80412000000, 0x00007FF612340000
    for k in range(2500):
        cpu, ts = k % 4, 1_000_000_000 + 7 * (k // 2)  # two CPUs log the same timestamp
        hook = 0x0E20 if k % 3 else 0x0E22
        addr = 0xFFFFA28000000000 + 0x40 * (k // 3)
        header = "perfinfo" if k % 5 == 0 else "system"
        tid = 100 + k % 6
        w.pool(cpu, ts, hook, 0x200, "Tst1", 0x40, addr, header=header,
               **({} if header == "perfinfo" else {"tid": tid, "pid": 4}))
        if k % 11 == 0:  # a cached stack: reference now, definition later
            w.stack_key_ref(cpu, ts, ts, 4, tid, 0xFFFF0000 + k % 30)
            w.stack_key_def(cpu, ts + 3, 0xFFFF0000 + k % 30, [kbase + 0x100 + k % 30, kbase + 0x200])
        else:
            w.stack(cpu, ts, ts, 4, tid, [kbase + 0x1000 + k % 37, kbase + 0x2000])
        if k % 4 == 1:  # a second kernel part for the same event: the first one (in read order) wins
            w.stack(cpu, ts + 1, ts, 4, tid, [kbase + 0x5000 + k % 5])
        if k % 3 == 2:  # the user part, later, on another CPU: matched by (thread, timestamp)
            w.stack((cpu + 1) % 4, ts + 40, ts, 4, tid, [ubase + 0x10 + k % 13, ubase + 0x20])
    path.write_bytes(w.to_bytes())
    return path


def _pair(trace, out):
    meta = pair_trace(trace, out, jobs=1)
    return {f: (out / f).read_bytes() for f in FILES}, json.dumps(meta["pairing"])


@pytest.mark.parametrize("which", ["generated", "sample-leak"])
def test_stack_attachment_does_not_depend_on_the_order_of_parts(tmp_path, monkeypatch, which):
    monkeypatch.setattr(dataset, "CHUNK_BYTES", 64 << 10)  # many batches
    trace = _trace(tmp_path / "t.etl") if which == "generated" else ROOT / "traces" / "sample-leak.etl"
    want = _pair(trace, tmp_path / "plain")
    rng = np.random.default_rng(7)
    cut = reader_mod._cut
    shuffled = []

    def shuffling_cut(t, wm, everything):
        ready, rest = cut(t, wm, everything)
        if ready is not None and len(ready) > 1:
            shuffled.append(len(ready))
            ready = ready.take(rng.permutation(len(ready)))
        return ready, rest

    monkeypatch.setattr(reader_mod, "_cut", shuffling_cut)
    got = _pair(trace, tmp_path / "shuffled")
    assert shuffled  # the stack parts did go through the shuffle
    assert got == want
    if which == "generated":
        pairing = json.loads(want[1])
        assert pairing["stack_events_attached_by_thread"] > 0 and pairing["stack_parts_ignored"] > 0
        assert pairing["allocations_with_stack"] > 0
