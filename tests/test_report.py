"""`pooltrace report`: the planted leak comes first with the exact figures, call-site splitting, window
semantics, filters and every output format."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from pooltrace.analysis import AIFI, AIFO, AOFI, AOFO, OUTSIDE, Window, lifetimes, parse_window
from pooltrace.cli import cli
from pooltrace.dataset import pair_trace
from pooltrace.datasetopen import NULL_NS
from pooltrace.errors import PooltraceError
from pooltrace.etl.writer import TraceWriter
from pooltrace.synthetic import NT_ALLOC, _sites, kernel_modules
from tests.conftest import ROOT
from tests.pprof_proto import read_profile

TRACES = ROOT / "traces"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    ds = tmp_path_factory.mktemp("r") / "sample.pooltrace"
    pair_trace(TRACES / "sample-leak.etl", ds)
    truth = json.loads((TRACES / "sample-leak.truth.json").read_text())
    return ds, truth


def run(*args):
    result = CliRunner().invoke(cli, ["report", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout  # notes (hidden rows, missing symbols) go to stderr


def site_text(site: str, shift=0) -> str:
    mods = kernel_modules(shift)
    m, rva = next((m, r) for m, r in _sites()[site]["frames"] if m not in ("nt",))
    return f"{mods[m].name}+0x{rva:x}"


def test_default_report_puts_the_leaking_call_site_first(sample):
    ds, truth = sample
    data = json.loads(run(ds, "--format", "json", "--no-symbols"))
    first = data["groups"][0]
    assert first["count"] == truth["truth"]["outstanding"]["leak"] == 500
    assert first["bytes"] == truth["truth"]["outstanding_bytes"]["leak"] == 128_000
    assert first["tags"] == {"Leak": 128_000}
    assert site_text("leak") in first["frames"]
    assert data["totals"]["outstanding_count"] == sum(truth["truth"]["outstanding"].values())
    assert data["totals"]["outstanding_bytes"] == sum(truth["truth"]["outstanding_bytes"].values())
    assert [g["bytes"] for g in data["groups"]] == sorted((g["bytes"] for g in data["groups"]), reverse=True)
    text = run(ds, "--no-symbols")
    assert "128,000" in text and site_text("leak") in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_by_function_splits_the_shared_tag(sample):
    ds, truth = sample
    data = json.loads(run(ds, "--format", "json", "--by", "function", "--tag", "Leak", "--no-symbols"))
    got = {g["frames"][0]: (g["count"], g["bytes"]) for g in data["groups"]}
    t = truth["truth"]
    assert got == {site_text("leak"): (t["outstanding"]["leak"], t["outstanding_bytes"]["leak"]),
                   site_text("leak_ok"): (t["outstanding"]["leak_ok"], t["outstanding_bytes"]["leak_ok"])}


def test_by_module_and_tag(sample):
    ds, truth = sample
    t = truth["truth"]
    mod = json.loads(run(ds, "--format", "json", "--by", "module", "--no-symbols"))
    assert mod["groups"][0]["frames"] == ["leaky.sys"]
    assert mod["groups"][0]["bytes"] == t["outstanding_bytes"]["leak"] + t["outstanding_bytes"]["leak_ok"]
    tag = json.loads(run(ds, "--format", "json", "--by", "tag"))
    by_tag = {g["frames"][0]: g["bytes"] for g in tag["groups"]}
    assert by_tag["Leak"] == t["outstanding_bytes"]["leak"] + t["outstanding_bytes"]["leak_ok"]
    assert by_tag["Gh05"] == t["outstanding_bytes"]["gh05"]


def test_filters(sample):
    ds, truth = sample
    t = truth["truth"]
    one = lambda *a: json.loads(run(ds, "--format", "json", "--no-symbols", *a))["totals"]  # noqa: E731
    leak_bytes = t["outstanding_bytes"]["leak"] + t["outstanding_bytes"]["leak_ok"]
    assert one("--tag", "Le?k")["outstanding_bytes"] == leak_bytes
    assert one("--tag", "Irp")["outstanding_count"] == t["outstanding"]["irp"]  # padded like a tag: "Irp "
    mmst_file = t["outstanding"]["mmst"] + t["outstanding"]["file"]
    assert one("--tag", "M*", "--tag", "Fil?")["outstanding_count"] == mmst_file
    assert one("--pool", "session")["outstanding_count"] == t["outstanding"]["gh05"]
    paged = t["outstanding"]["mmst"] + t["outstanding"]["ntfr"]
    assert one("--pool", "paged")["outstanding_count"] == paged
    assert one("--pid", "4242")["outstanding_count"] == sum(t["outstanding"][k] for k in ("leak", "leak_ok", "gh05"))
    assert one("--module", "LEAKY.SYS")["outstanding_count"] == t["outstanding"]["leak"] + t["outstanding"]["leak_ok"]
    groups = json.loads(run(ds, "--format", "json", "--no-symbols", "--min-bytes", "10000"))["groups"]
    assert groups and all(g["bytes"] >= 10000 for g in groups)
    assert len(json.loads(run(ds, "--format", "json", "--top", "2"))["groups"]) == 2


def test_list_blocks(sample):
    ds, truth = sample
    data = json.loads(run(ds, "--format", "json", "--list", "--tag", "Leak", "--no-symbols"))
    blocks = data["blocks"]
    assert len(blocks) == truth["truth"]["outstanding"]["leak"] + truth["truth"]["outstanding"]["leak_ok"]
    assert all(b["tag"] == "Leak" and b["age_ns"] > 0 and b["frames"] for b in blocks)
    assert len({b["address"] for b in blocks}) == len(blocks)
    assert "outstanding blocks" in run(ds, "--list", "--top", "1", "--no-symbols")


def test_csv_and_folded(sample):
    ds, _ = sample
    rows = list(csv.reader(io.StringIO(run(ds, "--format", "csv", "--no-symbols"))))
    assert rows[0][:4] == ["rank", "bytes", "count", "tags"] and rows[0][-1] == "frames" and rows[1][1] == "128000"
    assert rows[0][4:6] == ["class", "bytes_per_s"] and rows[1][4] == "leak"
    folded = run(ds, "--format", "folded", "--no-symbols").splitlines()
    stack, value = folded[0].rsplit(" ", 1)
    assert value == "128000" and stack.split(";")[-1] == f"ntoskrnl.exe+0x{NT_ALLOC[1]:x}"  # innermost last


def test_pprof_parses_as_profile_proto(sample, tmp_path):
    pytest.importorskip("google.protobuf")

    ds, _ = sample
    out = tmp_path / "r.pb.gz"
    CliRunner().invoke(cli, ["report", str(ds), "--format", "pprof", "-o", str(out), "--no-symbols"])
    p = read_profile(out.read_bytes())
    s = list(p.string_table)
    assert s[0] == "" and [(s[v.type], s[v.unit]) for v in p.sample_type] == [("inuse_objects", "count"),
                                                                              ("inuse_space", "bytes")]
    funcs = {f.id: s[f.name] for f in p.function}
    locs = {loc.id: funcs[loc.line[0].function_id] for loc in p.location}
    first = p.sample[0]
    assert list(first.value) == [500, 128000]
    assert locs[first.location_id[0]] == f"ntoskrnl.exe+0x{NT_ALLOC[1]:x}" and site_text("leak") in [
        locs[i] for i in first.location_id]
    assert s[p.default_sample_type] == "inuse_space"


def test_html_is_self_contained_and_escapes_trace_strings(tmp_path):
    w = TraceWriter(pointer_size=8, cpus=1)
    t = w.start_qpc + 10
    evil = "<img src=x onerror=alert(1)>.sys"
    w.image(0, t, 0x1403, 0xFFFFF80000000000, 0x10000, 0, "\\SystemRoot\\" + evil)
    w.process(0, t, 0x0303, 4, 0, "<script>alert(1)</script>.exe", "</script><b>x</b>")
    w.pool(0, t + 5, 0x0E20, 0, "<b>\x00", 64, 0xFFFFA00000001000, tid=8, pid=4)
    w.stack(0, t + 5, t + 5, 4, 8, [0xFFFFF80000000100, 0xFFFFF80000000200])
    w.save(tmp_path / "evil.etl")
    out = tmp_path / "r.html"
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "evil.etl"), "--format", "html", "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "<img" not in page and "<b>" not in page and "</script><b>" not in page
    assert "\\u003cimg src=x onerror=alert(1)\\u003e.sys+0x100" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert "<script src" not in page and "<link" not in page


def test_lifetime_classes():
    # window [100, 200): rows as (alloc, free)
    rows = {"alloc_ns": np.array([110, 110, NULL_NS, 50, 50, 250, 10], dtype=np.int64),
            "free_ns": np.array([150, 250, 150, 150, NULL_NS, NULL_NS, 90], dtype=np.int64)}
    got = lifetimes(rows, Window(100, 200)).tolist()
    assert got == [AIFI, AIFO, AOFI, AOFI, AOFO, OUTSIDE, OUTSIDE]


def test_lifetime_classes_in_steps_match_the_rules(monkeypatch):
    """lifetimes works STEP rows at a time: every row gets the class the definitions give it."""
    import pooltrace.analysis as analysis

    monkeypatch.setattr(analysis, "STEP", 7)
    rng = np.random.default_rng(2)
    a = np.where(rng.random(500) < 0.1, NULL_NS, rng.integers(0, 300, 500)).astype(np.int64)
    f = np.where(rng.random(500) < 0.3, NULL_NS, a + rng.integers(-20, 200, 500)).astype(np.int64)
    w = Window(100, 200)
    want = []
    for x, y in zip(a.tolist(), f.tolist(), strict=True):
        before, inside = x == NULL_NS or x < 100, 100 <= x < 200
        free_in, free_after = y != NULL_NS and 100 <= y < 200, y == NULL_NS or y >= 200
        want.append(AIFI if inside and free_in else AIFO if inside and free_after else
                    AOFI if before and free_in else AOFO if before and free_after else OUTSIDE)
    assert lifetimes({"alloc_ns": a, "free_ns": f}, w).tolist() == want
    assert len(set(want)) == 5


def test_window_changes_what_is_outstanding(tmp_path):
    w = TraceWriter(pointer_size=8, cpus=1)
    s = w.start_qpc
    sec = 10_000_000
    for i, (a, f) in enumerate([(1, 2), (1, 4), (3, None), (0.5, 5)]):  # seconds
        addr = 0xFFFFA00000000000 + 0x100 * i
        w.pool(0, s + int(a * sec), 0x0E20, 0, "Leak", 16 * (i + 1), addr)
        if f is not None:
            w.pool(0, s + int(f * sec), 0x0E22, 0, "Leak", 16 * (i + 1), addr)
    w.pool(0, s + 6 * sec, 0x0E20, 0, "Irp ", 8, 0xFFFFA00000009000)
    w.save(tmp_path / "w.etl")
    rep = lambda *a: json.loads(run(tmp_path / "w.etl", "--format", "json", "--tag", "Leak", *a))  # noqa: E731
    whole = rep()
    assert whole["totals"]["outstanding_count"] == 1  # only the block allocated at 3 s is never freed
    mid = rep("--window", "0.9:3.5")
    # in [0.9, 3.5): 1 s block freed at 2 s (AIFI), 1 s block freed at 4 s (AIFO: freed after the end),
    # 3 s block (AIFO), 0.5 s block allocated before the window (AOFO)
    assert mid["totals"]["outstanding_count"] == 2 and mid["totals"]["outstanding_bytes"] == 32 + 48
    lt = mid["totals"]["lifetimes"]
    assert (lt["AIFI"]["count"], lt["AIFO"]["count"], lt["AOFI"]["count"], lt["AOFO"]["count"]) == (1, 2, 0, 1)
    assert rep("--window", "1500000000ns:")["totals"]["lifetimes"]["AOFI"]["count"] == 3


def test_parse_window():
    assert parse_window("1.5:2s", 10) == Window(1_500_000_000, 2_000_000_000)
    assert parse_window(":500ms", 10**10).start_ns == 0
    assert parse_window("100ns:", 10**10) == Window(100, 10**10 + 1)
    for bad in ("5", "2:1", "x:"):
        with pytest.raises(PooltraceError):
            parse_window(bad, 10)


def test_report_on_a_trace_without_pool_events(samples, tmp_path):
    trace = tmp_path / "AMSITrace.etl"  # a copy: pairing on the fly writes its cache beside the trace, and
    trace.write_bytes((samples / "AMSITrace.etl").read_bytes())  # ../shared must stay as it was laid
    out = run(trace)
    assert "no pool allocations in this trace" in out
    assert (tmp_path / "AMSITrace.pooltrace" / "trace.json").is_file()


def test_bad_input_report(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "missing.etl")])
    assert result.exit_code == 2 and result.output.startswith("pooltrace: error:")
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a pooltrace dataset" in result.output


def test_tags_poolmon_view(sample):
    ds, truth = sample
    t = truth["truth"]
    result = CliRunner().invoke(cli, ["tags", str(ds), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["trace"]["source"].endswith("sample-leak.etl") and data["window"]["start_ns"] == 0
    rows = {(r["tag"], r["type"]): r for r in data["rows"]}
    irp = rows[("Irp ", "NonPagedNx")]
    assert irp["allocs"] == t["allocs"]["irp"]
    pre_trace_irp = t["free_without_alloc"] - len(t["pre_trace_big_frees"])  # the others are big Ntfr blocks
    assert irp["frees"] == t["frees"]["irp"] + pre_trace_irp  # lost frees are not free events
    assert irp["diff"] == irp["allocs"] - irp["frees"]
    assert irp["outstanding_count"] == t["outstanding"]["irp"] and irp["owners"] == ["Ntfs.sys"]
    leak = rows[("Leak", "NonPagedNx")]
    assert leak["outstanding_bytes"] == t["outstanding_bytes"]["leak"] + t["outstanding_bytes"]["leak_ok"]
    assert leak["owners"] == ["leaky.sys"]
    assert rows[("Gh05", "Session")]["outstanding_count"] == t["outstanding"]["gh05"]
    assert rows[("MmSt", "Paged")]["bytes_per_alloc"] == _sites()["mmst"]["size"]
    order = [r["outstanding_bytes"] for r in data["rows"]]
    assert order == sorted(order, reverse=True)
    lines = CliRunner().invoke(cli, ["tags", str(ds)]).stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("Tag"))
    assert lines[head + 2].startswith("Leak")


@pytest.mark.parametrize("width", [100, 80])
def test_tags_owner_column_never_breaks_a_module_name(sample, width):
    """At 100 columns the Owner column printed `win32kbase.sy` and `s` on the next line: owners wrap after
    ", " and a name wider than the column ends in an ellipsis."""
    ds, _ = sample
    names = {m for r in json.loads(CliRunner().invoke(cli, ["tags", str(ds), "--format", "json"]).output)["rows"]
             for m in r["owners"]}
    assert "win32kbase.sys" in names
    text = CliRunner().invoke(cli, ["tags", str(ds)], env={"COLUMNS": str(width)}).stdout
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("Tag"))
    cells = [line.rsplit("│", 1)[1].strip() for line in lines[head + 2:] if "│" in line]
    tokens = [t.rstrip(",") for c in cells if c for t in c.split(", ")]
    assert tokens
    for t in tokens:
        assert t in names or (t.endswith("…") and any(n.startswith(t[:-1]) for n in names)), (t, text)


def test_tags_with_pooltag_descriptions(sample):
    ds, _ = sample
    pooltag = ROOT / "tests" / "fixtures" / "symbols" / "pooltag.txt"
    rows = json.loads(CliRunner().invoke(cli, ["tags", str(ds), "--format", "json", "--pooltag", str(pooltag)]).output
                      )["rows"]
    desc = {r["tag"]: r["description"] for r in rows}
    assert desc["Leak"] == "leaky test driver, request buffers (leaky.sys)"
    assert "I/O request packets" in desc["Irp "]
    text = CliRunner().invoke(cli, ["tags", str(ds), "--pooltag", str(pooltag)]).output
    assert "leakytestdriver" in re.sub(r"[\s│┃]", "", text)  # the Owner column may wrap it


def test_by_function_with_symbols_names_the_functions(sample, shipped):
    """With the shipped fixture PDBs (found beside the trace) call sites become functions."""
    ds, truth = sample
    trace = shipped / "sample-leak.etl"
    data = json.loads(run(trace, "--format", "json", "--by", "function", "--tag", "Leak"))
    got = {g["frames"][0]: g["count"] for g in data["groups"]}
    t = truth["truth"]["outstanding"]
    assert got == {"leaky.sys!AllocateLeakyBuffer": t["leak"], "leaky.sys!AllocateScratchBuffer": t["leak_ok"]}
    stack = json.loads(run(trace, "--format", "json", "--top", "1"))["groups"][0]["frames"]
    assert stack[:3] == ["ntoskrnl.exe!ExAllocatePoolWithTag+0x4d", "leaky.sys!AllocateLeakyBuffer+0x22",
                         "leaky.sys!DispatchIoctl+0x2f"]


@pytest.mark.parametrize("small", [64, 4])
def test_stacks_rendered_together_read_as_one_by_one(shipped, monkeypatch, small):
    """FrameRenderer.prepare (all groups' stacks at once, symbol lookups batched) gives the texts, module
    rows and symbol status (modules in the order first asked) of rendering the stacks one at a time; also
    where the symbolizer looks a stack up vectorized (longer than SMALL_LOOKUP: modules in row order)."""
    import pooltrace.symbols
    from pooltrace import api
    from pooltrace.datasetopen import open_input
    from pooltrace.frames import FrameRenderer

    monkeypatch.setattr(pooltrace.symbols, "SMALL_LOOKUP", small)
    trace = shipped / "sample-leak.etl"
    ds = open_input(trace)
    probe = FrameRenderer(ds, None)
    top = [max(probe.stack(s)[1]) for s in range(len(ds.stacks))]
    sids = np.array(sorted(range(len(ds.stacks)), key=lambda s: -top[s]), dtype=np.int64)  # last modules first
    pids = np.zeros(len(sids), dtype=np.int64)
    ns = np.zeros(len(sids), dtype=np.int64)
    one = FrameRenderer(ds, api.make_symbolizer(ds, trace))
    every = [one.stack(int(s)) for s in sids]
    many = FrameRenderer(ds, api.make_symbolizer(ds, trace))
    many.prepare(sids, pids, ns)
    assert [many.stack(int(s)) for s in sids] == every
    assert many.sym.status() == one.sym.status() and len(one.sym.status()) > 1
    assert any("!" in t for texts, _ in every for t in texts) and many.rvas == one.rvas
