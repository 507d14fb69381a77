"""`pooltrace pair` end to end: generated traces through the writer, the reader, stack attachment and
pairing into the Parquet dataset; the shipped samples against their planted truth; a real merged trace."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace import dataset
from pooltrace.cli import cli
from pooltrace.dataset import pair_trace
from pooltrace.etl import parallel, workerstart
from pooltrace.etl.writer import TraceWriter
from pooltrace.synthetic import _sites, kernel_modules
from tests.conftest import ROOT

TRACES = ROOT / "traces"


def load(ds):
    allocs = pq.read_table(ds / "allocations.parquet").to_pylist()
    stacks = {r["stack_id"]: r["frames"] for r in pq.read_table(ds / "stacks.parquet").to_pylist()}
    return allocs, stacks, json.loads((ds / "trace.json").read_text())


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("name", ["sample-leak", "sample-leak-fixed"])
def test_samples_pair_to_the_planted_truth(tmp_path, monkeypatch, name, jobs):
    meta = json.loads((TRACES / f"{name}.truth.json").read_text())
    if jobs > 1:  # small chunks and no size threshold, so the sample really goes through decode workers
        monkeypatch.setattr(dataset, "CHUNK_BYTES", 64 << 10)
        monkeypatch.setattr(workerstart, "PARALLEL_MIN_BYTES", 0)
        monkeypatch.setattr(parallel, "DECODE_WHILE_STARTING", False)  # not the first chunks in this process
    result = CliRunner().invoke(cli, ["pair", str(TRACES / f"{name}.etl"), "-o", str(tmp_path / "ds"),
                                      "--jobs", str(jobs)])
    assert result.exit_code == 0, result.output
    allocs, stacks, trace = load(tmp_path / "ds")
    got = trace["pairing"]
    assert {k: got[k] for k in meta["expected_pair"]} == meta["expected_pair"]
    # per call site: outstanding count and bytes, found through the allocating stack's kernel frames
    mods = kernel_modules(meta["params"]["shift"])
    for site, spec in _sites().items():
        frames = [mods[m].base + rva for m, rva in spec["frames"]]
        rows = [r for r in allocs if r["fate"] == "outstanding" and r["alloc_stack"] is not None
                and stacks[r["alloc_stack"]][:len(frames)] == frames]
        assert len(rows) == meta["truth"]["outstanding"].get(site, 0), site
        assert sum(r["size"] for r in rows) == meta["truth"]["outstanding_bytes"].get(site, 0), site
        assert all(r["tag"] == spec["tag"] for r in rows)
    leak = [r for r in allocs if r["tag"] == "Leak" and r["fate"] == "outstanding"]
    assert all(r["pid"] == 4242 and r["tid"] in (5100, 5104) for r in leak)  # from the SYSTEM pool record
    assert all(r["free_ns"] is None for r in allocs if r["fate"] == "outstanding")
    aofi = [r for r in allocs if r["fate"] == "free_without_alloc"]
    assert len(aofi) == meta["truth"]["free_without_alloc"]
    assert all(r["alloc_ns"] is None and r["free_ns"] is not None for r in aofi)
    # a big block allocated before the trace: its free event names neither tag nor size; the kernel's
    # BigPoolSnap at the start gives both
    big = {r["address"]: (r["tag"], r["size"]) for r in aofi if r["address"] in
           {b["address"] for b in meta["truth"]["pre_trace_big_frees"]}}
    assert big == {b["address"]: (b["tag"], b["size"]) for b in meta["truth"]["pre_trace_big_frees"]} != {}
    assert got["free_without_alloc_sized_from_snapshot"] == len(big)
    session = [r for r in allocs if r["tag"] == "Gh05"]
    assert session and all(r["session"] and r["session_id"] == 1 and r["paged"] for r in session)
    assert all(not r["session"] and r["session_id"] is None for r in allocs if r["tag"] == "Leak")


def test_merged_sample_modules_carry_pdb_identity(tmp_path):
    pair_trace(TRACES / "sample-leak-fixed.etl", tmp_path / "ds")
    mods = pq.read_table(tmp_path / "ds" / "modules.parquet").to_pylist()
    by_name = {m["name"]: m for m in mods}
    truth = kernel_modules(0x5600000)
    assert by_name["leaky.sys"]["pdb_name"] == "leaky.pdb" and by_name["leaky.sys"]["pdb_age"] == 2
    assert by_name["leaky.sys"]["pdb_guid"] == str(truth["leaky"].guid)
    assert by_name["ntoskrnl.exe"]["base"] == truth["nt"].base and by_name["ntoskrnl.exe"]["pid"] == 0
    assert by_name["ntoskrnl.exe"]["path"] == r"\SystemRoot\system32\ntoskrnl.exe"
    assert all(m["load_ns"] is None and m["unload_ns"] is None for m in mods)  # rundown only


def test_real_merged_trace_without_pool_events(samples, tmp_path):
    result = CliRunner().invoke(cli, ["pair", str(samples / "net452-x64-merged.etl"), "-o", str(tmp_path / "n")])
    assert result.exit_code == 0, result.output
    assert "no pool events" in result.output
    allocs, stacks, trace = load(tmp_path / "n")
    assert allocs == [] and stacks == {}
    assert trace["notes"][0].startswith("no pool events")
    mods = pq.read_table(tmp_path / "n" / "modules.parquet").to_pylist()
    wntdll = [m for m in mods if m["base"] == 0x77710000 and m["pid"] == 4]
    assert wntdll[0]["pdb_guid"] == "ec83d8df-5559-46e0-b630-133ebd979266" and wntdll[0]["pdb_age"] == 2
    assert trace["modules_with_pdb"] > 1700
    assert any(m["unload_ns"] is not None for m in mods) and any(m["load_ns"] is not None for m in mods)


def test_unreadable_trace_leaves_no_dataset(tmp_path):
    bad = tmp_path / "bad.etl"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    result = CliRunner().invoke(cli, ["pair", str(bad)])
    assert result.exit_code == 2 and result.output.startswith("pooltrace: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.etl"]


def test_existing_dataset_is_replaced_atomically(tmp_path):
    out = tmp_path / "ds"
    pair_trace(TRACES / "sample-leak-fixed.etl", out)
    (out / "notes.txt").write_text("mine")  # a user's file in a dataset directory is not pooltrace's to delete
    pair_trace(TRACES / "sample-leak.etl", out)
    assert sorted(p.name for p in out.iterdir()) == ["allocations.parquet", "modules.parquet", "notes.txt",
                                                     "stacks.parquet", "summary.npz", "trace.json"]
    assert json.loads((out / "trace.json").read_text())["source"]["path"].endswith("sample-leak.etl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


# ---- generated streams: the pipeline's result must not depend on how events are spread over CPUs/buffers

def scenario(seed: int, n: int):
    """A random pool stream with stacks: (ts, is_alloc, session, address, size, tag, frames, user_frames, tid)."""
    rng = random.Random(seed)
    evs = []
    ts = 1_000_000_000
    for _ in range(n):
        ts += rng.choice([1, 2, 50, 999])
        is_alloc = rng.random() < 0.55
        session = rng.choice([None, None, None, 1, 2])
        addr = 0xFFFFA00000000000 + 0x40 * rng.randrange(12)
        frames = [0xFFFFF80000000000 + rng.randrange(8) * 0x100 + k for k in range(rng.randrange(1, 6))]
        user = [0x7FF600000000 + rng.randrange(3)] if is_alloc and rng.random() < 0.3 else None
        evs.append((ts, is_alloc, session, addr, rng.randrange(1, 4096), rng.choice(["Leak", "Irp "]), frames,
                    user, rng.choice([8, 12])))
    return evs


def write(evs, path, cpus, buffer_size, compressed, seed, header="system"):
    rng = random.Random(seed)
    w = TraceWriter(pointer_size=8, cpus=cpus, compressed=compressed, buffer_size=buffer_size)
    ids = {"tid": 0, "pid": 4} if header != "perfinfo" else {}
    for ts, is_alloc, session, addr, size, tag, frames, user, tid in evs:
        cpu = rng.randrange(cpus)
        hook = (0x0E20 if is_alloc else 0x0E22) + (1 if session else 0)
        if ids:
            ids["tid"] = tid
        w.pool(cpu, ts, hook, 0x200 | (0x21 if session else 0), tag, size, addr, session, header=header, **ids)
        w.stack(cpu, ts, ts, 4, tid, frames)
        if user:  # the user part comes later, sometimes on another CPU
            w.stack(rng.randrange(cpus), ts + rng.randrange(1, 5000), ts, 4, tid, user)
    w.save(path)


def canonical(ds):
    allocs, stacks, trace = load(ds)
    rows = sorted((r["alloc_ns"] or -1, r["free_ns"] or -1, r["fate"], r["size"], r["address"], r["tag"],
                   r["session_id"] or -1, r["tid"],
                   tuple(stacks[r["alloc_stack"]]) if r["alloc_stack"] is not None else (),
                   tuple(stacks[r["free_stack"]]) if r["free_stack"] is not None else ()) for r in allocs)
    return rows, trace["pairing"]


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), cpus=st.integers(1, 4), compressed=st.booleans(),
       buffer_size=st.sampled_from([0x400, 0x1000, 0x10000]), header=st.sampled_from(["system", "perfinfo"]))
def test_pipeline_independent_of_cpu_and_buffer_layout(tmp_path_factory, seed, cpus, compressed, buffer_size,
                                                       header):
    evs = scenario(seed, 300)
    base = tmp_path_factory.mktemp("p")
    write(evs, base / "one.etl", 1, 0x10000, False, seed, header)
    write(evs, base / "many.etl", cpus, buffer_size, compressed, seed + 1, header)
    pair_trace(base / "one.etl", base / "one")
    pair_trace(base / "many.etl", base / "many")
    one, d1 = canonical(base / "one")
    many, d2 = canonical(base / "many")
    assert one == many
    layout_dependent = ("stack_events_attached_by_thread",)  # user parts logged on another CPU
    assert {k: v for k, v in d1.items() if k not in layout_dependent} == \
        {k: v for k, v in d2.items() if k not in layout_dependent}
    # the rules, stated directly on the generated stream
    open_, freed, lost, fwa = {}, 0, 0, 0
    for _ts, is_alloc, session, addr, *_ in evs:
        key = (session, addr)
        if is_alloc:
            lost += key in open_
            open_[key] = True
        elif open_.pop(key, None):
            freed += 1
        else:
            fwa += 1
    assert (d1["freed"], d1["lost_free"], d1["free_without_alloc"], d1["outstanding"]["count"]) == (
        freed, lost, fwa, len(open_))
    assert d1["stack_events_with_no_owner"] == 0
    users = [r for r in one if r[8] and r[8][-1] < 0xFFFF800000000000]
    assert len(users) == sum(1 for e in evs if e[7])  # every late user part found its allocation


def test_stack_keys_resolve_through_placeholders(tmp_path):
    """Cached stacks: references first, the key's definition later (KeyRundown at the end), keys reused."""
    w = TraceWriter(pointer_size=8, cpus=2)
    t = w.start_qpc + 100
    key = 0xFFFFC00000001000
    w.pool(0, t, 0x0E20, 0, "Leak", 32, 0xA000, tid=8, pid=4)
    w.stack_key_ref(0, t, t, 4, 8, key)
    w.stack_key_def(1, t + 10, key, [1, 2, 3])  # evicted: generation 0 = [1, 2, 3]
    w.pool(1, t + 20, 0x0E20, 0, "Leak", 32, 0xB000, tid=8, pid=4)
    w.stack_key_ref(1, t + 20, t + 20, 4, 8, key)
    w.stack(1, t + 25, t + 20, 4, 8, [0x7FF600001111])  # user part, explicit
    w.stack_key_def(0, t + 50_000_000, key, [7, 8, 9], rundown=True)  # 5 s later: generation 1
    w.save(tmp_path / "k.etl")
    pair_trace(tmp_path / "k.etl", tmp_path / "ds")
    allocs, stacks, trace = load(tmp_path / "ds")
    by_addr = {r["address"]: stacks[r["alloc_stack"]] for r in allocs}
    assert by_addr[0xA000] == [1, 2, 3]
    assert by_addr[0xB000] == [7, 8, 9, 0x7FF600001111]
    assert trace["pairing"]["stacks_with_unresolved_key"] == 0


