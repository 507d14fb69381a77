"""The reader against real .etl files recorded on Windows (../shared/etl-samples, see its README)."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from pooltrace.etl.images import count_joined, join_debug_ids
from pooltrace.etl.reader import EtlReader
from pooltrace.etl.records import Chunk, decode_headers
from pooltrace.etl.stackkeys import StackKeyResolver
from tests.conftest import read_all

KTC = "b3e675d7-2554-4f18-830b-2762732560de"


@pytest.mark.parametrize(("name", "records"), [
    ("ShutdownPerfDiagLogger.etl", 17_078), ("net452-x64-merged.etl", 179_474),
    ("SelfDescribingSingleEvent.etl", 23), ("AMSITrace.etl", 21),
])
def test_every_sample_reads_to_the_end(samples, name, records):
    reader, _, _ = read_all(samples / name)
    st = reader.stats
    assert st.records == records
    assert st.warnings == []
    assert st.bytes_skipped == 0 and st.buffers_skipped == 0 and not st.malformed
    assert st.time_inversions == 0


def test_shutdown_perfdiag_header_and_counts(samples):
    reader, tables, _ = read_all(samples / "ShutdownPerfDiagLogger.etl")
    h, st = reader.header, reader.stats
    assert (h.version, h.os_build, h.cpus, h.pointer_size, h.log_file_mode) == (0x0501000A, 18362, 2, 8, 0x2000080)
    assert (h.clock_type, h.perf_freq, h.os_version, h.layout_version) == (1, 10_000_000, "10.0", "1.5")
    assert h.buffers_written == len(reader.index) == 49
    assert np.bincount(reader.index.cpu).tolist() == [28, 21]
    assert dict(st.by_header_type) == {"SYSTEM64": 8433, "PERFINFO64": 8645}
    expected = {0x1402: 4791, 0x1403: 6745, 0x1404: 2145, 0x030A: 72, 0x1421: 1, 0x1422: 1,
                0x0501: 350, 0x0502: 1032, 0x0503: 1175, 0x0504: 501, 0x0302: 60, 0x0303: 94, 0x0304: 37,
                0x030B: 60, 0x0327: 5, 0x0000: 1, 0x0005: 3, 0x0008: 2, 0x0020: 2, 0x0050: 1}
    assert {h: st.by_hook[h] for h in expected} == expected
    assert sum(st.by_hook.values()) == 17_078
    images = tables["image"].to_pylist()
    kernel = [i for i in images if i["filename"].lower().endswith("\\ntoskrnl.exe")]
    assert kernel and all(i["pid"] == 0 and i["base"] >= 0xFFFF800000000000 for i in kernel)
    procs = tables["process"].to_pylist()
    assert any(p["pid"] == 4 and p["image_name"] == "System" for p in procs)
    assert any(p["image_name"] == "MsMpEng.exe" for p in procs)
    assert any(t["thread_name"] for t in tables["thread"].to_pylist())
    masks = tables["header_extension"].to_pylist()
    assert len(masks) == 3 and not any(m["group_mask_1"] & 0x40 for m in masks)  # no pool tracing


def test_per_cpu_merge_is_needed_and_done(samples):
    """File order has 31 time inversions across CPUs and none within a CPU (etl-format.md §1.7);
    the reader's output has none."""
    reader = EtlReader(samples / "ShutdownPerfDiagLogger.etl")
    idx = reader.index
    areas = [reader.source.area(i) for i in range(1, len(idx))]
    recs, _, _ = decode_headers(Chunk(areas, idx.cpu[1:].tolist()))
    assert int((np.diff(recs.ts) < 0).sum()) == 31
    for cpu in (0, 1):
        assert (np.diff(recs.ts[recs.cpu == cpu]) >= 0).all()
    _, tables, batches = read_all(samples / "ShutdownPerfDiagLogger.etl", chunk_bytes=1 << 16)
    assert len(batches) > 10
    merged = pa.concat_tables([tables[n].select(["ts", "cpu", "seq"]) for n in tables]).sort_by("seq")
    last_per_batch = [max(t["ts"][-1].as_py() for t in b.values()) for b in batches]
    first_per_batch = [min(t["ts"][0].as_py() for t in b.values()) for b in batches]
    assert all(f >= prev for prev, f in zip(last_per_batch, first_per_batch[1:], strict=False))
    for t in tables.values():
        assert (np.diff(t["ts"].to_numpy()) >= 0).all()
    # every CPU's own order survives the merge
    for cpu in (0, 1):
        ts = merged.filter(pa.compute.equal(merged["cpu"], cpu))["ts"].to_numpy()
        assert (np.diff(ts) >= 0).all()
    reader.close()


