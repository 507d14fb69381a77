"""Generated traces round-trip: what the writer puts in is what the reader gives back — both pointer
sizes, compressed or not, several CPUs whose buffers are interleaved in the file, buffers small enough
that every stream spans many of them."""

from __future__ import annotations

import random
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace.etl.writer import TraceWriter
from tests.conftest import read_all

TAGS = ["Leak", "Irp ", "MmSt", "File", "Ntf\x00"]


def build(seed: int, ptr: int, compressed: bool, cpus: int, n: int, buffer_size: int = 0x1000):
    rng = random.Random(seed)
    w = TraceWriter(pointer_size=ptr, cpus=cpus, compressed=compressed, buffer_size=buffer_size)
    top = (1 << (8 * ptr)) - 1
    want: dict[str, list[tuple]] = {k: [] for k in ("pool", "stacks", "key_refs", "key_defs", "image", "process",
                                                    "thread", "ktc_rsds")}
    clocks = [w.start_qpc + 10] * cpus
    for _ in range(n):
        cpu = rng.randrange(cpus)
        clocks[cpu] += rng.choice([0, 1, 1, 7, 300])  # equal timestamps happen
        ts = clocks[cpu]
        kind = rng.random()
        if kind < 0.45:
            hook = rng.choice([0x0E20, 0x0E21, 0x0E22, 0x0E23])
            session = rng.randrange(4) if hook in (0x0E21, 0x0E23) else None
            header = rng.choice(["perfinfo", "system", "compact"])
            tid, pid = (0, 0) if header == "perfinfo" else (rng.randrange(1 << 32), rng.randrange(1 << 32))
            tag = rng.choice(TAGS)
            row = (ts, cpu, hook, rng.randrange(1 << 32), int.from_bytes(tag.encode("latin-1"), "little"),
                   rng.randrange(top), rng.randrange(top), session)
            w.pool(cpu, ts, hook, row[3], tag, row[5], row[6], session, header=header, tid=tid, pid=pid,
                   pmc=[rng.randrange(1 << 64) for _ in range(rng.choice([0, 0, 0, 2]))])
            want["pool"].append(row + ((tid, pid) if header != "perfinfo" else (0xFFFFFFFF, 0xFFFFFFFF)))
        elif kind < 0.8:
            frames = [rng.randrange(top) for _ in range(rng.randrange(1, 193))]
            row = (ts, cpu, ts - rng.randrange(3), rng.randrange(1 << 32), rng.randrange(1 << 32), frames)
            w.stack(cpu, ts, row[2], row[3], row[4], frames)
            want["stacks"].append(row)
        elif kind < 0.85:
            user = rng.random() < 0.5
            row = (ts, cpu, ts, 4, 8, rng.randrange(top), user)
            w.stack_key_ref(cpu, ts, ts, 4, 8, row[5], user=user)
            want["key_refs"].append(row)
        elif kind < 0.9:
            frames = [rng.randrange(top) for _ in range(rng.randrange(1, 60))]
            row = (ts, cpu, rng.randrange(top), frames)
            w.stack_key_def(cpu, ts, row[2], frames, rundown=rng.random() < 0.5)
            want["key_defs"].append(row)
        elif kind < 0.95:
            name = rf"\SystemRoot\system32\drivers\drv{rng.randrange(99)}.sys"
            row = (ts, cpu, rng.choice([0x030A, 0x1402, 0x1403, 0x1404]), rng.randrange(top), rng.randrange(top),
                   rng.randrange(1 << 32), name)
            w.image(cpu, ts, row[2], row[3], row[4], row[5], name, timedatestamp=7)
            want["image"].append(row)
        elif kind < 0.97:
            row = (ts, cpu, rng.choice([0x0301, 0x0302, 0x0303, 0x0304]), rng.randrange(1 << 32), 4, "app.exe",
                   "app.exe -x ü")
            w.process(cpu, ts, row[2], row[3], row[4], row[5], row[6])
            want["process"].append(row)
        elif kind < 0.99:
            row = (ts, cpu, rng.choice([0x0501, 0x0502, 0x0503, 0x0504]), 4, rng.randrange(1 << 32), "t1")
            w.thread(cpu, ts, row[2], row[3], row[4], name=row[5])
            want["thread"].append(row)
        else:
            g = uuid.UUID(int=rng.randrange(1 << 128))
            row = (ts, cpu, rng.randrange(top), 0, str(g), rng.randrange(1, 9), "drv.pdb")
            w.ktc_rsds(cpu, ts, row[2], row[3], g, row[5], row[6])
            want["ktc_rsds"].append(row)
    return w, want


