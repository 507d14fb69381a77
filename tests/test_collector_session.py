"""The recorder above the Windows boundary, against the recording fake: call sequences per Windows version,
the bytes of every structure, stop on every failure path, Ctrl+C / console events, the temp-name rename,
`-- COMMAND`, the pre-start checks and the messages users read."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import threading
import uuid
from itertools import groupby
from pathlib import Path

import pytest

from pooltrace.collector import plan as P
from pooltrace.collector import recorder as S
from pooltrace.collector.drivers import dos_path
from pooltrace.collector.plan import RecordRequest
from pooltrace.collector.recorder import Recorder
from pooltrace.collector.stop import stop_sessions
from pooltrace.errors import PooltraceError
from pooltrace.sidecar import load_sidecar
from tests.collector_fake import (
    ERROR_ACCESS_DENIED,
    ERROR_ALREADY_EXISTS,
    ERROR_BAD_LENGTH,
    ERROR_INVALID_PARAMETER,
    ERROR_NO_SYSTEM_RESOURCES,
    ERROR_NOT_SUPPORTED,
    ERROR_PATH_NOT_FOUND,
    STATUS_ACCESS_DENIED,
    STATUS_INVALID_PARAMETER,
    STATUS_NOT_SUPPORTED,
    FakeWindows,
    PoolTag,
    make_pe,
)

POOL_GUID = uuid.UUID("0268a8b6-74fd-4302-9dd0-6e8f1795c0cf")
PRIVATE_GUID = uuid.UUID("8f9c5e2a-3d71-4b6e-9a0c-5e1f27d4b6a3")
KERNEL_GUID = uuid.UUID("9e814aad-3204-11d2-9a82-006008a86939")
LEAK = 0x6B61654C
NT_BASE = 0xFFFFF80412000000

SETUP = ["GetVersion", "IsUserAnAdmin", "GetDiskFreeSpaceEx", "ControlTraceW:QUERY", "NtQuerySystemInformation:22",
         "AdjustTokenPrivileges", "NtQuerySystemInformation:11", "StartTraceW", "SetConsoleCtrlHandler"]
VERIFY = ["NtQuerySystemInformation:31.6", "NtQuerySystemInformation:31.1"]  # read back stacks, group mask
FINISH = ["ControlTraceW:FLUSH", "ControlTraceW:STOP", "NtQuerySystemInformation:22", "NtQuerySystemInformation:11",
          "SetConsoleCtrlHandler"]


@pytest.fixture
def fake(tmp_path) -> FakeWindows:
    nt, leaky = tmp_path / "ntoskrnl.exe", tmp_path / "leaky.sys"
    nt.write_bytes(make_pe(stamp=0x11111111, image_size=0x1046000))
    leaky.write_bytes(make_pe(stamp=0x5F3E1A2B, image_size=0x8000))
    return FakeWindows(
        pool_tags=[PoolTag(b"Leak", 100, 40, 6000, 5, 1, 512), PoolTag(b"Irp ", 9, 9, 0, 3, 3, 0),
                   PoolTag(b"LeaX", 1, 0, 64, 0, 0, 0)],
        modules=[(NT_BASE, 0x1046000, "\\SystemRoot\\system32\\ntoskrnl.exe"),
                 (NT_BASE + 0x7A40000, 0x8000, "\\Device\\HarddiskVolume3\\drivers\\leaky.sys"),
                 (NT_BASE + 0x9000000, 0x4000, "\\SystemRoot\\System32\\drivers\\gone.sys")],
        files={"c:\\windows\\system32\\ntoskrnl.exe": nt, "c:\\drivers\\leaky.sys": leaky})


def request(tmp_path: Path, **kw) -> RecordRequest:
    kw.setdefault("duration_s", 0.03)
    return RecordRequest(output=tmp_path / "out.etl", **kw)


def run(fake, req, **kw):
    return Recorder(fake, req, tick_s=0.005, **kw).run()


def squash(names: list[str]) -> list[str]:
    """The sequence with repeated live-statistics queries collapsed to one."""
    return [k for k, _ in groupby(names)]


def calls(fake, name, **match):
    return [c for c in fake.calls if c.name == name and all(c.args.get(k) == v for k, v in match.items())]


def u32(data: bytes, off: int) -> int:
    return struct.unpack_from("<I", data, off)[0]


def assert_stopped_cleanly(fake):
    """The session that StartTrace opened was stopped, after StartTrace, and nothing is left running."""
    names = fake.names()
    assert "ControlTraceW:STOP" in names[names.index("StartTraceW"):]
    assert fake.sessions == {}


# --- call sequences ---------------------------------------------------------------------------------------
def test_windows8_private_logger_sequence_and_bytes(fake, tmp_path):
    result = run(fake, request(tmp_path, tags=("Leak",)))
    assert squash(fake.names()) == SETUP + [
        "NtSetSystemInformation:31.10", "TraceSetInformation:3", "TraceSetInformation:4",
        "NtQuerySystemInformation:31.10"] + VERIFY + ["ControlTraceW:QUERY"] + FINISH
    (start,) = calls(fake, "StartTraceW")
    props = start["props"]
    assert start["name"] == "pooltrace" and props[0x18:0x28] == PRIVATE_GUID.bytes_le
    assert u32(props, 0x40) == 0x02000001 and u32(props, 0x48) == 0x7 and u32(props, 0x2C) == 0x20000
    assert u32(props, 0x3C) == 4096  # the default size cap (MB)
    handle = start["handle"]
    (tags,) = calls(fake, "NtSetSystemInformation")
    assert tags["info_class"] == 0x1F and tags["data"] == struct.pack("<IIQI", 10, 0, handle, LEAK)
    reads = [c for c in calls(fake, "NtQuerySystemInformation", info_class=0x1F)]
    assert [(c["data"][:16], c["size"]) for c in reads] == [
        (struct.pack("<IIQ", 10, 0, handle), 32), (struct.pack("<IIQ", 6, 0, handle), 16 + 4 * 64),
        (struct.pack("<IIQ", 1, 0, handle), 48)]
    assert result.kernel_state.as_dict() == {
        "pool_enabled": True, "group_masks": ["0x00000007", "0x00000040"] + ["0x00000000"] * 6,
        "stacks_enabled": True, "stack_hooks": ["0x0e20", "0x0e21"], "stacks_set_by": "TraceSetInformation",
        "group_mask_set_by": "TraceSetInformation", "tag_filter": ["Leak"], "tag_filter_in_effect": True,
        "unverified": []}
    assert all(c["guid"] == PRIVATE_GUID for c in calls(fake, "ControlTraceW"))  # Wnode.Guid for QUERY and STOP
    stacks, groups = calls(fake, "TraceSetInformation")
    assert stacks["handle"] == handle and groups["handle"] == handle
    assert stacks["data"] == POOL_GUID.bytes_le + b"\x20" + bytes(7) + POOL_GUID.bytes_le + b"\x21" + bytes(7)
    assert groups["data"] == struct.pack("<8I", 7, 0x40, 0, 0, 0, 0, 0, 0)
    assert all(c["handle"] == handle and c["name"] == "pooltrace" for c in calls(fake, "ControlTraceW")[1:])
    assert result.output.read_bytes() == fake.trace_bytes and not (tmp_path / "out.etl.partial").exists()
    assert result.stopped_by == "duration" and result.seconds >= 0.03
    assert_stopped_cleanly(fake)


def test_the_log_file_is_written_under_a_temporary_name_first(fake, tmp_path):
    seen = []
    fake.on_call = lambda c: seen.append((c.name, (tmp_path / "out.etl").exists(),
                                          (tmp_path / "out.etl.partial").exists()))
    run(fake, request(tmp_path))
    (start,) = calls(fake, "StartTraceW")
    file_off = u32(start["props"], 0x70)
    path = str(tmp_path / "out.etl.partial").encode("utf-16-le") + b"\0\0"
    assert start["props"][file_off:file_off + len(path)] == path
    during = [s for s in seen if s[0] == "ControlTraceW"][1:-2]  # live queries while recording
    assert during and all(not final and partial for _, final, partial in during)
    assert (tmp_path / "out.etl").exists() and not (tmp_path / "out.etl.partial").exists()


def test_kernel_logger_on_windows8(fake, tmp_path):
    run(fake, request(tmp_path, kernel_logger=True, free_stacks=True, circular=True, max_size_mb=300))
    (start,) = calls(fake, "StartTraceW")
    props = start["props"]
    assert start["name"] == "NT Kernel Logger" and props[0x18:0x28] == KERNEL_GUID.bytes_le
    assert u32(props, 0x40) == 0x2 and u32(props, 0x3C) == 300  # circular, no SYSTEM_LOGGER_MODE
    (stacks,) = calls(fake, "TraceSetInformation", info_class=3)
    assert stacks["handle"] == 0xFFFF
    assert [stacks["data"][i * 24 + 16] for i in range(4)] == [0x20, 0x21, 0x22, 0x23]  # --free-stacks
    assert not calls(fake, "NtSetSystemInformation")  # no tags, no filter
    assert_stopped_cleanly(fake)


def test_windows_before_8_1_and_32_bit_are_refused_before_anything_runs(fake, tmp_path):
    fake.version = (6, 2, 9200)
    with pytest.raises(PooltraceError, match=r"^recording needs Windows 8.1 or later, x64 \(this is Windows 6.2.9200"):
        run(fake, request(tmp_path))
    assert fake.names() == ["GetVersion"]
    fake.version, fake.wide = (10, 0, 19045), False
    with pytest.raises(PooltraceError, match=r"needs 64-bit \(x64\) Windows and 64-bit Python \(this is 32-bit Win"):
        run(fake, request(tmp_path))
    fake.wide, fake.ptr = True, 4
    with pytest.raises(PooltraceError, match=r"\(this is 32-bit Python\)"):
        run(fake, request(tmp_path))
    assert "StartTraceW" not in fake.names()
    fake.ptr, fake.version = 8, (6, 3, 9600)  # Windows 8.1: the floor
    run(fake, request(tmp_path))
    assert_stopped_cleanly(fake)


def test_a_log_path_over_1024_characters_is_refused_in_one_line(fake, tmp_path):
    deep = tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 200) / ("g" * 200)
    deep.mkdir(parents=True)
    with pytest.raises(PooltraceError) as exc:
        run(fake, RecordRequest(output=deep / ("x" * 200 + ".etl"), duration_s=0.01))
    assert "Windows takes at most 1024: write to a shorter path with -o" in str(exc.value)
    assert "\n" not in str(exc.value) and "StartTraceW" not in fake.names()


# --- fallbacks --------------------------------------------------------------------------------------------
def test_stacks_fall_back_to_native_hook_ids(fake, tmp_path):
    fake.fail[("TraceSetInformation", 3)] = ERROR_INVALID_PARAMETER
    run(fake, request(tmp_path, free_stacks=True))
    (native,) = calls(fake, "NtSetSystemInformation")
    handle = calls(fake, "StartTraceW")[0]["handle"]
    assert native["data"] == struct.pack("<IIQ4I", 6, 0, handle, 0x0E20, 0x0E21, 0x0E22, 0x0E23)
    assert fake.names().index("NtSetSystemInformation:31.6") < fake.names().index("TraceSetInformation:4")


def test_group_mask_falls_back_to_query_or_and_set(fake, tmp_path):
    fake.fail[("TraceSetInformation", 4)] = ERROR_NOT_SUPPORTED

    def other_bits(call):  # another tool's groups on this logger before ours are ORed in
        if call.name == "TraceSetInformation" and call["info_class"] == 3:
            fake.sessions["pooltrace"].masks = [0x207, 0x1, 0, 0, 0x40, 0, 0, 0]

    fake.on_call = other_bits
    result = run(fake, request(tmp_path))
    assert result.kernel_state.group_mask_set_by == "NtSetSystemInformation" and result.kernel_state.pool_enabled
    names = squash(fake.names())
    i = names.index("TraceSetInformation:4")
    assert names[i + 1:i + 3] == ["NtQuerySystemInformation:31.1", "NtSetSystemInformation:31.1"]
    (native,) = calls(fake, "NtSetSystemInformation")
    handle = calls(fake, "StartTraceW")[0]["handle"]
    assert len(native["data"]) == 48
    assert native["data"] == struct.pack("<IIQ8I", 1, 0, handle, 0x207, 0x41, 0, 0, 0x40, 0, 0, 0)



# --- failures after StartTrace: always stopped --------------------------------------------------------------
@pytest.mark.parametrize(("fail", "error", "words"), [
    ({("NtSetSystemInformation", 10): STATUS_INVALID_PARAMETER}, PooltraceError,
     "Windows refused the pool-tag filter (STATUS_INVALID_PARAMETER (0xC000000D)); record without --tag and "
     "filter the tags at analysis time"),
    ({("TraceSetInformation", 3): ERROR_INVALID_PARAMETER, ("NtSetSystemInformation", 6): STATUS_NOT_SUPPORTED},
     PooltraceError, "could not turn on stack walking for pool events (TraceSetInformation: ERROR_INVALID_PARAMETER "
                     "(87); NtSetSystemInformation: STATUS_NOT_SUPPORTED (0xC00000BB))"),
    ({("TraceSetInformation", 4): ERROR_NOT_SUPPORTED, ("NtSetSystemInformation", 1): STATUS_ACCESS_DENIED},
     PooltraceError, "could not turn on pool events (TraceSetInformation: ERROR_NOT_SUPPORTED (50); "
                     "NtSetSystemInformation: STATUS_ACCESS_DENIED (0xC0000022))"),
    ({("TraceSetInformation", 3): ERROR_ACCESS_DENIED}, PooltraceError, "needs administrator rights"),
    ({("TraceSetInformation", 4): KeyboardInterrupt}, KeyboardInterrupt, ""),
    ({("TraceSetInformation", 4): RuntimeError("boom")}, RuntimeError, "boom"),
])
def test_setup_failures_after_start_trace_stop_the_session_and_drop_the_file(fake, tmp_path, fail, error, words):
    fake.fail.update(fail)
    with pytest.raises(error) as exc:
        run(fake, request(tmp_path, tags=("Leak",)))
    assert words in str(exc.value)
    assert_stopped_cleanly(fake)
    assert not (tmp_path / "out.etl").exists() and not (tmp_path / "out.etl.partial").exists()
    assert calls(fake, "SetConsoleCtrlHandler")[-1]["installed"] is False


def test_a_command_that_cannot_start_stops_the_session(fake, tmp_path):
    with pytest.raises(PooltraceError, match="cannot run /no/such/program"):
        run(fake, request(tmp_path, duration_s=None, command=("/no/such/program",)))
    assert_stopped_cleanly(fake)
    assert not (tmp_path / "out.etl").exists()


def test_an_error_while_recording_stops_keeps_the_trace_and_reraises(fake, tmp_path):
    state = {"n": 0}

    def on_call(c):
        if c.name == "ControlTraceW" and c["code"] == 0 and c["handle"]:
            state["n"] += 1
            if state["n"] == 3:
                raise RuntimeError("display broke")

    fake.on_call = on_call
    with pytest.raises(RuntimeError, match="display broke"):
        run(fake, request(tmp_path, duration_s=5))
    assert_stopped_cleanly(fake)
    assert (tmp_path / "out.etl").exists()
    side = json.loads((tmp_path / "out.etl.pooltrace.json").read_text())
    assert side["recording"]["stopped_by"] == "error"


@pytest.mark.parametrize(("code", "kernel", "words"), [
    (ERROR_ACCESS_DENIED, False, "recording needs administrator rights: run pooltrace from an elevated prompt "
                                 "(Run as administrator)"),
    (ERROR_ALREADY_EXISTS, False, "a pooltrace session is already running (a recorder still running, or one that "
                                  "was killed or outlived a logoff); end it with `pooltrace stop`"),
    (ERROR_ALREADY_EXISTS, True, "the NT Kernel Logger is already running, started by another tool (WPR, xperf, "
                                 "Process Monitor, ...): stop that tool, or end it with `pooltrace stop "
                                 "--kernel-logger`, or record without --kernel-logger"),
    (ERROR_NO_SYSTEM_RESOURCES, False, "Windows has no free system trace session slot (8 at most, 2 reserved): stop "
                                       "another kernel trace session (`logman query -ets` lists them), or record "
                                       "with --kernel-logger"),
    (ERROR_BAD_LENGTH, False, "pooltrace built a structure Windows rejected (ERROR_BAD_LENGTH (24)); this is a "
                              "pooltrace bug, please report it"),
    (ERROR_INVALID_PARAMETER, False, "Windows rejected the trace session settings (ERROR_INVALID_PARAMETER (87)); "
                                     "check --buffer-size, --buffers and --max-size"),
    (ERROR_PATH_NOT_FOUND, False, "(ERROR_PATH_NOT_FOUND (3)): check that the directory exists and is writable"),
    (1234, False, "starting the trace session (StartTrace) failed: Windows error 1234"),
])
def test_start_trace_errors_are_explained_and_leave_nothing_behind(fake, tmp_path, code, kernel, words):
    fake.fail[("StartTraceW",)] = code
    with pytest.raises(PooltraceError) as exc:
        run(fake, request(tmp_path, kernel_logger=kernel))
    assert words in str(exc.value)
    assert "ControlTraceW:STOP" not in fake.names() and "SetConsoleCtrlHandler" not in fake.names()
    assert not list(tmp_path.glob("out.etl*"))


# --- pre-start checks ---------------------------------------------------------------------------------------
def test_not_admin(fake, tmp_path):
    fake.admin = False
    with pytest.raises(PooltraceError, match="needs administrator rights"):
        run(fake, request(tmp_path))
    assert "StartTraceW" not in fake.names()


def test_a_stock_machine_records_on_the_first_try_without_registry_checks(fake, tmp_path):
    result = run(fake, request(tmp_path))  # no DisablePagingExecutive (Windows 8+ does not need it)
    assert result.stopped_by == "duration" and not result.warnings
    assert not any(n.startswith("Reg") for n in fake.names())


def test_a_leftover_session_of_ours_points_to_pooltrace_stop_or_force(fake, tmp_path):
    leftover = tmp_path / "old.etl.partial"
    leftover.write_bytes(b"old")
    fake.running("pooltrace", log_file="\\??\\" + str(leftover), mode=0x02000001)
    with pytest.raises(PooltraceError) as exc:
        run(fake, request(tmp_path))
    assert str(exc.value) == ("a pooltrace session is already running (a recorder still running, or one that was "
                              "killed or outlived a logoff); end it with `pooltrace stop`, or pass --force to stop "
                              "it and record")
    (query,) = calls(fake, "ControlTraceW")
    assert query["handle"] == 0 and query["name"] == "pooltrace" and query["code"] == 0
    assert query["guid"] == PRIVATE_GUID
    assert "StartTraceW" not in fake.names() and "pooltrace" in fake.sessions  # not ours to stop unasked
    ui = Ui()
    result = run(fake, request(tmp_path, force=True), ui=ui)
    assert ui.warnings[0] == f"stopped a leftover pooltrace session; its trace: {tmp_path / 'old.etl'}"
    assert (tmp_path / "old.etl").read_bytes() == b"old" and result.output.exists()
    assert_stopped_cleanly(fake)


def test_a_running_kernel_logger_is_someone_elses(fake, tmp_path):
    fake.running("NT Kernel Logger")
    run(fake, request(tmp_path))  # a private logger does not collide
    with pytest.raises(PooltraceError, match="started by another tool"):
        run(fake, request(tmp_path, kernel_logger=True, force=True))


def test_disk_space_and_existing_output(fake, tmp_path):
    fake.free = 100 << 20
    with pytest.raises(PooltraceError, match=r"only 100 MB free in .*needs at least 512 MB.*--circular --max-size"):
        run(fake, request(tmp_path))
    with pytest.raises(PooltraceError, match="needs at least 1,064 MB"):
        run(fake, request(tmp_path, circular=True, max_size_mb=1000))
    fake.free = 1 << 40
    (tmp_path / "out.etl").write_bytes(b"old")
    with pytest.raises(PooltraceError, match="out.etl exists: choose another name or pass --force"):
        run(fake, request(tmp_path))
    run(fake, request(tmp_path, force=True))
    assert (tmp_path / "out.etl").read_bytes() == fake.trace_bytes
    with pytest.raises(PooltraceError, match="--circular needs --max-size"):
        run(fake, request(tmp_path, circular=True))
    with pytest.raises(PooltraceError, match="does not exist"):
        run(fake, RecordRequest(output=tmp_path / "nodir" / "x.etl"))


def test_relative_output_is_made_absolute_and_a_stale_sidecar_never_survives(fake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel.etl").write_bytes(b"old trace")
    (tmp_path / "rel.etl.pooltrace.json").write_text("{}")

    def cannot_write(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S, "write_sidecar", cannot_write)
    ui = Ui()
    result = run(fake, RecordRequest(output=Path("rel.etl"), duration_s=0.01, force=True), ui=ui)
    (start,) = calls(fake, "StartTraceW")
    path = str(tmp_path / "rel.etl.partial").encode("utf-16-le")
    assert path in start["props"]
    assert result.output == tmp_path / "rel.etl" and result.sidecar is None
    assert (tmp_path / "rel.etl").read_bytes() == fake.trace_bytes
    assert not (tmp_path / "rel.etl.pooltrace.json").exists()
    assert any(w.startswith("could not write") and "No space left on device" in w for w in ui.warnings)


# --- stopping -----------------------------------------------------------------------------------------------
def _on_nth_live_query(fake, n, action):
    state = {"n": 0}

    def on_call(c):
        if c.name == "ControlTraceW" and c["code"] == 0 and c["handle"]:
            state["n"] += 1
            if state["n"] == n:
                action()

    fake.on_call = on_call


def test_ctrl_c_stops_renames_and_writes_the_sidecar(fake, tmp_path):
    def interrupt():
        raise KeyboardInterrupt

    _on_nth_live_query(fake, 3, interrupt)
    result = run(fake, request(tmp_path, duration_s=None))
    assert result.stopped_by == "ctrl-c"
    assert_stopped_cleanly(fake)
    assert (tmp_path / "out.etl").exists() and (tmp_path / "out.etl.pooltrace.json").exists()


def test_a_second_ctrl_c_while_stopping_cannot_skip_the_stop(fake, tmp_path):
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the shell started the tests in the background

    def on_call(c):
        if c.name == "ControlTraceW" and c["code"] == 3:  # during FLUSH
            signal.raise_signal(signal.SIGINT)

    fake.on_call = on_call
    result = run(fake, request(tmp_path))
    assert result.stopped_by == "duration"
    assert_stopped_cleanly(fake)
    assert (tmp_path / "out.etl").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the held Ctrl+C handler is gone again


def test_ctrl_c_during_start_trace_still_stops_the_session_it_started(fake, tmp_path):
    fake.on_call = lambda c: signal.raise_signal(signal.SIGINT) if c.name == "StartTraceW" else None
    with pytest.raises(KeyboardInterrupt):
        run(fake, request(tmp_path))
    assert_stopped_cleanly(fake)
    assert "TraceSetInformation:4" not in fake.names() and not list(tmp_path.glob("out.etl*"))


def test_closing_the_console_finishes_from_the_handler_thread(fake, tmp_path):
    answers = []

    def close():
        t = threading.Thread(target=lambda: answers.append((fake.console_handler(0), fake.console_handler(2))))
        t.start()
        t.join()
        assert (tmp_path / "out.etl").exists()  # finished before the handler returned

    _on_nth_live_query(fake, 2, close)
    result = run(fake, request(tmp_path, duration_s=None))
    assert answers == [(False, True)]  # Ctrl+C is left to Python; close is handled
    assert result.stopped_by == "console-close"
    assert fake.names().count("ControlTraceW:STOP") == 1
    assert_stopped_cleanly(fake)


def test_ctrl_break_stops_the_recording(fake, tmp_path):
    _on_nth_live_query(fake, 2, lambda: fake.console_handler(1))
    result = run(fake, request(tmp_path, duration_s=None))
    assert result.stopped_by == "ctrl-break"
    assert_stopped_cleanly(fake)


def test_a_session_stopped_elsewhere_ends_the_recording(fake, tmp_path):
    _on_nth_live_query(fake, 2, lambda: fake.sessions.clear())
    ui = Ui()
    result = run(fake, request(tmp_path, duration_s=None), ui=ui)
    assert result.stopped_by == "stopped-elsewhere"
    assert "the pooltrace session had already been stopped (by `pooltrace stop`?)" in ui.warnings
    assert (tmp_path / "out.etl").exists()


class Ui:
    def __init__(self):
        self.ticks, self.warnings = [], []

    def tick(self, status):
        self.ticks.append(status)

    def warning(self, text):
        self.warnings.append(text)


def test_live_status_and_loss_report(fake, tmp_path):
    fake.events_lost, fake.log_buffers_lost = 12, 3
    ui = Ui()
    result = run(fake, request(tmp_path, duration_s=0.05), ui=ui)
    assert ui.ticks and ui.ticks[-1].events_lost == 12 and ui.ticks[-1].buffers_lost == 3
    assert ui.ticks[-1].file_bytes == len(fake.trace_bytes) and ui.ticks[-1].duration_s == 0.05
    assert result.stats.events_lost == 12
    assert "12 events and 3 buffers were lost: filter with --tag, or give more buffers (--buffer-size, --buffers)" \
        in ui.warnings
    line = S.status_line(S.LiveStatus(3725.2, 5 << 20, 12, 3, 7200.0, "repro.exe"))
    assert line == ("recording 1:02:05 of 2:00:00  file 5.0 MB  events lost 12  buffers lost 3  running repro.exe"
                    "  (Ctrl+C stops)")


# --- -- COMMAND ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "expected"), [("pass", 0), ("import sys; sys.exit(3)", 3)])
def test_command_mode_records_while_the_command_runs(fake, tmp_path, monkeypatch, code, expected):
    real = subprocess.Popen

    def popen(*a, **kw):
        fake._record("Popen", argv=a[0])
        return real(*a, **kw)

    monkeypatch.setattr(S.subprocess, "Popen", popen)
    result = run(fake, request(tmp_path, duration_s=None, command=(sys.executable, "-c", code)))
    assert result.stopped_by == "command" and result.command_exit_code == expected
    names = squash(fake.names())
    assert names.index("TraceSetInformation:4") < names.index("Popen") < names.index("ControlTraceW:STOP")
    side = json.loads((tmp_path / "out.etl.pooltrace.json").read_text())
    assert side["recording"]["command"] == [sys.executable, "-c", code]
    assert side["recording"]["command_exit_code"] == expected


# --- the sidecar ------------------------------------------------------------------------------------------
def test_sidecar_holds_driver_identities_and_the_tag_baseline(fake, tmp_path):
    result = run(fake, request(tmp_path, tags=("Le*",)))
    side = json.loads(result.sidecar.read_text())
    assert side["format"] == "pooltrace-sidecar" and side["version"] == 1 and side["trace"] == "out.etl"
    mods = {m["name"]: m for m in side["modules"]}
    assert set(mods) == {"ntoskrnl.exe", "leaky.sys"}  # each once, though listed at start and at stop
    leaky = mods["leaky.sys"]
    assert leaky == {"name": "leaky.sys", "nt_path": "\\Device\\HarddiskVolume3\\drivers\\leaky.sys",
                     "path": "C:\\drivers\\leaky.sys", "base": f"0x{NT_BASE + 0x7A40000:x}", "size": 0x8000,
                     "timedatestamp": 0x5F3E1A2B, "checksum": 0x1234, "pdb_name": "leaky.pdb",
                     "pdb_guid": "6c5a0b8e-9f1d-4e1b-a7c2-3d4e5f607182", "pdb_age": 2, "source": "snapshot",
                     "pdb_path": "C:\\build\\leaky.pdb"}
    assert mods["ntoskrnl.exe"]["path"] == "C:\\Windows\\system32\\ntoskrnl.exe"
    assert side["module_errors"] == [{"nt_path": "\\SystemRoot\\System32\\drivers\\gone.sys",
                                      "path": "C:\\Windows\\System32\\drivers\\gone.sys",
                                      "error": "The system cannot find the file specified"}]
    pool = side["pool_tags"]
    assert pool["filter"] == ["Le*"]
    for when in ("start", "stop"):
        assert [e["tag"] for e in pool[when]["entries"]] == ["LeaX", "Leak"]  # "Irp " is not in the filter
    assert pool["start"]["entries"][1] == {"tag": "Leak", "value": LEAK, "paged_allocs": 100, "paged_frees": 40,
                                           "paged_bytes": 6000, "nonpaged_allocs": 5, "nonpaged_frees": 1,
                                           "nonpaged_bytes": 512}
    rec = side["recording"]
    assert rec["logger"] == "pooltrace" and rec["logger_kind"] == "private" and rec["tag_filter"] == ["Le*"]
    assert rec["stacks"] == ["PoolAlloc", "PoolAllocSession"] and rec["events_lost"] == 0
    assert result.modules == 2 and result.module_errors == 1
    clean, problems = load_sidecar(result.output)  # what the analyzer's schema check makes of it
    assert problems == [] and clean == side


def test_pool_tag_buffer_grows_until_it_fits(fake, tmp_path):
    fake.pool_tags = [PoolTag(f"T{i:03d}".encode(), i) for i in range(3000)]  # 120 KB > the first 64 KB
    result = run(fake, request(tmp_path))
    sizes = [c["size"] for c in calls(fake, "NtQuerySystemInformation", info_class=22)]
    assert sizes[0] == 64 * 1024 and sizes[1] > 8 + 3000 * 40
    side = json.loads(result.sidecar.read_text())
    assert len(side["pool_tags"]["start"]["entries"]) == 3000 and side["pool_tags"]["filter"] == []


def test_unreadable_counters_are_a_warning_not_a_failure(fake, tmp_path):
    fake.fail[("NtQuerySystemInformation", 22)] = STATUS_ACCESS_DENIED
    ui = Ui()
    result = run(fake, request(tmp_path), ui=ui)
    assert any("could not read the kernel's pool tag counters at start (STATUS_ACCESS_DENIED (0xC0000022))" in w
               for w in ui.warnings)
    assert json.loads(result.sidecar.read_text())["pool_tags"]["start"] is None


# --- pooltrace stop -------------------------------------------------------------------------------------------
def test_stop_lists_and_stops_every_pooltrace_session_and_renames_their_files(tmp_path):
    fake = FakeWindows(events_lost=4)
    for name in ("pooltrace", "pooltrace-doctor"):
        partial = tmp_path / f"{name}.etl.partial"
        partial.write_bytes(name.encode())
        fake.running(name, log_file="\\??\\" + str(partial), mode=0x02000001)
    fake.running("NT Kernel Logger", handle=0xFFFF)
    fake.running("EventLog-System")
    results = stop_sessions(fake)
    assert [r.name for r in results] == ["pooltrace", "pooltrace-doctor"]
    assert calls(fake, "QueryAllTracesW")[0]["count"] == 64
    stops = calls(fake, "ControlTraceW", code=1)
    assert [(c["handle"], c["name"]) for c in stops] == [(0, "pooltrace"), (0, "pooltrace-doctor")]
    assert stops[0]["guid"] == PRIVATE_GUID
    assert results[0].stats.events_lost == 4 and results[0].renamed_to == str(tmp_path / "pooltrace.etl")
    assert (tmp_path / "pooltrace-doctor.etl").read_bytes() == b"pooltrace-doctor"
    assert set(fake.sessions) == {"NT Kernel Logger", "EventLog-System"}  # other tools' sessions stay
    (kernel,) = stop_sessions(fake, kernel_logger=True)
    assert kernel.name == "NT Kernel Logger" and calls(fake, "ControlTraceW", code=1)[-1]["guid"] == KERNEL_GUID


def test_stop_errors():
    fake = FakeWindows()
    with pytest.raises(PooltraceError, match="^no pooltrace session is running$"):
        stop_sessions(fake)
    with pytest.raises(PooltraceError, match="^no NT Kernel Logger session is running$"):
        stop_sessions(fake, kernel_logger=True)
    fake.running("pooltrace")
    fake.fail[("ControlTraceW", 1)] = ERROR_ACCESS_DENIED
    with pytest.raises(PooltraceError, match="needs administrator rights"):
        stop_sessions(fake)
    fake.fail[("QueryAllTracesW",)] = ERROR_ACCESS_DENIED
    with pytest.raises(PooltraceError, match="needs administrator rights"):
        stop_sessions(fake)


# --- NT paths ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("nt", "dos"), [
    ("\\SystemRoot\\system32\\ntoskrnl.exe", "C:\\Windows\\system32\\ntoskrnl.exe"),
    ("\\systemroot\\System32\\drivers\\x.sys", "C:\\Windows\\System32\\drivers\\x.sys"),
    ("\\??\\D:\\drv\\x.sys", "D:\\drv\\x.sys"),
    ("\\\\?\\D:\\drv\\x.sys", "D:\\drv\\x.sys"),
    ("\\Device\\HarddiskVolume3\\drv\\x.sys", "C:\\drv\\x.sys"),
    ("\\Device\\HarddiskVolume30\\drv\\x.sys", None),  # no such drive; not mistaken for volume 3
    ("\\Windows\\System32\\drivers\\x.sys", "C:\\Windows\\System32\\drivers\\x.sys"),
    ("System32\\drivers\\x.sys", "C:\\Windows\\System32\\drivers\\x.sys"),
    ("E:\\x.sys", "E:\\x.sys"),
    ("", None),
])
def test_dos_path(nt, dos):
    assert dos_path(nt, "C:\\Windows", {"C:": "\\Device\\HarddiskVolume3", "D:": "\\Device\\HarddiskVolume4"}) == dos


def test_stack_hooks_and_masks_come_from_providers():
    plan = P.make_plan(RecordRequest(output=Path("x.etl")), (10, 0, 19041), cpus=64)
    assert plan.stack_hook_ids == (0x0E20, 0x0E21) and plan.group_masks[:2] == (7, 0x40)
    assert plan.minimum_buffers == 128 and plan.maximum_buffers == 512  # 2 per CPU
    assert plan.maximum_file_size_mb == 4096  # the documented default cap
    assert P.make_plan(RecordRequest(output=Path("x.etl"), buffers=100, buffer_size_kb=256), (10, 0, 1),
                       cpus=64).maximum_buffers == 148  # at least minimum + 20
