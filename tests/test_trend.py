"""`pooltrace trend`: a generated series of runs with a leak planted in run 3 and fixed in run 6, the status
rules, every output format (HTML in a real headless browser), the CI gate and the wrong inputs."""

from __future__ import annotations

import csv
import io
import json

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import pooltrace
from pooltrace.cli import cli
from pooltrace.synthetic import _sites
from pooltrace.synthetic import classic_leak as scenario
from pooltrace.trends import classify

RUNS = 7
LEAK_FROM, FIXED_IN = 3, 6
NEW_LEAK = f"leaky.sys+0x{_sites()['new_leak']['frames'][1][1]:x}"  # its call site, module-relative
OLD_LEAK = f"leaky.sys+0x{_sites()['leak']['frames'][1][1]:x}"


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Seven runs of the classic scenario (other seeds, other ASLR layouts); the second leak is planted
    in runs 3 to 5 only. Returns the traces and each run's ground truth."""
    d = tmp_path_factory.mktemp("series")
    paths, truths = [], []
    for k in range(1, RUNS + 1):
        w, truth = scenario(seed=100 + k, shift=k * 0x200000, new_leak=LEAK_FROM <= k < FIXED_IN)
        w.save(d / f"build{k}.etl")
        paths.append(d / f"build{k}.etl")
        truths.append(truth)
    return paths, truths


def trend(*args, code=0, columns=None):
    r = CliRunner().invoke(cli, ["trend", *map(str, args)], env={"COLUMNS": str(columns) if columns else None})
    assert r.exit_code == code, r.output
    return r


def group(data: dict, site: str) -> dict:
    return next(g for g in data["groups"] if g["frames"] == [site])


def test_planted_appearance_and_fix_are_reported_exactly(series):
    paths, truths = series
    data = json.loads(trend(*paths, "--by", "function", "--no-symbols", "--format", "json").stdout)
    leak = group(data, NEW_LEAK)
    assert leak["status"] == f"fixed in run {FIXED_IN}" and leak["first_run"] == LEAK_FROM
    assert leak["bytes"] == [t.outstanding_bytes["new_leak"] for t in truths]
    assert leak["count"] == [t.outstanding["new_leak"] for t in truths]
    assert [b > 0 for b in leak["bytes"]] == [LEAK_FROM <= k < FIXED_IN for k in range(1, RUNS + 1)]
    old = group(data, OLD_LEAK)  # the classic leak: 500 blocks never freed in every run
    assert old["status"] == "stable" and old["bytes"] == [t.outstanding_bytes["leak"] for t in truths]
    assert [r["outstanding_bytes"] for r in data["runs"]] == [sum(t.outstanding_bytes.values()) for t in truths]
    assert [r["name"] for r in data["runs"]] == [p.name for p in paths]
    # up to run 5 the planted leak is new in run 3
    data5 = json.loads(trend(*paths[:5], "--by", "function", "--no-symbols", "--format", "json").stdout)
    assert group(data5, NEW_LEAK)["status"] == f"new in run {LEAK_FROM}"
    # the API gives the same table
    df = pooltrace.trend(*paths, by="function", no_symbols=True)
    row = df[df["frames"].map(lambda f: list(f) == [NEW_LEAK])].iloc[0]
    assert row["status"] == f"fixed in run {FIXED_IN}" and row["first_run"] == LEAK_FROM
    assert [row[f"bytes_{k}"] for k in range(1, RUNS + 1)] == leak["bytes"]
    assert len(df) == len(data["groups"]) and str(df["bytes_1"].dtype) == "int64"


def test_by_stack_matches_across_boots(series):
    paths, _ = series
    data = json.loads(trend(*paths, "--no-symbols", "--format", "json").stdout)
    leak = [g for g in data["groups"] if g["frames"][1:2] == [NEW_LEAK]]
    assert len(leak) == 1 and leak[0]["status"] == f"fixed in run {FIXED_IN}"