def got_rows(tables) -> dict[str, list[tuple]]:
    cols = {"pool": ["ts", "cpu", "hook", "pool_type", "tag", "size", "entry", "session_id", "tid", "pid"],
            "stacks": ["ts", "cpu", "event_ts", "pid", "tid", "frames"],
            "key_refs": ["ts", "cpu", "event_ts", "pid", "tid", "key", "user"],
            "key_defs": ["ts", "cpu", "key", "frames"],
            "image": ["ts", "cpu", "hook", "base", "size", "pid", "filename"],
            "process": ["ts", "cpu", "hook", "pid", "ppid", "image_name", "command_line"],
            "thread": ["ts", "cpu", "hook", "pid", "tid", "thread_name"],
            "ktc_rsds": ["ts", "cpu", "base", "pid", "guid", "age", "pdb_name"]}
    out = {}
    for name, c in cols.items():
        t = tables.get(name)
        out[name] = [] if t is None else [tuple(r[k] for k in c) for r in t.select(c).to_pylist()]
    return out


def check(tmp_path, w, want):
    path = tmp_path / "t.etl"
    w.save(path)
    reader, tables, _ = read_all(path, chunk_bytes=1 << 14)
    st_ = reader.stats
    assert st_.warnings == [] and not st_.malformed and st_.bytes_skipped == 0
    assert st_.records == w.record_count
    got = got_rows(tables)
    for name, rows in want.items():
        # the reader releases rows in time order; within a CPU the written order is kept
        assert sorted(got[name], key=repr) == sorted(rows, key=repr), name
        assert [r[0] for r in got[name]] == sorted(r[0] for r in rows), name
        for cpu in range(w.cpus):
            assert [r for r in got[name] if r[1] == cpu] == [r for r in rows if r[1] == cpu], (name, cpu)
    return reader


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), ptr=st.sampled_from([4, 8]), compressed=st.booleans(), cpus=st.integers(1, 4))
def test_round_trip(tmp_path_factory, seed, ptr, compressed, cpus):
    w, want = build(seed, ptr, compressed, cpus, n=300)
    reader = check(tmp_path_factory.mktemp("rt"), w, want)
    assert reader.header.pointer_size == ptr and reader.header.cpus == cpus
    assert (reader.stats.compressed_buffers > 0) == compressed


@pytest.mark.parametrize("ptr", [4, 8])
@pytest.mark.parametrize("compressed", [False, True])
def test_round_trip_many_buffers_interleaved(tmp_path, ptr, compressed):
    w, want = build(7, ptr, compressed, cpus=4, n=3000)
    reader = check(tmp_path, w, want)
    idx = reader.index
    assert len(idx) > 40
    cpus_in_file_order = idx.cpu[1:].tolist()
    switches = sum(a != b for a, b in zip(cpus_in_file_order, cpus_in_file_order[1:], strict=False))
    assert switches > 10  # CPUs' buffers really are interleaved


def test_header_fields_round_trip(tmp_path):
    w = TraceWriter(pointer_size=4, cpus=3, clock_type=2, start_qpc=132_000_000_000_000_000,
                    start_filetime=132_000_000_000_000_000, events_lost=5, buffers_lost=2, os_build=7601,
                    os_version=(6, 1), logger_name="NT Kernel Logger", logfile_name=r"C:\k.etl", cpu_speed_mhz=2400)
    w.pool(0, 132_000_000_000_000_000 + 10_000_000, 0x0E20, 0, "Leak", 16, 0x1000)
    path = tmp_path / "h.etl"
    w.save(path)
    reader, tables, _ = read_all(path)
    h = reader.header
    assert (h.pointer_size, h.cpus, h.clock_type, h.events_lost, h.buffers_lost, h.os_build) == (4, 3, 2, 5, 2, 7601)
    assert (h.logger_name, h.logfile_name, h.os_version) == ("NT Kernel Logger", r"C:\k.etl", "6.1")
    # system-time clock: ticks are 100 ns units
    assert h.ticks_to_ns(tables["pool"]["ts"][0].as_py()) == 1_000_000_000


def test_cpu_cycle_clock(tmp_path):
    w = TraceWriter(pointer_size=8, cpus=1, clock_type=3, cpu_speed_mhz=3000, start_qpc=5_000)
    w.pool(0, 5_000 + 3_000_000_000, 0x0E20, 0, "Leak", 16, 0x1000)
    path = tmp_path / "c.etl"
    w.save(path)
    reader, tables, _ = read_all(path)
    assert reader.header.ticks_to_ns(tables["pool"]["ts"][0].as_py()) == 1_000_000_000