def test_net452_merged_compressed(samples):
    reader, tables, _ = read_all(samples / "net452-x64-merged.etl")
    h, st, idx = reader.header, reader.stats, reader.index
    assert (h.version, h.os_build, h.cpus, h.pointer_size, h.log_file_mode) == (0x00020206, 9200, 8, 8, 0x4010001)
    assert (h.logger_name, h.logfile_name) == ("Relogger", "[multiple files]")
    assert len(idx) == 360 and int(idx.size[0]) == 0x200 and st.compressed_buffers == 359
    assert int(idx.offset[-1] + idx.size[-1]) == st.file_size
    assert dict(st.by_header_type) == {"PERFINFO64": 100157, "EVENT_HEADER64": 34765, "EVENT_HEADER32": 33378,
                                       "FULL_HEADER64": 7956, "SYSTEM64": 3189, "FULL_HEADER32": 27, "SYSTEM32": 2}
    assert st.by_hook[0x0F2E] == 79_528
    assert (st.by_hook[0x1820], st.by_hook[0x1825], st.by_hook[0x1826]) == (252, 2061, 7046)
    assert (st.by_hook[0x1823], st.by_hook[0x1824]) == (1909, 1012)
    assert (st.by_classic[(KTC, 0)], st.by_classic[(KTC, 0x24)], st.by_classic[(KTC, 0x40)],
            st.by_classic[(KTC, 0x25)]) == (3590, 3534, 705, 44)
    stacks = tables["stacks"]
    assert stacks.num_rows == 252
    counts = pa.compute.list_value_length(stacks["frames"]).to_numpy()
    assert counts.min() >= 1 and counts.max() <= 192
    assert tables["key_refs"].num_rows == 9107 and tables["key_defs"].num_rows == 2921
    assert len(set(tables["key_defs"]["key"].to_pylist())) == 1077


def test_net452_every_stack_key_reference_resolves(samples):
    reader = EtlReader(samples / "net452-x64-merged.etl")
    res = StackKeyResolver()
    resolved = []
    for b in reader.batches():
        out = res.feed(b.get("key_refs"), b.get("key_defs"))
        if out is not None:
            resolved.append(out)
    reader.close()
    assert res.resolved == 9107 and res.unresolved == 0
    defs = res.definitions()
    out = pa.concat_tables(resolved)
    # a reference resolves to a definition of its own key, never one logged before it
    assert all(len(defs[i].as_py()) >= 1 for i in out["def_id"].to_pylist()[:50])


def test_net452_rsds_joined_to_images(samples):
    _, tables, _ = read_all(samples / "net452-x64-merged.etl")
    rsds = tables["ktc_rsds"]
    assert count_joined(tables["image"], rsds.filter(pa.compute.equal(rsds["opcode"], 0x24))) == 3534
    joined = join_debug_ids(tables["image"], rsds, tables["ktc_image_id"]).to_pylist()
    wntdll = [m for m in joined if m["base"] == 0x77710000 and m["pid"] == 4]
    assert wntdll and wntdll[0]["pdb_guid"] == str(uuid.UUID("ec83d8df-5559-46e0-b630-133ebd979266"))
    assert (wntdll[0]["pdb_age"], wntdll[0]["pdb_name"]) == (2, "wntdll.pdb")
    assert wntdll[0]["name"] == "ntdll.dll"
    kernel = [m for m in joined if m["name"].lower() == "ntoskrnl.exe"]
    assert kernel and kernel[0]["pdb_name"] == "ntkrnlmp.pdb"


def test_net452_timestamps(samples):
    reader, tables, _ = read_all(samples / "net452-x64-merged.etl")
    h = reader.header
    # QPC counts from boot: the start tick is the boot-to-start interval (within 0.13 s, etl-format.md §1.6)
    boot_to_start = (h.start_time - h.boot_time) / 1e7
    assert abs(h.start_ticks / h.perf_freq - boot_to_start) < 0.13
    assert h.ticks_to_ns(h.start_ticks) == 0
    assert h.ticks_to_ns(h.start_ticks + h.perf_freq * 3 + 7) == 3_000_000_700
    ns = h.ticks_to_ns(tables["stacks"]["ts"].to_numpy())
    assert ns.min() >= 0 and ns.max() < 15e9


def test_amsi_user_mode_trace(samples):
    reader, tables, _ = read_all(samples / "AMSITrace.etl")
    assert reader.header.events_lost == 3
    assert dict(reader.stats.by_header_type) == {"SYSTEM64": 2, "EVENT_HEADER64": 19}
    assert reader.stats.by_provider["8e805eb3-6a8f-4a1e-90fa-a831d94e54a1"] == 19
    assert not tables


def test_selfdescribing_small_header_buffer(samples):
    reader, _, _ = read_all(samples / "SelfDescribingSingleEvent.etl")
    assert reader.header.buffer_size == 65536 and int(reader.index.size[0]) == 0x400
    assert len(reader.index) == 3


@pytest.mark.parametrize(("name", "verdict"), [
    ("AMSITrace.etl", "no kernel events"), ("net452-x64-merged.etl", "no pool events"),
    ("ShutdownPerfDiagLogger.etl", "no pool events"), ("SelfDescribingSingleEvent.etl", "no kernel events"),
])
def test_info_verdicts(samples, name, verdict):
    result = CliRunner().invoke(cli, ["info", "--format", "json", str(samples / name)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["verdict"].startswith(verdict)
    text = CliRunner().invoke(cli, ["info", str(samples / name)])
    assert text.exit_code == 0 and verdict in " ".join(text.output.split())


def test_info_net452_counts(samples):
    data = json.loads(CliRunner().invoke(cli, ["info", "--format", "json",
                                               str(samples / "net452-x64-merged.etl")]).output)
    ev = data["events"]
    assert (ev["stacks"], ev["stack_key_refs"], ev["stack_key_refs_unresolved"]) == (252, 9107, 0)
    assert (ev["ktc_rsds"], ev["rsds_joined_to_images"]) == (3578, 3578)
    assert data["pool"]["tracing_enabled"] is False
    assert data["lost"]["events_lost"] == 0
