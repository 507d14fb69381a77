"""`pooltrace doctor`: the Linux fence, every check through the recording fake with a writer-generated trace
standing in for the test recording, the JSON report, and never overwriting a file doctor did not write."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

import pooltrace.cli.record as cli_record
from pooltrace.cli.doctor import doctor
from tests.collector_fake import FakeWindows, PoolTag, doctor_trace, make_pe

CHECKS = ["elevation", "windows", "disk", "sessions", "test recording", "read-back", "pool events", "stacks",
          "stacks reach the kernel", "tag filter", "sidecar identities"]


@pytest.mark.skipif(sys.platform == "win32", reason="checks the non-Windows fence")
def test_doctor_off_windows_is_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(doctor, [])
    assert r.exit_code == 2 and r.output == "pooltrace: error: recording needs Windows; analysis commands work here\n"
    assert list(tmp_path.iterdir()) == []


def machine(tmp_path, **trace_kw) -> FakeWindows:
    trace, mods = doctor_trace(**trace_kw)
    files = {}
    for key in ("nt", "ntfs", "leaky"):
        m = mods[key]
        local = tmp_path / f"{key}.bin"
        local.write_bytes(make_pe(stamp=m.timedatestamp, image_size=m.size))
        files[key] = local
    win = {"nt": "c:\\windows\\system32\\ntoskrnl.exe", "ntfs": "c:\\windows\\system32\\drivers\\ntfs.sys",
           "leaky": "c:\\drivers\\leaky.sys"}
    return FakeWindows(trace_bytes=trace, pool_tags=[PoolTag(b"File", 900, 880, 0, 0, 0, 0)],
                       modules=[(mods[k].base, mods[k].size, mods[k].path) for k in ("nt", "ntfs", "leaky")],
                       files={win[k]: files[k] for k in win})


@pytest.fixture
def run_doctor(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    def run(fake, *args):
        monkeypatch.setattr(cli_record, "windows_api", lambda: fake)
        result = CliRunner().invoke(doctor, ["--seconds", "0.05", *args])
        report = work / "pooltrace-doctor.json"
        try:
            return result, json.loads(report.read_text())
        except (OSError, ValueError):
            return result, None

    return run


def lines(result) -> dict[str, str]:
    out = {}
    for line in result.output.splitlines()[:-1]:
        mark, rest = line.split("  ", 1)
        out[rest.split(":", 1)[0]] = mark
    return out


def test_a_healthy_machine_passes_every_check(tmp_path, run_doctor):
    fake = machine(tmp_path)
    result, report = run_doctor(fake)
    assert result.exit_code == 0, result.output
    assert lines(result) == dict.fromkeys(CHECKS, "pass")
    assert result.output.splitlines()[-1] == "all checks passed; wrote pooltrace-doctor.json"
    assert report["format"] == "pooltrace-doctor" and report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert checks["pool events"]["data"]["allocations"] == 40
    assert checks["stacks"]["data"]["share"] == 1.0
    assert checks["stacks reach the kernel"]["data"] == {"stacks": 1, "reach_ntoskrnl": 1, "reach_driver": 1,
                                                         "drivers": 2}
    assert checks["tag filter"]["data"]["tags"] == ["File"]
    assert checks["read-back"]["data"]["tag_filter"] == ["File"] and checks["read-back"]["data"]["stacks_enabled"]
    assert checks["sidecar identities"]["data"]["identities"] == 3
    # the test session: its own name, tag File, stopped; a provoking command ran; nothing left behind
    (start,) = [c for c in fake.calls if c.name == "StartTraceW"]
    assert start["name"] == "pooltrace-doctor" and fake.sessions == {}
    tags = [c for c in fake.calls if c.name == "NtSetSystemInformation" and c["data"][:4] == b"\n\0\0\0"]
    assert tags[0]["data"][16:20] == b"File"
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["pooltrace-doctor.json"]


def test_unfiltered_tags_and_missing_stacks_fail_their_checks(tmp_path, run_doctor):
    result, report = run_doctor(machine(tmp_path, tags=("File", "Irp "), stacks=False))
    assert result.exit_code == 1
    marks = lines(result)
    assert marks["tag filter"] == "FAIL" and marks["stacks"] == "FAIL" and marks["pool events"] == "pass"
    assert "tag filter: tags seen: File, Irp  — fix: the kernel did not filter by tag" in result.output
    assert result.output.splitlines()[-1] == "a check failed; wrote pooltrace-doctor.json"
    assert report["ok"] is False


def test_what_the_kernel_refused_is_in_the_read_back_line(tmp_path, run_doctor):
    fake = machine(tmp_path)
    fake.ignore_stack_guids = fake.ignore_native_stacks = True
    result, report = run_doctor(fake)
    assert result.exit_code == 1
    assert lines(result) == {"elevation": "pass", "windows": "pass", "disk": "pass", "sessions": "pass",
                             "test recording": "FAIL", "read-back": "FAIL"}
    assert "read-back: pool events on, stacks NOT on, tag filter on" in result.output
    assert {c["name"]: c for c in report["checks"]}["read-back"]["data"]["stack_hooks"] == []
    assert fake.sessions == {}


def test_not_elevated_skips_what_cannot_run(tmp_path, run_doctor):
    fake = machine(tmp_path)
    fake.admin = False
    result, _ = run_doctor(fake)
    assert result.exit_code == 1
    assert lines(result) == {"elevation": "FAIL", "windows": "pass", "disk": "pass", "sessions": "skip",
                             "test recording": "skip"}
    assert "elevation: not elevated — fix: run from an elevated prompt (Run as administrator)" in result.output
    assert "StartTraceW" not in fake.names()


def test_sessions_left_running_and_full_slots_are_reported(tmp_path, run_doctor):
    fake = machine(tmp_path)
    fake.running("pooltrace", mode=0x02000001)
    result, _ = run_doctor(fake)
    assert result.exit_code == 1 and "pooltrace sessions left running: pooltrace — fix: end them with " \
                                      "`pooltrace stop`" in result.output
    fake = machine(tmp_path)
    for i in range(6):
        fake.running(f"Tool{i}", handle=0x50 + i, mode=0x02000000)
    fake.running("NT Kernel Logger", handle=0xFFFF)
    result, _ = run_doctor(fake)
    assert lines(result)["sessions"] == "FAIL" and "0 of 6 system-logger slots free" in result.output
    assert lines(result)["test recording"] == "pass"  # the fake has no slot limit; the line says what to do


def test_old_windows_fails_the_windows_check(tmp_path, run_doctor):
    fake = machine(tmp_path)
    fake.version = (6, 1, 7601)
    result, _ = run_doctor(fake)
    assert result.exit_code == 1
    assert "FAIL  windows: recording needs Windows 8.1 or later, x64 (this is Windows 6.1.7601)" in result.output


def test_a_report_file_doctor_did_not_write_is_never_overwritten(tmp_path, run_doctor):
    precious = tmp_path / "work" / "pooltrace-doctor.json"
    precious.write_text("my notes")
    fake = machine(tmp_path)
    result, _ = run_doctor(fake)
    assert result.exit_code == 2 and precious.read_text() == "my notes"
    assert result.output == (f"pooltrace: error: {precious.name} exists and was not written by pooltrace doctor: "
                             "move it, or write the report elsewhere with -o\n")
    assert "StartTraceW" not in fake.names()
    precious.write_text(json.dumps({"format": "pooltrace-doctor", "version": 1}))  # an earlier report: replaced
    result, report = run_doctor(machine(tmp_path))
    assert result.exit_code == 0 and report["ok"] is True
