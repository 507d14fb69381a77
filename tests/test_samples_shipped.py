"""The shipped sample traces: reproducible byte for byte from traces/generate.py, and what `info` reads
from them is what the generator planted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from tests.conftest import ROOT

TRACES = ROOT / "traces"


def test_generate_check_reproduces_the_committed_files():
    result = subprocess.run([sys.executable, str(TRACES / "generate.py"), "--check"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("identical") == 3


@pytest.mark.parametrize("name", ["sample-leak", "sample-leak-fixed"])
def test_info_counts_match_the_ground_truth(name):
    truth = json.loads((TRACES / f"{name}.truth.json").read_text())["truth"]
    result = CliRunner().invoke(cli, ["info", "--format", "json", str(TRACES / f"{name}.etl")])
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    ev = d["events"]
    assert ev["pool_alloc"] + ev["pool_alloc_session"] == sum(truth["allocs"].values())
    assert ev["pool_alloc_session"] == truth["allocs"]["gh05"]
    assert ev["pool_free"] + ev["pool_free_session"] == sum(truth["frees"].values()) + truth["free_without_alloc"]
    assert d["lost"]["events_lost"] == truth["lost_free"]
    assert ev["stacks"] == truth["stacks"] and d["records"] == truth["records"]
    assert d["pool"]["tracing_enabled"] is True and d["pool"]["stack_ratio"] == 1.0
    assert d["verdict"].startswith("pool events with stacks")
    # the last record is the 6th image rundown (DCEnd), 100 + 5 QPC ticks of 100 ns after the 10 s scenario
    assert d["duration_ns"] == 10_000_000_000 + 105 * 100
