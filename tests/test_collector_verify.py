"""What the kernel actually applied, against the recording fake's silent failures: a stack drop, a refused
tag filter, a POOL bit not set (each read back, retried natively, and refused with the session stopped),
a read-back that cannot be made, module bases hidden without SeDebugPrivilege, and drivers that only the
finished trace's ImageLoad events name."""

from __future__ import annotations

import json
import struct

import pytest
from click.testing import CliRunner

import pooltrace.cli.record as cli_record
from pooltrace.collector.configure import KernelRefused
from pooltrace.collector.plan import RecordRequest
from pooltrace.collector.recorder import Recorder
from pooltrace.dataset import pair_trace
from pooltrace.etl.writer import TraceWriter
from pooltrace.sidecar import load_sidecar
from tests.collector_fake import STATUS_NOT_SUPPORTED, FakeWindows, PoolTag, make_pe

NT_BASE = 0xFFFFF80412000000


@pytest.fixture
def fake(tmp_path) -> FakeWindows:
    (tmp_path / "nt.exe").write_bytes(make_pe(stamp=0x11111111, image_size=0x1046000))
    return FakeWindows(pool_tags=[PoolTag(b"Leak", 3, 1, 128)],
                       modules=[(NT_BASE, 0x1046000, "\\SystemRoot\\system32\\ntoskrnl.exe")],
                       files={"c:\\windows\\system32\\ntoskrnl.exe": tmp_path / "nt.exe"})


def run(fake, tmp_path, **kw):
    kw.setdefault("duration_s", 0.02)
    return Recorder(fake, RecordRequest(output=tmp_path / "out.etl", **kw), tick_s=0.005).run()


def assert_refused_and_stopped(fake, tmp_path, exc, words):
    assert str(exc.value).startswith(f"Windows accepted the settings but did not apply them: {words}. The session "
                                     "was stopped and nothing was kept; run `pooltrace doctor`")
    assert "\n" not in str(exc.value)
    names = fake.names()
    assert "ControlTraceW:STOP" in names[names.index("StartTraceW"):] and fake.sessions == {}
    assert not list(tmp_path.glob("out.etl*"))


def test_a_silent_stack_drop_is_set_again_natively_and_read_back(fake, tmp_path):
    fake.ignore_stack_guids = True  # TraceSetInformation(3) says success and sets nothing
    result = run(fake, tmp_path, free_stacks=True)
    names = fake.names()
    i = names.index("NtQuerySystemInformation:31.6")
    assert names[i:i + 3] == ["NtQuerySystemInformation:31.6", "NtSetSystemInformation:31.6",
                              "NtQuerySystemInformation:31.6"]
    handle = [c for c in fake.calls if c.name == "StartTraceW"][0]["handle"]
    native = [c for c in fake.calls if c.name == "NtSetSystemInformation"][0]
    assert native["data"] == struct.pack("<IIQ4I", 6, 0, handle, 0x0E20, 0x0E21, 0x0E22, 0x0E23)
    state = json.loads(result.sidecar.read_text())["recording"]["kernel_state"]
    assert state["stacks_enabled"] is True and state["stacks_set_by"] == "NtSetSystemInformation"
    assert state["stack_hooks"] == ["0x0e20", "0x0e21", "0x0e22", "0x0e23"]


def test_stacks_dropped_by_both_calls_stop_the_session_and_name_them(fake, tmp_path):
    fake.ignore_stack_guids = fake.ignore_native_stacks = True
    with pytest.raises(KernelRefused) as exc:
        run(fake, tmp_path)
    assert_refused_and_stopped(fake, tmp_path, exc, "stack walking for PoolAlloc, PoolAllocSession")
    assert exc.value.state.stacks_enabled is False and exc.value.state.stack_hooks == ()


def test_a_refused_tag_filter_stops_the_session(fake, tmp_path):
    fake.ignore_tag_filter = True  # class 10 succeeds, the slot keeps matching every tag
    with pytest.raises(KernelRefused) as exc:
        run(fake, tmp_path, tags=("Leak", "Ab*"))
    assert_refused_and_stopped(fake, tmp_path, exc, "the pool-tag filter (asked Leak, Ab*; in effect: *)")
    assert "NtQuerySystemInformation:31.10" in fake.names()


