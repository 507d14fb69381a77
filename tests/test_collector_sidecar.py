"""The sidecar (OUT.etl.pooltrace.json): reading, validation, joining PDB identities into a modules table, the
tag baseline; and end to end: a fake recording of a real (generated) trace, paired, then joined."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pooltrace.collector.plan import RecordRequest
from pooltrace.collector.recorder import Recorder
from pooltrace.dataset import pair_trace
from pooltrace.datasetschema import MODULES_SCHEMA
from pooltrace.errors import PooltraceError
from pooltrace.etl.writer import TraceWriter
from pooltrace.sidecar import merge_pdb_identities, read_sidecar, sidecar_path, tag_baseline, write_sidecar
from tests.collector_fake import FakeWindows, PoolTag, make_pe

GUID = "6c5a0b8e-9f1d-4e1b-a7c2-3d4e5f607182"


def module(name, base, pid=0, stamp=0x5F3E1A2B, **kw):
    row = {"base": base, "size": 0x8000, "name": name, "path": f"\\SystemRoot\\{name}", "pid": pid,
           "timedatestamp": stamp, "checksum": 0, "pdb_name": None, "pdb_guid": None, "pdb_age": None,
           "load_ns": None, "unload_ns": None}
    row.update(kw)
    return row


def side(*mods):
    return {"format": "pooltrace-sidecar", "version": 1, "modules": list(mods)}


def test_write_then_read_and_the_file_name(tmp_path):
    etl = tmp_path / "leak.etl"
    assert sidecar_path(etl) == tmp_path / "leak.etl.pooltrace.json"
    assert read_sidecar(etl) is None
    data = side({"name": "a.sys"})
    write_sidecar(etl, data)
    assert read_sidecar(etl) == data and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(("text", "words"), [
    ("{", "is not valid JSON"),
    ('{"format": "something-else"}', "is not a pooltrace sidecar"),
    ("[1, 2]", "is not a pooltrace sidecar"),
    ('{"format": "pooltrace-sidecar", "version": 2}', "has sidecar version 2; this pooltrace reads 1"),
])
def test_foreign_or_damaged_sidecars_are_errors(tmp_path, text, words):
    sidecar_path(tmp_path / "x.etl").write_text(text)
    with pytest.raises(PooltraceError, match=words):
        read_sidecar(tmp_path / "x.etl")


def test_merge_fills_kernel_images_only_and_never_replaces_trace_identities():
    table = pa.Table.from_pylist([
        module("leaky.sys", 0xFFFF0000),  # by name + TimeDateStamp
        module("NoStamp.SYS", 0xFFFF8000, stamp=0),  # by name + base (case-insensitive name)
        module("ntoskrnl.exe", 0xFFF00000, pdb_guid="11111111-1111-1111-1111-111111111111", pdb_name="nt.pdb",
               pdb_age=1),  # the trace's own identity stays
        module("leaky.sys", 0x10000, pid=1234),  # a user-mode image of the same name is left alone
        module("other.sys", 0xFFFE0000),  # not in the sidecar
    ], schema=MODULES_SCHEMA)
    data = side(
        {"name": "leaky.sys", "base": "0x0", "timedatestamp": 0x5F3E1A2B, "pdb_name": "leaky.pdb", "pdb_guid": GUID,
         "pdb_age": 2},
        {"name": "nostamp.sys", "base": "0xffff8000", "timedatestamp": 0x42, "pdb_name": "ns.pdb",
         "pdb_guid": "22222222-2222-2222-2222-222222222222", "pdb_age": 1},
        {"name": "ntoskrnl.exe", "base": "0xfff00000", "timedatestamp": 0x5F3E1A2B, "pdb_name": "x.pdb",
         "pdb_guid": "33333333-3333-3333-3333-333333333333", "pdb_age": 9},
        {"name": "other.sys", "base": "0xfffe0000", "timedatestamp": 1, "pdb_name": None, "pdb_guid": None,
         "pdb_age": None},
    )
    out = merge_pdb_identities(table, data)
    assert out.schema == MODULES_SCHEMA
    rows = out.to_pylist()
    assert (rows[0]["pdb_guid"], rows[0]["pdb_age"], rows[0]["pdb_name"]) == (GUID, 2, "leaky.pdb")
    assert rows[1]["pdb_name"] == "ns.pdb" and rows[1]["timedatestamp"] == 0x42
    assert rows[2]["pdb_name"] == "nt.pdb" and rows[2]["pdb_age"] == 1
    assert rows[3]["pdb_guid"] is None and rows[4]["pdb_guid"] is None
    assert merge_pdb_identities(table, None) is table


def test_tag_baseline_is_outstanding_allocations_and_bytes():
    data = {"pool_tags": {"filter": ["Leak"], "start": {"entries": [
        {"tag": "Leak", "value": 0, "paged_allocs": 100, "paged_frees": 40, "paged_bytes": 6000,
         "nonpaged_allocs": 2, "nonpaged_frees": 0xFFFFFFFF, "nonpaged_bytes": 64}]},  # frees wrapped past 2**32
        "stop": None}}
    assert tag_baseline(data) == {"Leak": {"start": {"allocs": 63, "bytes": 6064}, "stop": None}}
    assert tag_baseline(None) == {}


def test_recording_then_pairing_then_joining_gives_pdb_identities(tmp_path):
    """End to end: the fake 'records' a generated unmerged trace (image rundown, no DbgID records) while the
    drivers are PE files on 'disk'; pair sees no PDB identity, the sidecar supplies it."""
    base = 0xFFFFF80412000000
    w = TraceWriter()
    w.image(0, w.start_qpc + 10, 0x1403, base, 0x1046000, 0, "\\SystemRoot\\system32\\ntoskrnl.exe",
            timedatestamp=0x11111111)
    w.image(0, w.start_qpc + 20, 0x1403, base + 0x7A40000, 0x8000, 0, "\\??\\C:\\drivers\\leaky.sys",
            timedatestamp=0x5F3E1A2B)
    w.pool(0, w.start_qpc + 30, 0x0E20, 0x200, "Leak", 64, 0xFFFFA00000001000)
    (tmp_path / "nt.exe").write_bytes(make_pe(stamp=0x11111111, codeview=b"RSDS" + bytes(16) + b"\1\0\0\0nt.pdb\0"))
    (tmp_path / "leaky.sys").write_bytes(make_pe(stamp=0x5F3E1A2B))
    fake = FakeWindows(trace_bytes=w.to_bytes(), pool_tags=[PoolTag(b"Leak", 5, 2, 192)],
                       modules=[(0, 0, "\\SystemRoot\\system32\\ntoskrnl.exe"),  # bases hidden (Windows 11 24H2)
                                (0, 0, "\\??\\C:\\drivers\\leaky.sys")],
                       files={"c:\\windows\\system32\\ntoskrnl.exe": tmp_path / "nt.exe",
                              "c:\\drivers\\leaky.sys": tmp_path / "leaky.sys"})
    result = Recorder(fake, RecordRequest(output=tmp_path / "leak.etl", tags=("Leak",), duration_s=0.01),
                      tick_s=0.005).run()
    pair_trace(result.output, tmp_path / "ds")
    # `pair` reads the sidecar beside the trace and joins the identities the unmerged trace lacks
    modules = pq.read_table(tmp_path / "ds" / "modules.parquet")
    joined = {r["name"]: r for r in modules.to_pylist()}
    assert merge_pdb_identities(modules, read_sidecar(result.output)).to_pylist() == modules.to_pylist()
    assert (joined["leaky.sys"]["pdb_guid"], joined["leaky.sys"]["pdb_age"]) == (GUID, 2)
    assert joined["ntoskrnl.exe"]["pdb_name"] == "nt.pdb"
    assert tag_baseline(read_sidecar(result.output))["Leak"]["start"] == {"allocs": 3, "bytes": 192}
    assert json.loads(sidecar_path(result.output).read_text())["trace"] == "leak.etl"