@pytest.mark.parametrize(("values", "want"), [
    ([100, 100, 100], ("stable", None)),
    ([100, 95, 104, 98], ("stable", None)),  # noise within the tolerance
    ([100, 100, 150, 200, 300], ("growing", 3)),
    ([100, 300, 50, 80, 120], ("growing", 4)),  # grew, dropped, grows again from run 4
    ([100, 300, 200], ("shrunk", 3)),  # a third below its peak
    ([100, 300, 280], ("stable", None)),  # within the tolerance of its peak
    ([128_000, 2_048], ("shrunk", 2)),  # two runs: one step down
    ([384, 480], ("growing", 2)),  # two runs: one step up
    ([384, 400], ("stable", None)),  # two runs: within the tolerance
    ([0, 400], ("new", 2)),
    ([100, 50, 95, 50], ("shrunk", 4)),  # below the peak again only from run 4
    ([100, 95, 90, 85, 80], ("shrunk", 4)),  # small steps: more than 10 % below the peak from run 4
    ([100, 1000, 10, 20, 40], ("growing", 4)),  # growing again wins over far below its peak
    ([180, 199, 180, 199, 180], ("stable", None)),  # up, flat, up, flat: back where it started
    ([100, 200], ("growing", 2)),
    ([0, 0, 10, 10], ("new", 3)),
    ([10, 0, 10], ("new", 3)),  # came back
    ([0, 10, 10, 0, 0], ("fixed", 4)),
    ([10, 0], ("fixed", 2)),
])
def test_status_rules(values, want):
    assert classify(values, 0.10) == want


