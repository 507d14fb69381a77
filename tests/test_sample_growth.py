"""The shipped growth sample (traces/sample-growth.etl): every planted call site gets exactly its planted
growth class, and "likely leaks" lists the two leaks first although the caches hold far more bytes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from pooltrace.synthetic import kernel_modules
from tests.conftest import ROOT

TRACE = ROOT / "traces" / "sample-growth.etl"
TRUTH = json.loads((ROOT / "traces" / "sample-growth.truth.json").read_text())["truth"]


@pytest.fixture(scope="module", autouse=True)
def private_trace(shipped):
    """report pairs the .etl into a cache beside it: use the session's copy, never the source tree."""
    global TRACE
    TRACE = shipped / "sample-growth.etl"


def report(*args) -> str:
    r = CliRunner().invoke(cli, ["report", str(TRACE), *args])
    assert r.exit_code == 0, r.output
    return r.output


def planted_frames() -> dict[tuple[str, ...], str]:
    mods = kernel_modules(0)
    return {tuple(f"{mods[m].name}+0x{rva:x}" for m, rva in t["frames"]): site for site, t in TRUTH.items()}


@pytest.fixture(scope="module")
def by_stack():
    return json.loads(report("--format", "json", "--no-symbols"))


def test_every_planted_site_gets_its_class(by_stack):
    planted = planted_frames()
    got = {planted[tuple(g["frames"])]: g for g in by_stack["groups"]}
    assert {s: g["growth"]["class"] for s, g in got.items()} == {s: t["class"] for s, t in TRUTH.items()}
    for site, g in got.items():
        assert (g["count"], g["bytes"]) == (TRUTH[site]["outstanding"], TRUTH[site]["outstanding_bytes"])
        assert g["growth"]["series"]["bytes"][-1] == g["bytes"]


def test_likely_leaks_come_first_although_the_caches_are_bigger(by_stack):
    planted = planted_frames()
    leaks = [planted[tuple(g["frames"])] for g in by_stack["likely_leaks"]]
    assert leaks == ["leak", "slow_leak"]
    assert planted[tuple(by_stack["groups"][0]["frames"])] == "cache"  # the biggest by bytes is the cache
    assert TRUTH["cache"]["outstanding_bytes"] > TRUTH["big_cache"]["outstanding_bytes"] > \
        TRUTH["leak"]["outstanding_bytes"] > TRUTH["slow_leak"]["outstanding_bytes"]
    grown = json.loads(report("--format", "json", "--no-symbols", "--sort", "growth"))
    assert [planted[tuple(g["frames"])] for g in grown["groups"][:2]] == ["leak", "slow_leak"]


def test_text_report_with_symbols_names_the_leaks_on_top():
    text = report("--by", "function")
    head = text.split("likely leaks", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert "leaky.sys!AllocateLeakyBuffer" in head[0] and head[0].split()[0] == "leak"
    assert f"Ntfs.sys+0x{TRUTH['slow_leak']['frames'][3][1]:x}" in head[1]
    assert text.index("likely leaks") < text.index("trend")


def test_by_tag_the_slow_leak_hides_under_its_cache():
    data = json.loads(report("--by", "tag", "--format", "json", "--no-symbols"))
    file = next(g for g in data["groups"] if g["frames"] == ["File"])
    assert file["growth"]["class"] == "plateau"
    assert file["count"] == TRUTH["big_cache"]["outstanding"] + TRUTH["slow_leak"]["outstanding"]


def test_a_window_inside_the_trace_counts_only_its_own_allocations():
    data = json.loads(report("--window", "20:60", "--format", "json", "--no-symbols", "--by", "tag"))
    t = data["growth"]["times_ns"]
    assert 20e9 < t[0] < t[-1] <= data["window"]["end_ns"]
    for g in data["groups"]:
        assert g["growth"]["series"]["bytes"][-1] == g["bytes"] and g["growth"]["series"]["blocks"][-1] == g["count"]
    leak = next(g for g in data["groups"] if g["frames"] == ["Leak"])
    assert leak["growth"]["class"] == "leak"