def test_perfinfo_and_system_pool_headers(tmp_path):
    w = TraceWriter(pointer_size=4, cpus=1)
    t = w.start_qpc
    w.pool(0, t + 1, 0x0E20, 1, "MmSt", 100, 0x81000000, header="system", tid=77, pid=9)
    w.pool(0, t + 2, 0x0E20, 1, "MmSt", 100, 0x81001000, header="perfinfo")
    w.stack(0, t + 2, t + 2, 5, 66, [0x80401000, 0x80402000])
    w.save(tmp_path / "x86.etl")
    pair_trace(tmp_path / "x86.etl", tmp_path / "ds")
    allocs, stacks, _ = load(tmp_path / "ds")
    by = {r["address"]: r for r in allocs}
    assert (by[0x81000000]["tid"], by[0x81000000]["pid"], by[0x81000000]["alloc_stack"]) == (77, 9, None)
    assert (by[0x81001000]["tid"], by[0x81001000]["pid"]) == (66, 5)
    assert stacks[by[0x81001000]["alloc_stack"]] == [0x80401000, 0x80402000]
    assert all(r["paged"] for r in allocs)


def test_alloc_ns_is_exact(tmp_path):
    w = TraceWriter(pointer_size=8, cpus=1, perf_freq=3_579_545)
    w.pool(0, w.start_qpc + 3_579_545 * 2 + 1, 0x0E20, 0, "Leak", 8, 0x10)
    w.save(tmp_path / "f.etl")
    pair_trace(tmp_path / "f.etl", tmp_path / "ds")
    allocs, _, _ = load(tmp_path / "ds")
    assert allocs[0]["alloc_ns"] == 2_000_000_000 + 1_000_000_000 // 3_579_545
    assert np.int64(allocs[0]["alloc_ns"]) > 0


