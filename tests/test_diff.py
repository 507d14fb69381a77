"""`pooltrace diff`: before/after the fix, a trace against itself, ASLR, normalization and the CI gate."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from pooltrace.compare import parse_threshold
from pooltrace.dataset import pair_trace
from pooltrace.errors import PooltraceError
from pooltrace.synthetic import _sites, classic_leak, kernel_modules
from tests.conftest import ROOT

TRACES = ROOT / "traces"


@pytest.fixture(scope="module")
def pair_of(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    pair_trace(TRACES / "sample-leak.etl", d / "base")
    pair_trace(TRACES / "sample-leak-fixed.etl", d / "new")
    truths = [json.loads((TRACES / f"{n}.truth.json").read_text()) for n in ("sample-leak", "sample-leak-fixed")]
    return d / "base", d / "new", truths


def diff(*args, code=0):
    result = CliRunner().invoke(cli, ["diff", *map(str, args)])
    assert result.exit_code == code, result.output
    return result


def site(name, shift):
    mods = kernel_modules(shift)
    m, rva = next((m, r) for m, r in _sites()[name]["frames"] if m != "nt")
    return f"{mods[m].name}+0x{rva:x}"


def test_fix_shrinks_the_leak_and_a_new_leak_appears(pair_of):
    base, new, (tb, tn) = pair_of
    data = json.loads(diff(base, new, "--by", "function", "--format", "json", "--no-symbols").output)
    groups = {g["frames"][0]: g for g in data["groups"]}
    leak = groups[site("leak", 0)]
    assert (leak["base_count"], leak["base_bytes"]) == (tb["truth"]["outstanding"]["leak"],
                                                        tb["truth"]["outstanding_bytes"]["leak"])
    assert (leak["new_count"], leak["new_bytes"]) == (tn["truth"]["outstanding"].get("leak", 0),
                                                      tn["truth"]["outstanding_bytes"].get("leak", 0))
    assert leak["status"] in ("gone", "shrunk") and leak["delta_bytes"] == leak["new_bytes"] - leak["base_bytes"]
    planted = groups[site("new_leak", 0x5600000)]
    assert planted["status"] == "new" and planted["base_count"] == 0
    assert (planted["new_count"], planted["new_bytes"]) == (tn["truth"]["outstanding"]["new_leak"],
                                                            tn["truth"]["outstanding_bytes"]["new_leak"])
    assert data["groups"][0]["frames"] == planted["frames"]  # biggest growth first
    totals = data["totals"]
    assert totals["base"]["outstanding_bytes"] == sum(tb["truth"]["outstanding_bytes"].values())
    assert totals["new"]["outstanding_bytes"] == sum(tn["truth"]["outstanding_bytes"].values())
    assert totals["tags"]["Lea2"]["new_bytes"] == planted["new_bytes"]
    text = diff(base, new, "--by", "function", "--no-symbols").output
    assert "new" in text and site("new_leak", 0x5600000) in text


def test_same_trace_is_all_same_and_passes_any_threshold(pair_of):
    base, _, _ = pair_of
    data = json.loads(diff(base, base, "--format", "json").output)
    assert data["groups"] and {g["status"] for g in data["groups"]} == {"same"}
    for threshold in ("0", "0%", "1"):
        r = diff(base, base, "--fail-on-growth", threshold, "--per-group")
        assert r.output.strip().splitlines()[-1].startswith("ok:")


def test_aslr_runs_match_every_group(tmp_path):
    for name, shift in (("a", 0), ("b", 0x3A00000)):
        w, _ = classic_leak(seed=9, shift=shift, scale=1)
        w.save(tmp_path / f"{name}.etl")
    data = json.loads(diff(tmp_path / "a.etl", tmp_path / "b.etl", "--format", "json", "--no-symbols").output)
    assert {g["status"] for g in data["groups"]} == {"same"}
    assert data["totals"]["delta_bytes"] == 0


def test_fail_on_growth_both_ways(pair_of):
    base, new, _ = pair_of
    # the fix: total outstanding shrinks -> passes; the new leak is a group that grew -> fails with --per-group
    diff(base, new, "--fail-on-growth", "1k", "--no-symbols")
    r = diff(base, new, "--fail-on-growth", "1k", "--per-group", "--by", "function", "--no-symbols", code=1)
    assert r.output.strip().splitlines()[-1].startswith("FAIL: group leaky.sys")
    # the other way round the leak comes back: total growth
    r = diff(new, base, "--fail-on-growth", "10%", "--no-symbols", code=1)
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("FAIL: outstanding bytes grew by") and "more than 10%" in last
    diff(new, base, "--fail-on-growth", "1MB", "--no-symbols")


def test_normalize(pair_of, tmp_path):
    base, new, (tb, _) = pair_of
    plain = json.loads(diff(base, new, "--format", "json", "--no-symbols").output)
    short, _ = classic_leak(seed=4, duration_s=5.0)  # a 5 s run against the 10 s BASE
    short.save(tmp_path / "short.etl")
    half = json.loads(diff(base, tmp_path / "short.etl", "--format", "json", "--normalize", "--no-symbols").output)
    assert half["normalize"] == "duration" and half["base_scale_ratio"] == pytest.approx(0.5, rel=1e-5)
    assert half["totals"]["base"]["outstanding_bytes"] == pytest.approx(
        plain["totals"]["base"]["outstanding_bytes"] * half["base_scale_ratio"], rel=1e-6)
    data = json.loads(diff(base, new, "--format", "json", "--normalize=allocs", "--no-symbols").output)
    b_allocs = sum(tb["truth"]["allocs"].values())
    n_allocs = sum(json.loads((TRACES / "sample-leak-fixed.truth.json").read_text())["truth"]["allocs"].values())
    assert data["base_scale_ratio"] == pytest.approx(n_allocs / b_allocs)
    assert data["totals"]["base"]["outstanding_bytes"] == pytest.approx(
        plain["totals"]["base"]["outstanding_bytes"] * n_allocs / b_allocs, rel=1e-6)


def test_formats(pair_of, tmp_path):
    base, new, _ = pair_of
    csv_out = diff(base, new, "--format", "csv", "--no-symbols").stdout.splitlines()
    assert csv_out[0].startswith("status,delta_bytes") and len(csv_out) > 3
    diff(base, new, "--format", "html", "-o", tmp_path / "d.html")
    page = (tmp_path / "d.html").read_text()
    assert '"diff":true' in page and "Differential flame graph" in page
    diff(base, new, "--format", "pprof", "-o", tmp_path / "d.pb.gz")
    assert (tmp_path / "d.pb.gz").read_bytes()[:2] == b"\x1f\x8b"


def test_thresholds():
    assert parse_threshold("64k") == (65536, False) and parse_threshold("10%") == (10, True)
    assert parse_threshold("1.5MB") == (1.5 * (1 << 20), False)
    with pytest.raises(PooltraceError):
        parse_threshold("lots")
    r = CliRunner().invoke(cli, ["diff", "a", "b", "--fail-on-growth", "lots"])
    assert r.exit_code == 2 and "give bytes" in r.output
