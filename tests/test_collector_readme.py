"""The README's "Recording on Windows" examples, run where they can run on Linux (record, stop and doctor:
exit 2 with one line; profile, info and report: for real on a shipped sample), the record output shown
there against what the recorder prints through the fake, and the Windows workflow's own commands."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import pooltrace.cli.record as cli_record
from pooltrace.cli import cli
from pooltrace.collector.config import constants
from tests.collector_fake import FakeWindows, doctor_trace
from tests.conftest import ROOT

NOT_WINDOWS = "pooltrace: error: recording needs Windows; analysis commands work here\n"
SECTION = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("## Recording on Windows", 1)[1]
SECTION = SECTION.split("\n## ", 1)[0]
BLOCKS = re.findall(r"```\n(.*?)```", SECTION, flags=re.S)
COMMANDS = [line[2:] for block in BLOCKS for line in block.splitlines() if line.startswith("> pooltrace ")]
WORKFLOW = ROOT.joinpath(".github", "workflows", "windows.yml").read_text(encoding="utf-8")


def test_the_section_shows_every_recording_command():
    assert {shlex.split(c)[1] for c in COMMANDS} == {"doctor", "record", "stop", "profile", "info", "report"}


@pytest.mark.skipif(sys.platform == "win32", reason="the non-Windows answer")
@pytest.mark.parametrize("command", [c for c in COMMANDS if shlex.split(c)[1] in ("record", "stop", "doctor")])
def test_windows_only_examples_exit_2_with_one_line_here(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, shlex.split(command)[1:])
    assert r.exit_code == 2 and r.output == NOT_WINDOWS
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [c for c in COMMANDS if shlex.split(c)[1] in ("profile", "info", "report")])
def test_analysis_examples_run_on_a_shipped_sample(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "traces" / "sample-leak.etl", tmp_path / "leak.etl")
    r = CliRunner().invoke(cli, shlex.split(command)[1:])
    assert r.exit_code == 0, r.output


def test_the_record_output_shown_is_what_the_recorder_prints(tmp_path, monkeypatch):
    block = next(b for b in BLOCKS if "> pooltrace record" in b)
    shown = [line for line in block.splitlines() if line.startswith(("wrote ", "the command", "next: "))]
    monkeypatch.chdir(tmp_path)
    fake = FakeWindows()
    monkeypatch.setattr(cli_record, "windows_api", lambda: fake)
    r = CliRunner().invoke(cli, ["record", "-o", "leak.etl", "--tag", "Leak", "-q", "--", sys.executable, "-c",
                                 "pass"])
    assert r.exit_code == 0, r.output

    def shape(line: str) -> str:
        line = line.replace(str(tmp_path) + "/", "")
        return re.sub(r"\d[\d.,:]*( (bytes|KB|MB|GB))?", "N", line)

    assert [shape(line) for line in r.output.splitlines()] == [shape(line) for line in shown]


# --- the Windows workflow --------------------------------------------------------------------------------------
def test_the_workflow_records_the_doctor_tag_with_the_provoking_command(tmp_path):
    tag = constants()["doctor"]["tag"]
    (record,) = [line for line in WORKFLOW.splitlines() if "pooltrace record" in line]
    assert f"--tag {tag} " in record and "-- python -m pooltrace.collector.provoke" in record
    assert "pooltrace doctor" in WORKFLOW and "python -m pytest" in WORKFLOW
    out = subprocess.run([sys.executable, "-m", "pooltrace.collector.provoke", str(tmp_path), "0.05"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and list(tmp_path.iterdir()) == []  # it cleans up after itself


@pytest.mark.parametrize(("stacks", "passes"), [(True, True), (False, False)])
def test_the_workflow_verdict_check_passes_only_pool_events_with_stacks(tmp_path, stacks, passes):
    (check,) = re.findall(r'python -c "(.*?)" "\$RUNNER_TEMP/ci-info.json"', WORKFLOW)
    trace = tmp_path / "ci.etl"
    trace.write_bytes(doctor_trace(stacks=stacks)[0])
    info = CliRunner().invoke(cli, ["info", str(trace), "--format", "json"])
    assert info.exit_code == 0
    (tmp_path / "ci-info.json").write_text(info.output)
    assert json.loads(info.output)["verdict"].startswith("pool events with") is True
    out = subprocess.run([sys.executable, "-c", check, str(tmp_path / "ci-info.json")], capture_output=True,
                         text=True, timeout=60)
    assert (out.returncode == 0) is passes, out.stderr
