"""The run store: `pair --into` appends Hive partitions and a catalogue, atomically and safely from two
processes at once; runs are selected by id or label for report, diff and trend; DuckDB reads it as plain
Parquet (the README's query)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import duckdb
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from pooltrace.store import CATALOGUE, runs
from tests.conftest import ROOT

TRACES = ROOT / "traces"
LEAK, FIXED = TRACES / "sample-leak.etl", TRACES / "sample-leak-fixed.etl"


@pytest.fixture(scope="module", autouse=True)
def private_traces(shipped):
    """Commands on an .etl write its dataset cache beside it: use the session's copy, not the source tree."""
    global LEAK, FIXED
    LEAK, FIXED = shipped / "sample-leak.etl", shipped / "sample-leak-fixed.etl"


def run(*args, code=0):
    r = CliRunner().invoke(cli, [*map(str, args)])
    assert r.exit_code == code, r.output
    return r


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = tmp_path_factory.mktemp("store") / "runs"
    for k, trace in enumerate([LEAK, LEAK, FIXED], 1):
        run("pair", trace, "--into", s, "--run-id", f"b{k}", "--label", f"build={1230 + k}", "--label",
            "machine=lab7", "-q")
    return s


def test_layout_and_catalogue(store):
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == sorted([
        CATALOGUE, "run_id=b1", "run_id=b2", "run_id=b3"])
    for k in (1, 2, 3):
        assert sorted(p.name for p in (store / f"run_id=b{k}").iterdir()) == [
            "allocations.parquet", "modules.parquet", "stacks.parquet", "summary.npz", "trace.json"]
    rows = runs(store)
    assert [r["run_id"] for r in rows] == ["b1", "b2", "b3"]
    assert rows[0]["labels"] == {"build": "1231", "machine": "lab7"}
    meta = json.loads((store / "run_id=b3" / "trace.json").read_text())
    assert rows[2]["outstanding_bytes"] == meta["pairing"]["outstanding"]["bytes"]
    assert rows[2]["source"].endswith("sample-leak-fixed.etl") and rows[2]["pointer_size"] == 8
    assert {"leaky.sys", "ntoskrnl.exe"} <= {m["name"] for m in rows[0]["modules"]}
    assert all(m["timedatestamp"] and m["size"] for m in rows[0]["modules"])
    assert not [p for p in store.iterdir() if p.name.startswith(".incoming")]


def test_report_and_diff_select_runs(store, tmp_path):
    direct = json.loads(run("report", FIXED, "--format", "json", "--no-symbols").stdout)
    picked = json.loads(run("report", store, "--label", "build=1233", "--format", "json", "--no-symbols").stdout)
    assert picked["groups"] == direct["groups"] and picked["totals"] == direct["totals"]
    by_id = json.loads(run("report", store, "--run", "b3", "--format", "json", "--no-symbols").stdout)
    assert by_id["groups"] == direct["groups"]
    d = json.loads(run("diff", store, "--label", "build=1231", "--label", "build=1233", "--format", "json",
                       "--no-symbols").stdout)
    want = json.loads(run("diff", LEAK, FIXED, "--format", "json", "--no-symbols").stdout)
    assert d["groups"] == want["groups"]
    # wrong selections are one-line errors
    assert "no run 'zz'" in run("report", store, "--run", "zz", code=2).stderr
    assert "no run matches --label build=1" in run("report", store, "--label", "build=1", code=2).stderr
    assert "select 3 run(s) where 1 are needed" in run("report", store, code=2).stderr
    assert "key=value" in run("report", store, "--label", "build", code=2).stderr
    assert "1 input(s) given where 2 are needed" in run("diff", LEAK, code=2).stderr


def test_report_of_a_run_names_the_store_run_and_labels(store):
    """The header of `report STORE --run ID` named the .etl the run was once paired from."""
    first = run("report", store, "--run", "b3", "--no-symbols").stdout.splitlines()[0]
    assert first.startswith(f"{store} run b3 (build=1233, machine=lab7) — ") and ".etl" not in first
    trace = json.loads(run("report", store, "--run", "b3", "--format", "json", "--no-symbols").stdout)["trace"]
    assert (trace["source"], trace["run_id"], trace["labels"]) == (str(store), "b3",
                                                                   {"build": "1233", "machine": "lab7"})
    direct = json.loads(run("report", FIXED, "--format", "json", "--no-symbols").stdout)["trace"]
    assert direct["source"].endswith("sample-leak-fixed.etl") and (direct["run_id"], direct["labels"]) == (None, {})
    assert run("report", FIXED, "--no-symbols").stdout.splitlines()[0].startswith(direct["source"] + " — ")


def test_trend_over_the_store_equals_trend_over_the_files(store):
    files = json.loads(run("trend", LEAK, LEAK, FIXED, "--by", "function", "--no-symbols", "--format",
                           "json").stdout)
    stored = json.loads(run("trend", store, "--label", "machine=lab7", "--by", "function", "--no-symbols",
                            "--format", "json").stdout)
    assert stored["groups"] == files["groups"] and [r["name"] for r in stored["runs"]] == ["b1", "b2", "b3"]
    assert stored["runs"][0]["labels"] == {"build": "1231", "machine": "lab7"}
    two = json.loads(run("trend", store, "--run", "b3", "--run", "b1", "--format", "json", "--no-symbols").stdout)
    assert [r["name"] for r in two["runs"]] == ["b3", "b1"]