def test_recorder_sidecar_is_joined_automatically(tmp_path):
    """An unmerged trace from `pooltrace record` gets PDB identities and the tag baseline from its sidecar."""
    import shutil

    from pooltrace.sidecar import write_sidecar

    trace = tmp_path / "leak.etl"
    shutil.copy(TRACES / "sample-leak.etl", trace)
    leaky = kernel_modules(0)["leaky"]
    entry = {"tag": "Leak", "value": 0x6B61654C, "paged_allocs": 0, "paged_frees": 0, "paged_bytes": 0,
             "nonpaged_allocs": 120, "nonpaged_frees": 100, "nonpaged_bytes": 5120}
    write_sidecar(trace, {
        "format": "pooltrace-sidecar", "version": 1, "trace": "leak.etl", "recording": {"logger": "pooltrace"},
        "modules": [{"name": "leaky.sys", "nt_path": leaky.path, "path": "C:\\drivers\\leaky.sys",
                     "base": hex(leaky.base), "size": leaky.size, "timedatestamp": leaky.timedatestamp,
                     "checksum": 0, "pdb_name": leaky.pdb, "pdb_guid": str(leaky.guid), "pdb_age": leaky.age}],
        "module_errors": [], "pool_tags": {"filter": ["Leak"], "start": {"utc": "x", "entries": [entry]},
                                           "stop": None}})
    meta = pair_trace(trace, tmp_path / "ds")
    mods = {m["name"]: m for m in pq.read_table(tmp_path / "ds" / "modules.parquet").to_pylist()}
    assert mods["leaky.sys"]["pdb_guid"] == str(leaky.guid) and mods["leaky.sys"]["pdb_age"] == leaky.age
    assert mods["ntoskrnl.exe"]["pdb_guid"] is None
    assert meta["tag_baseline"]["Leak"]["start"] == {"allocs": 20, "bytes": 5120, "paged_allocs": 0, "paged_bytes": 0,
                                                     "nonpaged_allocs": 20, "nonpaged_bytes": 5120}
    assert meta["tag_baseline_source"] == "sidecar"  # the sidecar wins over the trace's own pool snapshot
    assert set(meta["tag_baseline"]) == {"Leak"}
    text = CliRunner().invoke(cli, ["report", str(tmp_path / "ds"), "--no-symbols"]).output
    assert ("before the trace began, the kernel counted 20 outstanding 'Leak' allocations (5,120 bytes; from the "
            "recorder's sidecar)") in " ".join(text.split())


