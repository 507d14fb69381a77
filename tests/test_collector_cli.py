"""`pooltrace record`, `stop` and `profile` as users run them: the Linux fence, import hygiene, the CLI
against the recording fake, and the WPR profile validated against WPR's documented structure."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

import click
import pytest
from click.testing import CliRunner

import pooltrace.cli.record as cli_record
from pooltrace.cli.record import profile, record, stop
from tests.collector_fake import FakeWindows, PoolTag, make_pe
from tests.conftest import ROOT

NOT_WINDOWS = "pooltrace: error: recording needs Windows; analysis commands work here\n"
linux_only = pytest.mark.skipif(sys.platform == "win32", reason="checks the non-Windows fence")


@linux_only
@pytest.mark.parametrize("args", [[], ["-o", "x.etl"], ["-o", "x.etl", "--tag", "A", "--tag", "B", "--tag", "C",
                                                          "--tag", "D", "--tag", "E"], ["--", "repro.exe"]])
def test_record_off_windows_is_one_line_and_exit_2(args, tmp_path):
    result = CliRunner().invoke(record, args)
    assert result.exit_code == 2 and result.output == NOT_WINDOWS
    assert not (tmp_path / "x.etl").exists()


@linux_only
def test_stop_off_windows_is_one_line_and_exit_2():
    for args in ([], ["--kernel-logger"]):
        result = CliRunner().invoke(stop, args)
        assert result.exit_code == 2 and result.output == NOT_WINDOWS


@linux_only
def test_importing_pooltrace_never_touches_windows_modules():
    """In a fresh interpreter with tripwires on ctypes' Windows loaders: import everything, run the fenced
    commands and profile; nothing may load pywintrace (module etw) or the boundary module."""
    code = r"""
import ctypes, sys
touched = []
class Tripwire:
    def __getattr__(self, name):
        touched.append(name)
        raise AttributeError(name)
    def __call__(self, *a, **k):
        touched.append("call")
        raise OSError("tripwire")
for attr in ("windll", "oledll", "WinDLL", "OleDLL"):
    setattr(ctypes, attr, Tripwire())
import pooltrace, pooltrace.cli, pooltrace.collector, pooltrace.cli.record, pooltrace.collector.recorder
import pooltrace.collector.wprp, pooltrace.collector.structs, pooltrace.sidecar, pooltrace.collector.stop
from click.testing import CliRunner
from pooltrace.cli.record import record, stop, profile
assert CliRunner().invoke(record, ["-o", "x.etl"]).exit_code == 2
assert CliRunner().invoke(stop, []).exit_code == 2
assert CliRunner().invoke(profile, ["--tag", "Leak"]).exit_code == 0
bad = [m for m in sys.modules if m == "etw" or m.startswith("etw.") or m == "winreg"
       or m == "pooltrace.collector.winapi"]
assert not bad, bad
assert not touched, touched
print("clean")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "clean", out.stderr


LIGHT = r"""
import importlib.abc, pathlib, sys, types
HEAVY = ("pyarrow", "numpy", "pandas", "pooltrace.etl", "pooltrace.analysis",
         "pooltrace.reporters", "pooltrace.dataset", "pooltrace.traceinfo")
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == h or name.startswith(h + ".") for h in HEAVY):
            raise ImportError(f"the record start path imported {name}")
sys.meta_path.insert(0, Refuse())
import pooltrace
cli = types.ModuleType("pooltrace.cli")  # the package without its __init__ (which loads every command)
cli.__path__ = [str(pathlib.Path(pooltrace.__file__).parent / "cli")]
sys.modules["pooltrace.cli"] = cli
for name in ("plan", "start", "configure", "snapshot", "stop", "recorder", "messages", "boundary", "drivers"):
    __import__("pooltrace.collector." + name)
from click.testing import CliRunner
from pooltrace.cli.record import record, stop
for cmd in (record, stop):
    assert CliRunner().invoke(cmd, ["--help"]).exit_code == 0
print("light")
"""