def test_text_csv_and_gate(series):
    paths, truths = series
    out = trend(*paths, "--by", "function", "--no-symbols", columns=160).stdout
    line = next(x for x in out.splitlines() if NEW_LEAK in x)
    assert f"fixed in run {FIXED_IN}" in line and f"{truths[2].outstanding_bytes['new_leak']:,}" in line
    rows = list(csv.DictReader(io.StringIO(trend(*paths, "--by", "function", "--no-symbols", "--format",
                                                 "csv").stdout)))
    row = next(r for r in rows if r["frames"] == NEW_LEAK)
    assert row["status"] == f"fixed in run {FIXED_IN}"
    assert int(row["bytes_3"]) == truths[2].outstanding_bytes["new_leak"]
    # gate on the driver's tags: the leak makes run 4 grow against run 1 by its bytes; run 7 does not
    planted = truths[3].outstanding_bytes["new_leak"]
    limit = str(planted // 2)
    gate = ["--by", "function", "--no-symbols", "--tag", "Lea?", "--fail-on-growth", limit]
    r = trend(*paths[:4], *gate, code=1)
    assert r.stderr.splitlines()[-1].startswith("FAIL: run 4 (build4.etl) against run 1 (build1.etl)")
    r = trend(*paths, *gate, code=0)
    assert r.stderr.splitlines()[-1].startswith("ok: ")
    r = trend(*paths[:4], *gate, "--per-group", code=1)
    assert "FAIL: " in r.stderr
    # against the best run: the run with the fewest outstanding bytes
    total = [sum(t.outstanding_bytes.values()) for t in truths]
    best = min(range(RUNS - 1), key=lambda k: (total[k], k))
    r = trend(*paths, "--no-symbols", "--fail-on-growth", "1", "--against", "best",
              code=1 if total[-1] > total[best] + 1 else 0)
    if total[-1] > total[best] + 1:
        assert f"against run {best + 1} " in r.stderr


@pytest.mark.parametrize("columns", [60, 80, 100, 200])
def test_text_uses_the_terminal_width(series, columns):
    """QA: trend text was laid out for 120 columns whatever the terminal. Now COLUMNS (the terminal's width,
    100 when piped) as the other commands: a table when it fits, else a block per group (status and call
    site, then the bytes per run); never a line wider than the terminal, never a call site cut."""
    paths, truths = series
    out = trend(*paths, "--by", "function", "--no-symbols", columns=columns).stdout
    lines = out.splitlines()
    assert all(len(x) <= columns and x == x.rstrip() for x in lines), max(lines, key=len)
    at = next(k for k, x in enumerate(lines) if NEW_LEAK in x)
    assert f"fixed in run {FIXED_IN}" in lines[at]
    planted = f"{truths[2].outstanding_bytes['new_leak']:,}"
    if columns >= 160:
        assert "call site" not in out and f"{planted} " in lines[at]  # the table, --by function names its column
        return
    bytes_line = " ".join(lines[at + 1:at + 3])
    assert bytes_line.lstrip().startswith(f"bytes in runs 1..{RUNS}: ") and planted in bytes_line


def test_csv_says_each_runs_notices_on_stderr(series, tmp_path):
    """QA: trend's text, JSON and HTML carry each run's losses, notes and warnings; the CSV (one row per
    group, no header for them) said nothing. Now they go to stderr, as report's and diff's CSV do."""
    from pooltrace.etl.writer import TraceWriter

    paths, _ = series
    w = TraceWriter(pointer_size=8, cpus=1)  # a run that recorded no pool events: a note in trace.json
    w.image(0, w.start_qpc + 10, 0x1403, 0xFFFFF80000000000, 0x10000, 0, "\\SystemRoot\\system32\\ntoskrnl.exe")
    w.save(tmp_path / "nopool.etl")
    runs = [paths[0], tmp_path / "nopool.etl"]
    data = json.loads(trend(*runs, "--no-symbols", "--format", "json").stdout)
    want = []
    for r in data["runs"]:
        if r["events_lost"]:
            want.append(f"warning: run {r['run']} ({r['name']}): {r['events_lost']:,} events lost while recording")
        want += [f"warning: run {r['run']} ({r['name']}): {n}" for n in r["notes"] + r["warnings"]]
    assert any("nopool.etl" in x for x in want) and any("build1.etl" in x for x in want)
    for extra in ([], ["-o", tmp_path / "t.csv"]):
        r = trend(*runs, "--no-symbols", "--format", "csv", *extra)
        assert r.stderr.splitlines() == want
        rows = list(csv.DictReader(io.StringIO(r.stdout if not extra else (tmp_path / "t.csv").read_text())))
        assert rows and all(set(row) == {"status", "first_run", "bytes_1", "bytes_2", "count_1", "count_2", "frames"}
                            for row in rows)


def test_wrong_inputs(series, tmp_path):
    paths, _ = series
    r = trend(paths[0], "--no-symbols", code=2)
    assert "at least 2 runs" in r.stderr and "Traceback" not in r.output
    r = trend(paths[0], paths[1], "--run", "x", code=2)
    assert "STORE" in r.stderr
    r = trend(paths[0], tmp_path / "missing.etl", code=2)
    assert "missing.etl" in r.stderr
    trend(*paths[:2], "--fail-on-growth", "lots", code=2)
    trend(*paths[:2], "--per-group", code=2)


def test_output_never_overwrites_an_input_and_text_is_clean(series, tmp_path):
    paths, _ = series
    run = tmp_path / "run2.etl"
    run.write_bytes(paths[1].read_bytes())
    before = run.read_bytes()
    for fmt in ("text", "json", "csv", "html"):
        r = trend(paths[0], run, "--no-symbols", "--format", fmt, "-o", run, code=2)
        assert "input" in r.stderr and len(r.stderr.splitlines()) == 1
    assert run.read_bytes() == before  # `trend A B -o B` used to replace the trace B with the report
    r = trend(paths[0], run, "--no-symbols", "-o", tmp_path / "missing" / "t.txt", code=2)
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.output
    out = tmp_path / "t.txt"
    trend(paths[0], run, "--by", "function", "--no-symbols", "-o", out)
    text = out.read_text()
    assert NEW_LEAK not in text and OLD_LEAK in text
    assert all(line == line.rstrip() for line in text.splitlines()), "trailing spaces in the text table"


def test_text_on_a_cp1252_stream_uses_ascii_boxes(series):
    import subprocess
    import sys

    paths, _ = series
    env = {**__import__("os").environ, "PYTHONIOENCODING": "cp1252"}
    r = subprocess.run([sys.executable, "-m", "pooltrace", "trend", *map(str, paths[:2]), "--no-symbols"],
                       capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    table = [line for line in r.stdout.decode("cp1252").splitlines() if line.startswith("stable")]
    assert table and all("?" not in line for line in table)  # box characters were replaced by '?'


def test_gate_never_passes_on_a_run_without_pool_events(series, tmp_path):
    from pooltrace.etl.writer import TraceWriter

    paths, _ = series
    w = TraceWriter(pointer_size=8, cpus=1)  # a kernel trace with an image but no pool events
    w.image(0, w.start_qpc + 10, 0x1403, 0xFFFFF80000000000, 0x10000, 0, "\\SystemRoot\\system32\\ntoskrnl.exe")
    w.save(tmp_path / "nopool.etl")
    # the last run recorded nothing: every group would read "fixed" and the gate "ok"
    r = trend(paths[0], tmp_path / "nopool.etl", "--no-symbols", "--fail-on-growth", "1k", code=2)
    assert r.stderr.splitlines()[-1] == ("pooltrace: error: run 2 (nopool.etl) has no pool events: the gate "
                                         "cannot pass on nothing")
    trend(tmp_path / "nopool.etl", paths[0], "--no-symbols", "--fail-on-growth", "1k", "--against", "best", code=2)
    trend(paths[0], tmp_path / "nopool.etl", "--no-symbols")  # without the gate: the table and its warning


def test_html_renders_offline_in_a_browser(series, tmp_path):
    from tests.test_html_browser import CHROMIUM, render

    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    paths, _ = series
    page = tmp_path / "trend.html"
    trend(*paths, "--by", "function", "--no-symbols", "--format", "html", "-o", page)
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text
    dom, console, requests = render(page, tmp_path)
    assert console == [] and requests == []
    assert dom.count('<section class="group') == min(12, len(json.loads(
        trend(*paths, "--by", "function", "--no-symbols", "--format", "json").stdout)["groups"]))
    assert f"fixed in run {FIXED_IN}" in dom and dom.count("<rect") >= RUNS


@given(st.lists(st.integers(min_value=0, max_value=10_000), min_size=2, max_size=12).filter(any))
def test_status_invariants(values):
    kind, run = classify(values, 0.10)
    n = len(values)
    if values[-1] == 0:
        assert kind == "fixed" and values[run - 2] > 0 and not any(values[run - 1:])
    elif 0 in values:
        assert kind == "new" and values[run - 2] == 0 and all(values[run - 1:])
    else:
        assert kind in ("growing", "shrunk", "stable")
    low = max(values) * 0.9
    if kind == "shrunk":
        assert all(v < low for v in values[run - 1:]) and values[run - 2] >= low
    if kind == "stable":
        assert values[-1] >= low  # a drop beyond the tolerance is never "stable"
    if kind == "growing":
        assert 2 <= run <= n and values[-1] > values[run - 2] * 1.1 and all(
            b >= a * 0.9 for a, b in zip(values[run - 1:], values[run:], strict=False))


def test_a_big_drop_reads_shrunk_in_every_format(shipped):
    """Two runs of the shipped samples: the fixed leak (most of its bytes gone) read "stable"; a drop beyond
    the tolerance is "shrunk in run 2", a rise beyond it "growing across runs", JSON, CSV, text and HTML alike."""
    paths = [shipped / "sample-leak.etl", shipped / "sample-leak-fixed.etl"]
    data = json.loads(trend(*paths, "--by", "function", "--format", "json").stdout)
    for g in data["groups"]:
        a, b = g["bytes"]
        want = ("new in run 2" if not a else "fixed in run 2" if not b else "growing across runs" if b > a * 1.1
                else "shrunk in run 2" if b < a * 0.9 else "stable")
        assert g["status"] == want, g
    fixed = next(g for g in data["groups"] if any("AllocateLeakyBuffer" in f for f in g["frames"]))
    assert fixed["bytes"][1] < fixed["bytes"][0] * 0.9 and fixed["status"] == "shrunk in run 2"
    rows = list(csv.DictReader(io.StringIO(trend(*paths, "--by", "function", "--format", "csv").stdout)))
    assert [r["status"] for r in rows] == [g["status"] for g in data["groups"]]
    line = next(x for x in trend(*paths, "--by", "function").stdout.splitlines() if "AllocateLeakyBuffer" in x)
    assert line.startswith("shrunk in run 2")
    page = trend(*paths, "--by", "function", "--format", "html").stdout
    assert '<section class="group shrunk">' in page and "shrunk in run 2 · first run 1" in page