def test_a_pool_bit_that_is_not_set_stops_the_session(fake, tmp_path):
    fake.ignore_pool_bit = True
    with pytest.raises(KernelRefused) as exc:
        run(fake, tmp_path)
    assert_refused_and_stopped(fake, tmp_path, exc, "pool events (the POOL bit of the group mask is not set)")
    names = fake.names()
    i = names.index("NtQuerySystemInformation:31.1")  # read, query-OR-set natively, read again
    assert names[i:i + 4] == ["NtQuerySystemInformation:31.1", "NtQuerySystemInformation:31.1",
                              "NtSetSystemInformation:31.1", "NtQuerySystemInformation:31.1"]


def test_several_refusals_are_named_in_one_line(fake, tmp_path):
    fake.ignore_stack_guids = fake.ignore_native_stacks = fake.ignore_pool_bit = fake.ignore_tag_filter = True
    with pytest.raises(KernelRefused) as exc:
        run(fake, tmp_path, tags=("Leak",))
    assert_refused_and_stopped(fake, tmp_path, exc,
                               "the pool-tag filter (asked Leak; in effect: *); stack walking for PoolAlloc, "
                               "PoolAllocSession; pool events (the POOL bit of the group mask is not set)")


def test_refusal_through_the_cli_is_one_line_and_exit_2(fake, tmp_path, monkeypatch):
    fake.ignore_pool_bit = True
    monkeypatch.setattr(cli_record, "windows_api", lambda: fake)
    r = CliRunner().invoke(cli_record.record, ["-o", str(tmp_path / "out.etl"), "--duration", "0.02"])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert r.output.startswith("pooltrace: error: Windows accepted the settings but did not apply them: pool events")
    assert fake.sessions == {}


def test_a_read_back_the_kernel_does_not_answer_is_said_not_fatal(fake, tmp_path):
    fake.fail[("NtQuerySystemInformation", 0x1F, 6)] = STATUS_NOT_SUPPORTED
    result = run(fake, tmp_path)
    assert any(w.startswith("could not read back the stack-walk hooks: STATUS_NOT_SUPPORTED (0xC00000BB)")
               for w in result.warnings)
    assert load_sidecar(result.output)[1] == []  # every new field passes the analyzer's schema check
    state = json.loads(result.sidecar.read_text())["recording"]["kernel_state"]
    assert state["stacks_enabled"] is None and state["unverified"] == [
        "the stack-walk hooks: STATUS_NOT_SUPPORTED (0xC00000BB)"]
    assert state["pool_enabled"] is True


def test_the_hook_list_buffer_grows_to_what_the_kernel_says(fake, tmp_path):
    def many_hooks(call):
        if call.name == "TraceSetInformation" and call["info_class"] == 3:
            fake.sessions["pooltrace"].hooks |= set(range(0x0100, 0x0100 + 100))  # other stacks on this logger

    fake.on_call = many_hooks
    result = run(fake, tmp_path)
    sizes = [c["size"] for c in fake.calls if c.name == "NtQuerySystemInformation" and c["data"][:4] == b"\6\0\0\0"]
    assert sizes == [16 + 4 * 64, 16 + 4 * 102]
    assert result.kernel_state.stacks_enabled is True and len(result.kernel_state.stack_hooks) == 102


# --- module bases (Windows 11 24H2) -------------------------------------------------------------------------
def test_debug_privilege_is_enabled_before_the_module_query_so_bases_are_real(fake, tmp_path):
    fake.hide_bases_without_debug = True
    result = run(fake, tmp_path)
    names = fake.names()
    assert names.index("AdjustTokenPrivileges") < names.index("NtQuerySystemInformation:11")
    assert [c["name"] for c in fake.calls if c.name == "AdjustTokenPrivileges"] == ["SeDebugPrivilege"]
    side = json.loads(result.sidecar.read_text())
    assert side["recording"]["debug_privilege"] == "enabled" and side["recording"]["module_bases"] == "real"
    assert side["modules"][0]["base"] == f"0x{NT_BASE:x}" and not result.warnings


def test_zero_module_bases_are_said_and_recorded(fake, tmp_path):
    fake.hide_bases_without_debug, fake.debug_privilege_held = True, False
    result = run(fake, tmp_path)
    assert result.warnings == ["Windows hid the drivers' load addresses (SeDebugPrivilege not held): PDB identities "
                               "are joined to the trace by file name and TimeDateStamp instead"]
    side = json.loads(result.sidecar.read_text())
    assert side["recording"]["debug_privilege"] == "not held" and side["recording"]["module_bases"] == "hidden"
    assert side["modules"][0]["base"] == "0x0" and side["modules"][0]["timedatestamp"] == 0x11111111