def test_first_part_of_each_kind_wins_and_extra_parts_are_counted(tmp_path):
    # event A gets two kernel parts and a user part (on another CPU), the PERFINFO event C two kernel parts:
    # the first part of each kind in arrival (record) order is the one kept, the others are counted
    w = TraceWriter(pointer_size=8, cpus=2)
    t = w.start_qpc
    k1, k2, user = [0xFFFFF80000001000, 0xFFFFF80000002000], [0xFFFFF80000003000], [0x7FF600001000]
    w.pool(0, t + 1, 0x0E20, 1, "AAAA", 64, 0xA000, header="system", tid=10, pid=4)
    w.pool(0, t + 2, 0x0E20, 1, "BBBB", 64, 0xB000, header="system", tid=11, pid=4)
    w.pool(0, t + 3, 0x0E20, 1, "CCCC", 64, 0xC000, header="perfinfo")
    w.stack(0, t + 3, t + 1, 4, 10, k2)
    w.stack(0, t + 4, t + 1, 4, 10, k1)
    w.stack(1, t + 5, t + 1, 4, 10, user)
    w.stack(0, t + 6, t + 3, 7, 12, k1)
    w.stack(0, t + 7, t + 3, 8, 13, k2)
    w.save(tmp_path / "parts.etl")
    pair_trace(tmp_path / "parts.etl", tmp_path / "ds")
    allocs, stacks, trace = load(tmp_path / "ds")
    by = {r["address"]: r for r in allocs}
    assert stacks[by[0xA000]["alloc_stack"]] == k2 + user
    assert by[0xB000]["alloc_stack"] is None
    assert stacks[by[0xC000]["alloc_stack"]] == k1
    assert (by[0xC000]["tid"], by[0xC000]["pid"]) in ((12, 7), (13, 8))  # from its stack, not the header
    assert trace["pairing"]["stack_parts_ignored"] == 2