def test_the_record_start_path_imports_no_data_or_report_stack():
    """The recorder's own import chain (and `record --help`) loads neither pyarrow nor numpy nor the report
    stack; only the stop-time trace read does (lazily)."""
    out = subprocess.run([sys.executable, "-c", LIGHT], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "light", out.stderr


def test_commands_are_click_objects_with_help():
    for cmd, name in ((record, "record"), (stop, "stop"), (profile, "profile")):
        assert isinstance(cmd, click.Command) and cmd.name == name
        result = CliRunner().invoke(cmd, ["--help"])
        assert result.exit_code == 0 and "Usage:" in result.output
    text = CliRunner().invoke(record, ["--help"]).output
    for option in ("--tag", "--free-stacks", "--duration", "--circular", "--max-size", "--kernel-logger",
                   "-- COMMAND"):
        assert option in text


@pytest.fixture
def windows(monkeypatch, tmp_path):
    """Pretend to be on Windows: the CLI gets the recording fake instead of the real boundary."""
    (tmp_path / "leaky.sys").write_bytes(make_pe())
    fake = FakeWindows(pool_tags=[PoolTag(b"Leak", 3, 1, 128)],
                       modules=[(0xFFFFF80412000000, 0x8000, "\\??\\C:\\drivers\\leaky.sys")],
                       files={"c:\\drivers\\leaky.sys": tmp_path / "leaky.sys"})
    monkeypatch.setattr(cli_record, "windows_api", lambda: fake)
    return fake


def test_record_through_the_cli(windows, tmp_path):
    out = tmp_path / "leak.etl"
    result = CliRunner().invoke(record, ["-o", str(out), "--tag", "Leak", "--duration", "0.02", "-q"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    size = f"{len(windows.trace_bytes) / 1024:.1f} KB"
    assert lines[0].startswith(f"wrote {out}: {size} in 0:00:00 (stopped by --duration); events lost 0, "
                               "buffers lost 0")
    assert lines[1] == (f"wrote {out}.pooltrace.json: 1 driver with a PDB identity; pool tag counters at start and "
                        "stop for Leak")
    assert lines[-1] == f"next: pooltrace info {out}; pooltrace pair {out}"
    assert out.exists() and windows.sessions == {}


def test_record_a_command_through_the_cli(windows, tmp_path):
    out = tmp_path / "leak.etl"
    result = CliRunner().invoke(record, ["-o", str(out), "--", sys.executable, "-c", "import sys; sys.exit(4)"])
    assert result.exit_code == 0, result.output
    assert "(stopped by the command exiting)" in result.output
    assert "the command exited with code 4" in result.output


def test_record_cli_errors(windows, tmp_path):
    runner = CliRunner()
    r = runner.invoke(record, [])
    assert r.exit_code == 2 and r.output == "pooltrace: error: -o OUT.etl is required\n"
    r = runner.invoke(record, ["-o", str(tmp_path / "x.etl")] + [a for t in "ABCDE" for a in ("--tag", t)])
    assert r.exit_code == 2 and "at most 4 pool tags" in r.output and "analysis time" in r.output
    assert "StartTraceW" not in windows.names()
    windows.fail[("TraceSetInformation", 4)] = KeyboardInterrupt
    r = runner.invoke(record, ["-o", str(tmp_path / "x.etl")])
    assert r.exit_code == 2
    assert r.output == "pooltrace: error: interrupted before the recording started; nothing was written\n"
    assert windows.sessions == {}


def test_leftover_session_and_platform_floor_through_the_cli(windows, tmp_path):
    windows.running("pooltrace", mode=0x02000001)
    r = CliRunner().invoke(record, ["-o", str(tmp_path / "x.etl"), "--duration", "0.02"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "`pooltrace stop`, or pass --force" in r.output
    r = CliRunner().invoke(record, ["-o", str(tmp_path / "x.etl"), "--duration", "0.02", "--force", "-q"])
    assert r.exit_code == 0 and r.output.startswith("warning: stopped a leftover pooltrace session")
    assert windows.sessions == {}
    windows.version = (6, 1, 7601)
    r = CliRunner().invoke(record, ["-o", str(tmp_path / "y.etl")])
    assert r.exit_code == 2 and r.output == ("pooltrace: error: recording needs Windows 8.1 or later, x64 (this is "
                                             "Windows 6.1.7601)\n")
    assert "--max-size" in CliRunner().invoke(record, ["--help"]).output
    assert "default: 4096" in " ".join(CliRunner().invoke(record, ["--help"]).output.split())


def test_stop_through_the_cli(windows, tmp_path):
    partial = tmp_path / "old.etl.partial"
    partial.write_bytes(b"x")
    windows.running("pooltrace", log_file=str(partial))
    r = CliRunner().invoke(stop, [])
    assert r.exit_code == 0
    assert r.output == (f"stopped pooltrace: events lost 0, buffers lost 0\ntrace: {tmp_path / 'old.etl'} "
                        "(without sidecar: no driver PDB identities, no tag baseline)\n")
    r = CliRunner().invoke(stop, [])
    assert r.exit_code == 2 and r.output == "pooltrace: error: no pooltrace session is running\n"


# --- the WPR profile ---------------------------------------------------------------------------------------
def parse_profile(text: str) -> ET.Element:
    root = ET.fromstring(text)
    assert root.tag == "WindowsPerformanceRecorder" and root.get("Version") == "1.0"
    (profiles,) = list(root)
    assert profiles.tag == "Profiles"
    kinds = [e.tag for e in profiles]
    # WPR: collectors, then system providers, then profiles
    assert kinds == sorted(kinds, key=["SystemCollector", "SystemProvider", "Profile"].index)
    collectors = profiles.findall("SystemCollector")
    providers = profiles.findall("SystemProvider")
    assert len(collectors) == 1 and len(providers) == 1
    c = collectors[0]
    assert c.get("Id") and c.get("Name")
    assert int(c.find("BufferSize").get("Value")) > 0 and int(c.find("Buffers").get("Value")) > 0
    p = providers[0]
    assert p.get("Id") and ":" not in p.get("Id") and " " not in p.get("Id")
    assert [e.tag for e in p] in (["Keywords", "Stacks"], ["Keywords", "Stacks", "PoolTags"])
    names = set()
    modes = set()
    for prof in profiles.findall("Profile"):
        name, level, mode = prof.get("Name"), prof.get("DetailLevel"), prof.get("LoggingMode")
        assert prof.get("Id") == f"{name}.{level}.{mode}" and prof.get("Description")
        assert level in ("Verbose", "Light") and mode in ("File", "Memory")
        names.add(name)
        modes.add(mode)
        if prof.get("Base") is None:
            sc = prof.find("Collectors/SystemCollectorId")
            assert sc.get("Value") == c.get("Id")
            assert sc.find("SystemProviderId").get("Value") == p.get("Id")
        else:
            assert profiles.find(f"Profile[@Id='{prof.get('Base')}']") is not None
    assert names == {"pooltrace"} and modes == {"File", "Memory"}  # every profile in both logging modes
    return root


def test_profile_default():
    r = CliRunner().invoke(profile, [])
    assert r.exit_code == 0
    root = parse_profile(r.output)
    p = root.find("Profiles/SystemProvider")
    assert [k.get("Value") for k in p.findall("Keywords/Keyword")] == ["ProcessThread", "Loader", "Pool"]
    assert [s.get("Value") for s in p.findall("Stacks/Stack")] == ["PoolAllocation", "PoolAllocationSession"]
    assert p.find("PoolTags") is None


def test_profile_with_tags_and_free_stacks(tmp_path):
    out = tmp_path / "pool.wprp"
    r = CliRunner().invoke(profile, ["-o", str(out), "--tag", "Leak", "--tag", "Ab", "--tag", "Mm*",
                                     "--free-stacks"])
    assert r.exit_code == 0 and f"wpr -start {out}!pooltrace -filemode" in r.output
    root = parse_profile(out.read_text(encoding="utf-8"))
    p = root.find("Profiles/SystemProvider")
    assert [s.get("Value") for s in p.findall("Stacks/Stack")] == ["PoolAllocation", "PoolAllocationSession",
                                                                     "PoolFree", "PoolFreeSession"]
    tags = p.find("PoolTags")
    assert tags.get("Operation") == "Set"
    values = [t.get("Value") for t in tags.findall("PoolTag")]
    assert values == ["Leak", "Ab  ", "Mm*"] and all(1 <= len(v) <= 4 for v in values)


def test_profile_never_replaces_a_file_it_did_not_write(tmp_path):
    trace = tmp_path / "t.etl"
    trace.write_bytes(b"\x00" * 64 + b"a trace")
    for target in (trace, tmp_path / "notes.txt"):
        target.write_bytes(target.read_bytes() if target.exists() else b"keep me")
        before = target.read_bytes()
        r = CliRunner().invoke(profile, ["-o", str(target), "--tag", "Leak"])
        assert r.exit_code == 2 and "not a profile written by pooltrace" in r.output
        assert target.read_bytes() == before
    out = tmp_path / "pool.wprp"  # its own profile is replaced (a new tag), atomically
    assert CliRunner().invoke(profile, ["-o", str(out), "--tag", "Leak"]).exit_code == 0
    assert CliRunner().invoke(profile, ["-o", str(out), "--tag", "Mm*"]).exit_code == 0
    assert "Mm*" in out.read_text(encoding="utf-8") and "Leak" not in out.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    r = CliRunner().invoke(profile, ["-o", str(tmp_path / "missing" / "p.wprp")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1


def test_profile_rejects_what_wpr_cannot_take():
    r = CliRunner().invoke(profile, [a for t in "ABCDE" for a in ("--tag", t)])
    assert r.exit_code == 2 and "at most 4 pool tags" in r.output
    r = CliRunner().invoke(profile, ["--tag", "\\x01ab"])
    assert r.exit_code == 2 and "a WPR profile cannot express" in r.output


def test_committed_profile_is_what_pooltrace_profile_writes():
    r = CliRunner().invoke(profile, [])
    committed = (ROOT / "providers" / "pooltrace.wprp").read_text(encoding="utf-8")
    assert committed == r.output, "regenerate with: pooltrace profile -o providers/pooltrace.wprp"
