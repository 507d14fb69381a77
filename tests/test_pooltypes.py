"""Pool types by name (one module for every view) and the `--pool` filter, `nx` included; the kernel's own
`Pool` tag explained without a pooltag.txt."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pooltrace import pooltypes
from pooltrace.cli import cli
from pooltrace.dataset import pair_trace
from pooltrace.etl.writer import TraceWriter
from tests.conftest import ROOT

TRACES = ROOT / "traces"


@pytest.mark.parametrize(("value", "session", "want"), [
    (0x0, False, "NonPaged"), (0x1, False, "Paged"), (0x200, False, "NonPagedNx"),
    (0x204, False, "NonPagedNx CacheAligned"), (0x21, False, "PagedSession"), (0x1, True, "PagedSession"),
    (0x220, True, "NonPagedNxSession"), (0x10000001, False, "Paged big"), (0x10000200, False, "NonPagedNx big"),
    (0x5, False, "Paged CacheAligned"),
])
def test_names(value, session, want):
    assert pooltypes.name(value, session) == want


def test_kinds_and_filters():
    pt = np.array([0x0, 0x200, 0x1, 0x21, 0x10000200, 0x10000001, 0x220], dtype=np.uint32)
    sess = np.array([False, False, False, True, False, False, True])
    assert [pooltypes.KINDS[k] for k in pooltypes.kind_codes(pt, sess)] == [
        "NonPaged", "NonPagedNx", "Paged", "Session", "NonPagedNx", "Paged", "Session"]
    masks = {w: pooltypes.filter_mask(w, pt, sess).tolist() for w in pooltypes.FILTERS}
    assert masks == {"paged": [False, False, True, False, False, True, False],
                     "nonpaged": [True, True, False, False, True, False, True],
                     "nx": [False, True, False, False, True, False, True],
                     "session": [False, False, False, True, False, False, True]}
    assert pooltypes.filter_mask(None, pt, sess) is None
    with pytest.raises(ValueError):
        pooltypes.filter_mask("huge", pt, sess)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    ds = tmp_path_factory.mktemp("t") / "sample.pooltrace"
    pair_trace(TRACES / "sample-leak.etl", ds)
    return ds, json.loads((TRACES / "sample-leak.truth.json").read_text())["truth"]


def _rows(output: str) -> list[dict]:
    data = json.loads(output)
    if isinstance(data, dict):
        data = next(v for v in data.values() if isinstance(v, list) and v and isinstance(v[0], dict) and "tag" in v[0])
    return data


def test_tags_name_the_pools_and_filter_nx(sample):
    ds, truth = sample
    rows = _rows(CliRunner().invoke(cli, ["tags", str(ds), "--format", "json"]).output)
    assert {(r["tag"], r["type"]) for r in rows} == {("Leak", "NonPagedNx"), ("Irp ", "NonPagedNx"),
                                                     ("File", "NonPagedNx"), ("MmSt", "Paged"), ("Ntfr", "Paged"),
                                                     ("Gh05", "Session")}
    nx = _rows(CliRunner().invoke(cli, ["tags", str(ds), "--format", "json", "--pool", "nx"]).output)
    assert {r["tag"] for r in nx} == {"Leak", "Irp ", "File"}
    assert "NonPagedNx" in CliRunner().invoke(cli, ["tags", str(ds)]).output


def test_report_pool_nx_and_list_names(sample):
    ds, truth = sample
    out = CliRunner().invoke(cli, ["report", str(ds), "--format", "json", "--no-symbols", "--pool", "nx", "--list"])
    assert out.exit_code == 0, out.output
    rep = json.loads(out.output)
    nx_sites = ("leak", "leak_ok", "irp", "file")
    assert rep["totals"]["outstanding_count"] == sum(truth["outstanding"].get(s, 0) for s in nx_sites)
    assert {b["pool"] for b in rep["blocks"]} == {"NonPagedNx"}
    paged = json.loads(CliRunner().invoke(cli, ["report", str(ds), "--format", "json", "--no-symbols", "--pool",
                                                "paged", "--list", "--tag", "Ntfr"]).output)
    assert {b["pool"] for b in paged["blocks"]} == {"Paged big"}  # 0x2000-byte blocks: above 0xFE0
    text = CliRunner().invoke(cli, ["report", str(ds), "--no-symbols", "--tag", "Ntfr", "--list"]).output
    assert "Paged big" in text
    bad = CliRunner().invoke(cli, ["report", str(ds), "--pool", "huge"])
    assert bad.exit_code == 2 and "nx" in bad.output


def test_the_kernels_pool_tag_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("POOLTRACE_POOLTAG", str(tmp_path / "none.txt"))
    w = TraceWriter(pointer_size=8, cpus=1)
    t = w.start_qpc + 10
    w.pool(0, t, 0x0E20, 0x10000200, "Pool", 0x3000, 0xFFFFA00000010000, tid=8, pid=4)
    w.save(tmp_path / "p.etl")
    rows = _rows(CliRunner().invoke(cli, ["tags", str(tmp_path / "p.etl"), "--format", "json"]).output)
    assert [(r["tag"], r["type"]) for r in rows] == [("Pool", "NonPagedNx")]
    assert "pool tracking tables" in rows[0]["description"]