# --- drivers loaded during the trace --------------------------------------------------------------------------
def test_a_driver_loaded_and_unloaded_during_the_trace_gets_its_identity_from_the_trace(fake, tmp_path):
    """The classic leaks-on-unload case: transient.sys is in neither snapshot, only in the trace's ImageLoad
    events; its file on disk matches (TimeDateStamp, SizeOfImage) and gives the PDB identity. stale.sys's
    file was replaced after the trace (another TimeDateStamp): no identity, an error that says why."""
    w = TraceWriter()
    load, unload = 0x030A, 0x1402
    w.image(0, w.start_qpc + 10, 0x1403, NT_BASE, 0x1046000, 0, "\\SystemRoot\\system32\\ntoskrnl.exe",
            timedatestamp=0x11111111)
    w.image(0, w.start_qpc + 20, load, NT_BASE + 0x9000000, 0x3000, 0, "\\??\\C:\\drivers\\transient.sys",
            timedatestamp=0x5F3E1A2B)
    w.pool(0, w.start_qpc + 30, 0x0E20, 0x200, "Leak", 64, 0xFFFFA00000001000)
    w.image(0, w.start_qpc + 40, unload, NT_BASE + 0x9000000, 0x3000, 0, "\\??\\C:\\drivers\\transient.sys",
            timedatestamp=0x5F3E1A2B)
    w.image(0, w.start_qpc + 50, load, NT_BASE + 0xA000000, 0x3000, 0, "\\??\\C:\\drivers\\stale.sys",
            timedatestamp=0x22222222)
    w.image(0, w.start_qpc + 60, load, 0x7FF600000000, 0x3000, 1234, "\\??\\C:\\app\\user.dll")  # not a kernel image
    fake.trace_bytes = w.to_bytes()
    (tmp_path / "transient.sys").write_bytes(make_pe(stamp=0x5F3E1A2B, image_size=0x3000))
    (tmp_path / "stale.sys").write_bytes(make_pe(stamp=0x33333333, image_size=0x3000))
    fake.files.update({"c:\\drivers\\transient.sys": tmp_path / "transient.sys",
                       "c:\\drivers\\stale.sys": tmp_path / "stale.sys"})
    result = run(fake, tmp_path, tags=("Leak",))
    side = json.loads(result.sidecar.read_text())
    rows = {m["name"]: m for m in side["modules"]}
    assert set(rows) == {"ntoskrnl.exe", "transient.sys"}  # ntoskrnl once: the snapshot already had it
    assert rows["ntoskrnl.exe"]["source"] == "snapshot"
    t = rows["transient.sys"]
    assert (t["source"], t["base"], t["size"], t["timedatestamp"]) == ("trace", f"0x{NT_BASE + 0x9000000:x}",
                                                                        0x3000, 0x5F3E1A2B)
    assert t["pdb_guid"] == "6c5a0b8e-9f1d-4e1b-a7c2-3d4e5f607182" and t["pdb_age"] == 2
    assert side["module_errors"] == [{
        "nt_path": "\\??\\C:\\drivers\\stale.sys", "path": "C:\\drivers\\stale.sys",
        "error": "the file on disk (TimeDateStamp 0x33333333, SizeOfImage 0x3000) is not the image loaded during "
                 "the trace (0x22222222, 0x3000)"}]
    assert load_sidecar(result.output)[1] == []
    pair_trace(result.output, tmp_path / "ds")  # pair joins the trace-only identity into modules.parquet
    import pyarrow.parquet as pq

    joined = {r["name"]: r for r in pq.read_table(tmp_path / "ds" / "modules.parquet").to_pylist()}
    assert joined["transient.sys"]["pdb_guid"] == "6c5a0b8e-9f1d-4e1b-a7c2-3d4e5f607182"


def test_an_unreadable_trace_keeps_the_sidecar(fake, tmp_path):
    fake.trace_bytes = b"\0" * 4096
    result = run(fake, tmp_path)
    assert any(w.startswith("could not read the image loads in out.etl") for w in result.warnings)
    assert json.loads(result.sidecar.read_text())["modules"][0]["name"] == "ntoskrnl.exe"
