"""The Python API: faithful dtypes, and the same numbers as the CLI's JSON (report, diff, whose)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import pooltrace
from pooltrace.cli import cli
from pooltrace.dataset import pair_trace
from pooltrace.errors import PooltraceError
from tests.conftest import ROOT

TRACES = ROOT / "traces"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("POOLTRACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("_NT_SYMBOL_PATH", raising=False)
    monkeypatch.delenv("_NT_ALT_SYMBOL_PATH", raising=False)
    monkeypatch.delenv("POOLTRACE_POOLTAG", raising=False)


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    out = {}
    for name in ("sample-leak", "sample-leak-fixed"):
        ds = tmp_path_factory.mktemp("api") / f"{name}.pooltrace"
        pair_trace(TRACES / f"{name}.etl", ds)
        out[name] = ds
    return out


def cli_json(*args) -> dict:
    r = CliRunner().invoke(cli, [*map(str, args)])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_import_is_light_and_names_are_exported():
    code = "import sys, pooltrace; print(sorted(m for m in ('pandas', 'pyarrow', 'numpy') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    for name in pooltrace.__all__:
        assert getattr(pooltrace, name) is not None
    with pytest.raises(AttributeError):
        pooltrace.no_such_name  # noqa: B018


def test_pooltrace_error_is_exported_and_is_what_the_api_raises(tmp_path):
    code = ("import sys, pooltrace; e = pooltrace.PooltraceError; "
            "print(e.__module__, sorted(m for m in ('pandas', 'pyarrow', 'numpy') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "pooltrace.errors []"
    assert "PooltraceError" in pooltrace.__all__ and "PooltraceError" in dir(pooltrace)
    with pytest.raises(pooltrace.PooltraceError, match="no such file"):
        pooltrace.open(tmp_path / "missing.etl")


def test_dtypes_are_faithful(pair_dirs):
    ds = pooltrace.open(pair_dirs["sample-leak"])
    a = ds.allocations
    raw = pq.read_table(pair_dirs["sample-leak"] / "allocations.parquet")
    assert len(a) == raw.num_rows == ds.trace["pairing"]["allocs"] + ds.trace["pairing"]["free_without_alloc"]
    assert str(a["address"].dtype) == "uint64[pyarrow]" and str(a["size"].dtype) == "uint64[pyarrow]"
    assert str(a["alloc_ns"].dtype) == "int64[pyarrow]" and str(a["alloc_stack"].dtype) == "int64[pyarrow]"
    assert str(a["fate"].dtype) == "string[pyarrow]" and str(a["tag"].dtype) == "string[pyarrow]"
    # nulls stay nulls in integer columns (frees of blocks allocated before the trace have no alloc time)
    assert a["alloc_ns"].isna().sum() == raw["alloc_ns"].null_count > 0
    assert a["alloc_ns"].dropna().tolist() == [v for v in raw["alloc_ns"].to_pylist() if v is not None]
    # 64-bit kernel addresses are exact (a float64 would round them)
    assert a["address"].tolist() == raw["address"].to_pylist() and max(a["address"].tolist()) > 2 ** 63
    assert set(a["fate"]) <= {"freed", "outstanding", "lost_free", "free_without_alloc"}
    assert str(ds.stacks["stack_id"].dtype) == "int64[pyarrow]"
    assert ds.stacks["frames"].iloc[0] is not None
    assert str(ds.modules["base"].dtype) == "uint64[pyarrow]" and "leaky.sys" in set(ds.modules["name"])
    assert ds.trace["pointer_size"] == 8


def test_outstanding_equals_report_json(pair_dirs):
    path = pair_dirs["sample-leak"]
    ds = pooltrace.open(path)
    for by, extra in (("stack", {}), ("function", {}), ("module", {}), ("tag", {}),
                      ("function", {"tag": "Lea?", "window": "1:8"}), ("stack", {"pid": 4242, "pool": "nonpaged"}),
                      ("function", {"module": "leaky.sys"}), ("function", {"sort": "growth"})):
        args = ["report", path, "--by", by, "--format", "json"]
        for k, v in extra.items():
            args += [f"--{k}", v]
        want = cli_json(*args)
        df = ds.outstanding(by=by, **extra)
        got = [dict(r, frames=list(r["frames"])) for r in df.to_dict("records")]
        assert got == want["groups"] and len(got) > 0
        assert df.attrs["totals"] == want["totals"] and df.attrs["window"] == want["window"]
        assert str(df["bytes"].dtype) == "int64"
    leak = ds.outstanding(by="function", tag="Leak").iloc[0]
    truth = json.loads((TRACES / "sample-leak.truth.json").read_text())["truth"]
    assert leak["bytes"] == truth["outstanding_bytes"]["leak"]


def test_frames_are_symbolized(pair_dirs):
    ds = pooltrace.open(pair_dirs["sample-leak"], symbols=str(TRACES / "symbols"))
    top = ds.outstanding(by="stack").iloc[0]
    a = ds.allocations
    sid = int(a[(a["fate"] == "outstanding") & (a["tag"] == "Leak")]["alloc_stack"].iloc[0])
    assert ds.frames(sid) == list(top["frames"]) and top["frames"][1].startswith("leaky.sys!AllocateLeakyBuffer+0x")
    assert any(f.startswith("leaky.sys!") for f in ds.frames(sid))
    raw = pooltrace.open(pair_dirs["sample-leak"], no_symbols=True).frames(sid)
    assert all("!" not in f for f in raw) and any(f.startswith("leaky.sys+0x") for f in raw)
    with pytest.raises(PooltraceError):
        ds.frames(10 ** 9)


def test_open_etl_pairs_and_caches(tmp_path):
    etl = tmp_path / "t.etl"
    etl.write_bytes((TRACES / "sample-leak-fixed.etl").read_bytes())
    ds = pooltrace.open(etl)
    assert (tmp_path / "t.pooltrace" / "trace.json").is_file() and ds.path == tmp_path / "t.pooltrace"
    with pytest.raises(PooltraceError, match="no such file"):
        pooltrace.open(tmp_path / "missing.etl")
    with pytest.raises(PooltraceError, match="not a pooltrace dataset"):
        pooltrace.open(tmp_path)
    with pytest.raises(PooltraceError, match="by="):
        ds.outstanding(by="nope")


def test_diff_equals_cli_json(pair_dirs):
    base, new = pair_dirs["sample-leak"], pair_dirs["sample-leak-fixed"]
    want = cli_json("diff", base, new, "--by", "function", "--format", "json")
    df = pooltrace.diff(base, new, by="function")
    got = [dict(r, frames=list(r["frames"])) for r in df.to_dict("records")]
    assert got == want["groups"] and df.attrs["totals"] == want["totals"]
    assert "gone" in set(df["status"]) or "shrunk" in set(df["status"])


def test_whose_equals_cli_json(pair_dirs):
    fx = ROOT / "tests" / "fixtures" / "symbols"
    want = cli_json("whose", "Leak", pair_dirs["sample-leak"], fx, "--pooltag", fx / "pooltag.txt", "--json")
    o = pooltrace.whose("Leak", pair_dirs["sample-leak"], fx, pooltag=fx / "pooltag.txt")
    assert o.verdict == want["verdict"] and o.tag == "Leak"
    assert set(o.trace["module"]) == {"leaky.sys"}
    assert o.trace["allocations"].sum() == want["trace"]["allocations"]
    assert list(o.pooltag["tag"]) == [e["tag"] for e in want["pooltag"]["entries"]]
    assert list(o.files["path"]) == [f["path"] for f in want["scan"]["files"]]
    assert isinstance(o.trace, pd.DataFrame)


def test_readme_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "traces").mkdir()
    for name in ("sample-leak.etl", "sample-leak-fixed.etl"):
        (tmp_path / "traces" / name).write_bytes((TRACES / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    assert scope["top"]["bytes"].iloc[0] > 0 and "Leak" in scope["top"]["tags"].iloc[0]
    assert len(scope["changes"]) and scope["owners"].verdict.startswith("'Leak'")
    assert str(scope["ds"].allocations.dtypes["address"]) == "uint64[pyarrow]"
    assert set(scope["series"]["status"]) <= {"stable", "shrunk in run 2", "new in run 2", "fixed in run 2",
                                              "growing across runs"}
    assert "new in run 2" in set(scope["series"]["status"])  # the fixed sample plants a second leak (Lea2)