def test_wrong_appends_never_damage_anything(store, tmp_path):
    before = (store / CATALOGUE).read_bytes()
    assert "already in the store" in run("pair", LEAK, "--into", store, "--run-id", "b1", code=2).stderr
    assert "--run-id" in run("pair", LEAK, "--into", store, "--run-id", "../x", code=2).stderr
    assert (store / CATALOGUE).read_bytes() == before
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    assert "not a pooltrace run store" in run("pair", LEAK, "--into", precious, code=2).stderr
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]
    assert "need --into" in run("pair", LEAK, "--label", "a=b", code=2).stderr
    assert "no such file" in run("pair", tmp_path / "nope.etl", "--into", tmp_path / "s", code=2).stderr
    bad = tmp_path / "bad.etl"
    bad.write_bytes(b"not a trace" * 100)
    run("pair", bad, "--into", tmp_path / "s2", code=2)
    assert not [p for p in (tmp_path / "s2").iterdir() if p.name.startswith(("run_id=", ".incoming"))]


def test_concurrent_appends(tmp_path):
    store = tmp_path / "s"
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def start(run_id: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "pooltrace", "pair", str(LEAK), "--into", str(store),
                                 "--run-id", run_id, "-q"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    # three at once, two of them with the same run id: x and one y land, the other y says so
    procs = [start("x"), start("y"), start("y")]
    results = [(p.wait(120), p.stderr.read()) for p in procs]
    assert results[0][0] == 0 and sorted(r[0] for r in results[1:]) == [0, 2], results
    assert "already in the store" in next(err for code, err in results if code == 2)
    assert sorted(r["run_id"] for r in runs(store)) == ["x", "y"]
    for rid in ("x", "y"):
        assert pq.read_table(store / f"run_id={rid}" / "allocations.parquet").num_rows > 0
    assert not [p for p in store.iterdir() if p.name.startswith(".incoming")]


def test_readme_duckdb_query_runs(store, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Run store", 1)[1].split("\n## ", 1)[0]
    sql = section.split("```sql\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(store.parent)
    rows = duckdb.sql(sql.replace("'store/", f"'{store.name}/")).fetchall()
    catalogue = {r["run_id"]: (r["labels"]["build"], r["outstanding_count"], r["outstanding_bytes"])
                 for r in runs(store)}
    totals: dict[str, list] = {}
    for run_id, build, _tag, blocks, nbytes in rows:
        t = totals.setdefault(run_id, [build, 0, 0])
        t[1] += blocks
        t[2] += nbytes
    assert {k: tuple(v) for k, v in totals.items()} == catalogue


def test_readme_commands_run(tmp_path, monkeypatch):
    """The command examples of the README's trend and run store sections, on copies of the samples."""
    text = (ROOT / "README.md").read_text()
    sections = [text.split(h, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
                for h in ("### `pooltrace trend", "## Run store")]
    lines = [x for sec in sections for block in sec.split("```\n")[1::2] for x in block.splitlines()
             if x.startswith("pooltrace ")]
    assert len(lines) == 5
    (tmp_path / "traces").mkdir()
    for p in (LEAK, FIXED):
        (tmp_path / "traces" / p.name).write_bytes(p.read_bytes())
    monkeypatch.chdir(tmp_path)
    for line in lines:
        r = CliRunner().invoke(cli, line.split()[1:])
        assert r.exit_code == 0, (line, r.output)
    assert [r["run_id"] for r in runs(tmp_path / "store")] == ["b1234", "b1235"]


def test_api_opens_a_run_and_a_damaged_store_is_one_line(store, tmp_path):
    import shutil

    import pooltrace

    ds = pooltrace.open(store, label=["build=1233"])
    assert ds.path == store / "run_id=b3" and ds.trace["source"]["path"].endswith("sample-leak-fixed.etl")
    df = pooltrace.trend(store, run=["b1", "b3"], by="tag", no_symbols=True)
    assert list(df.attrs["runs"][k]["name"] for k in (0, 1)) == ["b1", "b3"]
    with pytest.raises(pooltrace.api.PooltraceError, match="picks 3 runs"):
        pooltrace.open(store, label=["machine=lab7"])
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    (bad / "run_id=b2" / "allocations.parquet").write_bytes(b"PAR1 damaged")
    r = run("trend", bad, "--no-symbols", code=2)
    assert "unreadable" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (bad / CATALOGUE).write_bytes(b"nope")
    assert "unreadable run catalogue" in run("report", bad, "--run", "b1", code=2).stderr


def test_a_run_without_pool_events_is_said_in_text_json_and_html(tmp_path):
    from pooltrace.etl.writer import TraceWriter

    w = TraceWriter(pointer_size=8, cpus=1, perf_freq=10_000_000, start_qpc=1_000_000_000)
    w.image(0, 1_000_000_100, 0x1403, 0xFFFFF80412000000, 0x6000, 0, r"\SystemRoot\system32\ntoskrnl.exe")
    w.save(tmp_path / "empty.etl")
    s = tmp_path / "s"
    run("pair", LEAK, "--into", s, "--run-id", "a", "-q")
    run("pair", tmp_path / "empty.etl", "--into", s, "--run-id", "b", "-q")
    assert runs(s)[1]["notes"][0].startswith("no pool events")
    data = json.loads(run("trend", s, "--no-symbols", "--by", "tag", "--format", "json").stdout)
    assert data["runs"][1]["notes"][0].startswith("no pool events") and data["runs"][0]["notes"] == []
    assert {g["status"] for g in data["groups"]} == {"fixed in run 2"}
    text = run("trend", s, "--no-symbols", "--by", "tag").stdout
    assert "run 2 (b): no pool events" in text
    page = tmp_path / "t.html"
    run("trend", s, "--no-symbols", "--format", "html", "-o", page)
    assert "run 2 (b): no pool events" in page.read_text()
