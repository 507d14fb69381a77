"""Pool snapshots (PoolSnap 0x0E28/0x0E29, BigPoolSnap 0x0E2A/0x0E2B): layouts against the documented
structure sizes, records built by hand byte for byte, the writer's bytes, and several events per snapshot."""

from __future__ import annotations

import json
import struct

import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from pooltrace.dataset import pair_trace
from pooltrace.definitions import definitions
from pooltrace.etl.decode import snapshot_entries
from pooltrace.etl.writer import TraceWriter
from pooltrace.synthetic import classic_leak
from tests.conftest import ROOT, read_all

TRACES = ROOT / "traces"

D = definitions()


def perfinfo_record(pointer_size: int, hook: int, ts: int, payload: bytes) -> bytes:
    """PERFINFO_TRACE_HEADER by hand: u32 Marker (0xC0 | type 0x11 x64 / 0x10 x86 | version 2); u16 Size;
    u16 HookId; i64 SystemTime; payload."""
    marker = 0xC0000000 | (0x11 if pointer_size == 8 else 0x10) << 16 | 2
    return struct.pack("<IHHq", marker, 0x10 + len(payload), hook, ts) + payload


def pool_tag_entry(pointer_size: int, tag: bytes, pa, pf, pu, na, nf, nu) -> bytes:
    if pointer_size == 8:  # Tag@0 PagedAllocs@4 PagedFrees@8 pad@12 PagedUsed@16 NPA@24 NPF@28 NPUsed@32
        return tag + struct.pack("<II4xQIIQ", pa, pf, pu, na, nf, nu)
    return tag + struct.pack("<IIIIII", pa, pf, pu, na, nf, nu)


def big_entry(pointer_size: int, va: int, size: int, tag: bytes) -> bytes:
    return struct.pack("<QQ", va, size) + tag + bytes(4) if pointer_size == 8 else struct.pack("<II", va, size) + tag


@pytest.mark.parametrize(("pointer_size", "tag_size", "used", "big_size"),
                         [(8, 40, (16, 32), 24), (4, 28, (12, 24), 12)])
def test_layouts_match_the_documented_structures(pointer_size, tag_size, used, big_size):
    tag = D.layout("pool_tag", pointer_size)
    assert tag.fixed_size == tag_size
    assert (tag.field("paged_used").offset, tag.field("nonpaged_used").offset) == used
    assert (tag.field("nonpaged_allocs").offset, tag.field("nonpaged_frees").offset) == (used[0] + pointer_size,
                                                                                          used[0] + pointer_size + 4)
    big = D.layout("big_pool_entry", pointer_size)
    assert big.fixed_size == big_size
    assert [f.offset for f in big.fields] == [0, pointer_size, 2 * pointer_size]
    assert D.layout("pool_snap", pointer_size).fixed_size == D.layout("big_pool_snap", pointer_size).fixed_size == 4


@pytest.mark.parametrize("pointer_size", [8, 4])
def test_hand_built_snapshot_records_decode(tmp_path, pointer_size):
    w = TraceWriter(pointer_size=pointer_size, cpus=1)
    t = w.start_qpc + 5
    tags = pool_tag_entry(pointer_size, b"Leak", 10, 4, 0x600, 7, 1, 0x300) + \
        pool_tag_entry(pointer_size, b"Pool", 0, 0, 0, 3, 0, 0x2000)
    w.raw(0, t, perfinfo_record(pointer_size, 0x0E28, t, struct.pack("<I", 2) + tags))
    bigs = big_entry(pointer_size, 0x81230001, 0x3000, b"Ntfr") + big_entry(pointer_size, 0x81240000, 0x1000, b"MmSt")
    w.raw(0, t + 1, perfinfo_record(pointer_size, 0x0E2A, t + 1, struct.pack("<I", 2) + bigs))
    w.raw(0, t + 2, perfinfo_record(pointer_size, 0x0E2B, t + 2, bigs[: len(bigs) // 2]))  # bare array form
    w.raw(0, t + 3, perfinfo_record(pointer_size, 0x0E29, t + 3, struct.pack("<I", 2) + tags[:-1]))  # cut short
    w.save(tmp_path / "s.etl")
    reader, tables, _ = read_all(tmp_path / "s.etl")
    rows = tables["pool_snap"].to_pylist()
    common = {"session_id": None, "ts": t, "cpu": 0, "end": False}
    assert [{k: r[k] for k in r if k != "seq"} for r in rows] == [
        {"tag": 0x6B61654C, "paged_allocs": 10, "paged_frees": 4, "paged_used": 0x600, "nonpaged_allocs": 7,
         "nonpaged_frees": 1, "nonpaged_used": 0x300} | common,
        {"tag": 0x6C6F6F50, "paged_allocs": 0, "paged_frees": 0, "paged_used": 0, "nonpaged_allocs": 3,
         "nonpaged_frees": 0, "nonpaged_used": 0x2000} | common]
    big = [(r["virtual_address"], r["size"], r["tag"], r["end"]) for r in tables["big_pool_snap"].to_pylist()]
    assert big == [(0x81230001, 0x3000, 0x7266744E, False), (0x81240000, 0x1000, 0x74536D4D, False),
                   (0x81230001, 0x3000, 0x7266744E, True)]
    assert reader.stats.malformed["pool_snap"] == 1


def test_count_and_bare_forms_cannot_be_confused():
    assert snapshot_entries(struct.pack("<I", 2) + bytes(48), 24) == (4, 2)
    assert snapshot_entries(bytes(48), 24) == (0, 2)
    assert snapshot_entries(struct.pack("<I", 3) + bytes(48), 24) is None  # count disagrees with the length
    assert snapshot_entries(bytes(50), 24) is None
    assert snapshot_entries(b"", 40) == (0, 0)


@pytest.mark.parametrize("pointer_size", [8, 4])
def test_writer_bytes_and_several_events_per_snapshot(tmp_path, pointer_size):
    w = TraceWriter(pointer_size=pointer_size, cpus=2)
    t = w.start_qpc + 5
    entries = [(f"T{i:03d}", i, i // 2, 0x100 * i, 2 * i, i, 0x80 * i) for i in range(250)]
    w.pool_snapshot(1, t, entries)
    w.big_pool_snapshot(0, t + 1, [(0x8000_0000 + 0x10000 * i, 0x1000 + i, "Big ", i % 2) for i in range(101)],
                        end=True)
    data = w.to_bytes()
    size = 40 if pointer_size == 8 else 28
    first = perfinfo_record(pointer_size, 0x0E28, t, struct.pack("<I", 100) + b"".join(
        pool_tag_entry(pointer_size, e[0].encode(), *e[1:]) for e in entries[:100]))
    assert first in data and len(first) == 0x10 + 4 + 100 * size
    last = perfinfo_record(pointer_size, 0x0E2B, t + 1, struct.pack("<I", 1) + big_entry(
        pointer_size, 0x8000_0000 + 0x10000 * 100, 0x1000 + 100, b"Big "))
    assert last in data
    w.save(tmp_path / "w.etl")
    reader, tables, _ = read_all(tmp_path / "w.etl")
    assert reader.stats.by_hook[0x0E28] == 3 and reader.stats.by_hook[0x0E2B] == 2
    snap = tables["pool_snap"].to_pylist()
    assert [(r["paged_allocs"], r["nonpaged_used"]) for r in snap] == [(i, 0x80 * i) for i in range(250)]
    big = tables["big_pool_snap"].to_pylist()
    assert [(r["virtual_address"] & 1, r["size"], r["end"]) for r in big] == [(i % 2, 0x1000 + i, True)
                                                                              for i in range(101)]


def test_writer_refuses_what_the_format_cannot_hold():
    w = TraceWriter(pointer_size=4)
    with pytest.raises(ValueError):
        w.big_pool_snapshot(0, w.start_qpc, [(0x1001, 16, "Leak", True)])  # bit 0 is the non-paged flag
    with pytest.raises(ValueError):
        w.pool_snapshot(0, w.start_qpc, [("Leak", 1, 0, 1 << 32, 0, 0, 0)])  # PagedUsed is 32-bit on x86


# ---- the baseline from the snapshot: tags, info, report -------------------------------------------------

def _json_rows(output: str) -> list[dict]:
    data = json.loads(output)
    if isinstance(data, dict):  # an object with metadata around the rows
        data = next(v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict) and "tag" in v[0])
    return data


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    ds = tmp_path_factory.mktemp("b") / "sample.pooltrace"
    pair_trace(TRACES / "sample-leak.etl", ds)
    return ds, json.loads((TRACES / "sample-leak.truth.json").read_text())["truth"]


def test_tags_show_the_planted_bytes_in_use_at_start_and_stop(sample):
    ds, truth = sample
    result = CliRunner().invoke(cli, ["tags", str(ds), "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = _json_rows(result.output)
    checked = 0
    for r in rows:
        key = {"Paged": "paged_bytes", "Session": "session_bytes"}.get(r["type"], "nonpaged_bytes")
        planted = truth["baseline"][r["tag"]]
        assert (r["in_use_start_bytes"], r["in_use_end_bytes"]) == (planted["start"][key], planted["stop"][key])
        checked += 1
    assert checked >= 5
    text = CliRunner().invoke(cli, ["tags", str(ds)]).output
    irp = truth["baseline"]["Irp "]
    assert f"{irp['start']['nonpaged_bytes']:,}" in text and f"{irp['stop']['nonpaged_bytes']:,}" in text


def test_info_json_gives_the_planted_baseline_and_its_source():
    truth = json.loads((TRACES / "sample-leak.truth.json").read_text())["truth"]
    result = CliRunner().invoke(cli, ["info", "--format", "json", str(TRACES / "sample-leak.etl")])
    assert result.exit_code == 0, result.output
    b = json.loads(result.output)["baseline"]
    assert b["source"] == "pool_snapshot"
    got = {tag: {when: {k: v[when][k] for k in truth["baseline"][tag][when]} for when in ("start", "stop")}
           for tag, v in b["tags"].items()}
    assert got == truth["baseline"]
    assert b["pool_snapshot"]["start"]["tags"] == len(truth["baseline"]) > 100  # spans several events
    gh05 = b["tags"]["Gh05"]["start"]  # session pool: from the session snapshot, in the totals too
    assert gh05["allocs"] == gh05["session_allocs"] == truth["baseline"]["Gh05"]["start"]["session_allocs"] > 0
    snap = b["pool_snapshot"]
    # big blocks at the stop: those of the start but the one freed, and the trace's outstanding Ntfr blocks
    assert snap["stop"]["big_blocks"] == snap["start"]["big_blocks"] - 1 + truth["outstanding"]["ntfr"]


def test_report_header_and_trace_json_name_the_baseline(sample):
    ds, truth = sample
    meta = json.loads((ds / "trace.json").read_text())
    assert meta["tag_baseline_source"] == "pool_snapshot"
    text = " ".join(CliRunner().invoke(cli, ["report", str(ds), "--no-symbols", "--tag", "Leak"]).output.split())
    leak = truth["baseline"]["Leak"]["start"]
    assert (f"the kernel counted {leak['nonpaged_allocs'] + leak['paged_allocs']:,} outstanding 'Leak' allocations "
            f"({leak['nonpaged_bytes'] + leak['paged_bytes']:,} bytes; from the pool snapshot in the trace)") in text
    assert "'Irp '" not in text  # only the tags shown


def test_report_header_says_the_baseline_of_several_tags_in_one_sentence(sample):
    """QA: the header had one "before the trace began" line per tag shown (six on the sample). Now one
    sentence: the total, then each tag's figures."""
    ds, truth = sample
    meta = json.loads((ds / "trace.json").read_text())
    out = CliRunner().invoke(cli, ["report", str(ds), "--no-symbols"], env={"COLUMNS": "100"}).output
    assert out.count("before the trace began") == 1
    start = {t: b["start"] for t, b in meta["tag_baseline"].items() if b.get("start") and b["start"].get("allocs")}
    shown = {t for t in start if f" {t!r} " in out or f"{t!r}," in out}
    assert len(shown) > 1
    text = " ".join(out.split())
    assert (f"the kernel counted {sum(start[t]['allocs'] for t in shown):,} outstanding allocations of "
            f"{len(shown)} tags ({sum(start[t]['bytes'] for t in shown):,} bytes; from the pool snapshot in the "
            "trace); the trace cannot pair those: ") in text
    for t in shown:
        assert f"{t!r} {start[t]['allocs']:,} ({start[t]['bytes']:,} B)" in text
    assert all(len(line) <= 100 and not line.endswith(" ") for line in out.splitlines())


def test_report_header_skips_tags_with_nothing_before_the_trace(tmp_path):
    truth = json.loads((TRACES / "sample-leak-fixed.truth.json").read_text())["truth"]["baseline"]
    empty = [t for t, b in truth.items() if not any(b["start"].values())]
    assert "Lea2" in empty  # the fixed build's new tag: in the snapshot with nothing in use at the start
    ds = tmp_path / "fixed.pooltrace"
    pair_trace(TRACES / "sample-leak-fixed.etl", ds)
    text = " ".join(CliRunner().invoke(cli, ["report", str(ds), "--no-symbols", "--by", "tag"]).output.split())
    assert "'Lea2'" not in text and "counted 0 outstanding" not in text  # was "counted 0 outstanding 'Lea2'"
    assert "Lea2" in text  # the group itself is shown
    assert "'Leak' " in text.split("the trace cannot pair those: ")[1]  # several tags: one sentence names each


def test_no_snapshot_no_baseline(tmp_path):
    w, _ = classic_leak(snapshots=False, scale=1, frees_before=2, lost_frees=0)
    w.save(tmp_path / "n.etl")
    rows = _json_rows(CliRunner().invoke(cli, ["tags", str(tmp_path / "n.etl"), "--format", "json"]).output)
    assert rows and all(r["in_use_start_bytes"] is None and r["in_use_end_bytes"] is None for r in rows)
    meta = json.loads((tmp_path / "n.pooltrace" / "trace.json").read_text())
    assert (meta["tag_baseline"], meta["tag_baseline_source"], meta["pool_snapshot"]) == ({}, None, None)
    info = json.loads(CliRunner().invoke(cli, ["info", "--format", "json", str(tmp_path / "n.etl")]).output)
    assert info["baseline"] == {"source": None, "tags": {}, "pool_snapshot": None}
    assert "At Start" not in CliRunner().invoke(cli, ["tags", str(tmp_path / "n.etl")]).output


def test_a_tampered_baseline_is_one_line(tmp_path, sample):
    import shutil

    ds, _ = sample
    shutil.copytree(ds, tmp_path / "ds")
    meta = json.loads((tmp_path / "ds" / "trace.json").read_text())
    meta["tag_baseline"]["Leak"]["start"]["nonpaged_bytes"] = "lots"
    (tmp_path / "ds" / "trace.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(cli, ["tags", str(tmp_path / "ds")])
    assert result.exit_code == 2 and "nonpaged_bytes" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("pointer_size", [8, 4])
def test_session_snapshots_carry_count_then_session_id(tmp_path, pointer_size):
    w = TraceWriter(pointer_size=pointer_size, cpus=1)
    t = w.start_qpc + 5
    entry = pool_tag_entry(pointer_size, b"Gh05", 30, 10, 0x1000, 0, 0, 0)
    w.raw(0, t, perfinfo_record(pointer_size, 0x0E2C, t, struct.pack("<II", 1, 3) + entry))
    w.raw(0, t + 1, perfinfo_record(pointer_size, 0x0E2F, t + 1, struct.pack("<II", 1, 3) +
                                    big_entry(pointer_size, 0x90000000, 0x2000, b"Gh05")))
    w.raw(0, t + 2, perfinfo_record(pointer_size, 0x0E2D, t + 2, struct.pack("<I", 1) + entry))  # no session id
    w.save(tmp_path / "s.etl")
    reader, tables, _ = read_all(tmp_path / "s.etl")
    row = tables["pool_snap"].to_pylist()
    assert [(r["tag"], r["paged_allocs"], r["paged_used"], r["session_id"], r["end"]) for r in row] == [
        (0x35306847, 30, 0x1000, 3, False)]
    big = tables["big_pool_snap"].to_pylist()
    assert [(r["virtual_address"], r["size"], r["session_id"], r["end"]) for r in big] == [
        (0x90000000, 0x2000, 3, True)]
    assert reader.stats.malformed["pool_snap_session"] == 1
    # the writer lays them out the same way
    w2 = TraceWriter(pointer_size=pointer_size, cpus=1)
    w2.pool_snapshot(0, t, [("Gh05", 30, 10, 0x1000, 0, 0, 0)], session_id=3)
    assert perfinfo_record(pointer_size, 0x0E2C, t, struct.pack("<II", 1, 3) + entry) in w2.to_bytes()


def test_info_prefers_the_sidecar_baseline(tmp_path):
    import shutil

    from pooltrace.sidecar import write_sidecar

    trace = tmp_path / "leak.etl"
    shutil.copy(TRACES / "sample-leak.etl", trace)
    entry = {"tag": "Leak", "value": 0x6B61654C, "paged_allocs": 0, "paged_frees": 0, "paged_bytes": 0,
             "nonpaged_allocs": 120, "nonpaged_frees": 100, "nonpaged_bytes": 5120}
    write_sidecar(trace, {"format": "pooltrace-sidecar", "version": 1, "trace": "leak.etl", "recording": {},
                          "modules": [], "module_errors": [],
                          "pool_tags": {"filter": ["Leak"], "start": {"utc": "x", "entries": [entry]}, "stop": None}})
    b = json.loads(CliRunner().invoke(cli, ["info", "--format", "json", str(trace)]).output)["baseline"]
    assert b["source"] == "sidecar" and list(b["tags"]) == ["Leak"]
    assert b["tags"]["Leak"]["start"]["nonpaged_bytes"] == 5120 and b["tags"]["Leak"]["stop"] is None
    assert b["pool_snapshot"]["start"]["tags"] > 100  # the trace's own snapshot is still described
    text = CliRunner().invoke(cli, ["info", str(trace)]).output
    assert "from the recorder's sidecar" in " ".join(text.split())
