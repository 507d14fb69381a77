"""A damaged sidecar (TRACE.etl.pooltrace.json) never stops an analysis: load_sidecar validates it against
the schema, drops what is wrong with a warning naming the file and the field, and the trace is still paired.
One case per kind of damage the mutation campaign found (issue 10 §2)."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from pooltrace.datasetschema import MODULES_SCHEMA
from pooltrace.sidecar import load_sidecar, merge_pdb_identities, sidecar_path, tag_baseline
from tests.conftest import ROOT

GUID = "6c5a0b8e-9f1d-4e1b-a7c2-3d4e5f607182"


def good() -> dict:
    return {
        "format": "pooltrace-sidecar", "version": 1, "trace": "t.etl", "created_by": "pooltrace 0.1.0",
        "recording": {"pointer_size": 8, "seconds": 10.5, "stacks": ["PoolAlloc"], "events_lost": 0,
                      "future_field": {"nested": [1, 2]}},
        "modules": [{"name": "leaky.sys", "base": "0xfffff80412340000", "size": 32768, "timedatestamp": 1597905451,
                     "checksum": 0, "pdb_name": "leaky.pdb", "pdb_guid": GUID, "pdb_age": 2}],
        "pool_tags": {"filter": [], "start": {"utc": "2026-01-01T00:00:00Z", "entries": [
            {"tag": "Leak", "value": 1, "paged_allocs": 5, "paged_frees": 2, "paged_bytes": 300,
             "nonpaged_allocs": 0, "nonpaged_frees": 0, "nonpaged_bytes": 0}]}, "stop": None},
    }


def write(tmp_path, content) -> os.PathLike:
    etl = tmp_path / "t.etl"
    path = sidecar_path(etl)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content), encoding="utf-8")
    return etl


def mutated(edit) -> dict:
    d = good()
    edit(d)
    return d


def _set(path, value):
    def edit(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


def _del(path):
    def edit(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
    return edit


ENTRY = ("pool_tags", "start", "entries", 0)
CASES = {
    "string for a number": (_set(("modules", 0, "timedatestamp"), "1597905451"), "modules[0].timedatestamp"),
    "string for a counter": (_set((*ENTRY, "paged_allocs"), "5"), "paged_allocs"),
    "null counter": (_set((*ENTRY, "paged_frees"), None), "paged_frees (null)"),
    "null modules entry": (_set(("modules", 0), None), "modules[0] (not an object)"),
    "missing key": (_del((*ENTRY, "paged_bytes")), "no 'paged_bytes'"),
    "module without name": (_del(("modules", 0, "name")), "no 'name'"),
    "modules as [[]]": (_set(("modules",), [[]]), "modules[0] (not an object)"),
    "negative number": (_set(("modules", 0, "size"), -1), "modules[0].size (out of range"),
    "counter past 32 bits": (_set((*ENTRY, "paged_frees"), 1 << 40), "paged_frees (out of range"),
    "timedatestamp past 32 bits": (_set(("modules", 0, "timedatestamp"), 1 << 33), "timedatestamp (out of range"),
    "bool for an int": (_set(("modules", 0, "pdb_age"), True), "pdb_age (not an integer)"),
    "recording a string": (_set(("recording",), "x"), "recording (not an object)"),
    "entries an object": (_set(("pool_tags", "start", "entries"), {}), "entries (not a list)"),
    "base not hex": (_set(("modules", 0, "base"), "0xZZ"), "base (not a hex address)"),
    "pdb_guid a path": (_set(("modules", 0, "pdb_guid"), "../../etc"), "pdb_guid (not a GUID)"),
    "pdb_name a path": (_set(("modules", 0, "pdb_name"), "..\\..\\x.pdb"), "pdb_name (not a plain file name)"),
}


@pytest.mark.parametrize("kind", CASES)
def test_a_bad_field_is_dropped_with_a_warning(tmp_path, kind):
    edit, words = CASES[kind]
    etl = write(tmp_path, mutated(edit))
    data, warnings = load_sidecar(etl)
    assert len(warnings) == 1 and str(sidecar_path(etl)) in warnings[0] and words in warnings[0], warnings
    # what survives is usable by everything that reads it
    merge_pdb_identities(pa.Table.from_pylist([{"name": "leaky.sys", "base": 0xFFFFF80412340000, "pid": 0,
                                                 "timedatestamp": 1597905451}], schema=MODULES_SCHEMA), data)
    tag_baseline(data)
    json.dumps(data, allow_nan=False)


@pytest.mark.parametrize(("text", "words"), [
    ('{"format": "pooltrace-sidecar", "version": 1, "recording": {"seconds": Infinity}}', "recording.seconds"),
    ('{"format": "pooltrace-sidecar", "version": 1, "recording": {"seconds": 1e999}}', "recording.seconds"),
    ('{"format": "pooltrace-sidecar", "version": 1, "recording": {"seconds": NaN}}', "recording.seconds"),
])
def test_non_finite_numbers_are_dropped(tmp_path, text, words):
    data, warnings = load_sidecar(write(tmp_path, text))
    assert "seconds" not in data["recording"] and words in warnings[0]


def test_non_finite_numbers_in_unknown_keys_become_null(tmp_path):
    etl = write(tmp_path, '{"format": "pooltrace-sidecar", "version": 1, "extra": [Infinity, -Infinity]}')
    data, warnings = load_sidecar(etl)
    assert warnings == [] and data["extra"] == [None, None]


@pytest.mark.parametrize(("content", "words"), [
    (json.dumps(good()).encode("utf-16"), "is not UTF-8 text"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": "pooltrace-sidecar", "version": 1, "modules": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "nested too deeply"),
    ("[]", "is not a pooltrace sidecar"),
    ('"x"', "is not a pooltrace sidecar"),
    ("{", "is not valid JSON"),
    ('{"format": "pooltrace-sidecar", "version": "1"}', "has sidecar version '1'"),
])
def test_an_unreadable_sidecar_is_ignored_whole(tmp_path, content, words):
    etl = write(tmp_path, content)
    data, warnings = load_sidecar(etl)
    assert data is None and len(warnings) == 1
    assert warnings[0].startswith("sidecar ignored:") and str(sidecar_path(etl)) in warnings[0]
    assert words in warnings[0]


def test_a_named_pipe_as_sidecar_does_not_block(tmp_path):
    etl = tmp_path / "t.etl"
    os.mkfifo(sidecar_path(etl))
    data, warnings = load_sidecar(etl)
    assert data is None and "not a regular file" in warnings[0]


def test_unknown_keys_are_kept_and_a_good_file_has_no_warning(tmp_path):
    data, warnings = load_sidecar(write(tmp_path, good()))
    assert warnings == [] and data == good()


def test_pair_with_a_damaged_sidecar_still_analyzes_and_says_so(tmp_path):
    etl = tmp_path / "t.etl"
    shutil.copyfile(ROOT / "traces" / "sample-leak.etl", etl)
    clean = tmp_path / "clean.etl"
    shutil.copyfile(etl, clean)
    write(tmp_path, mutated(_set((*ENTRY, "paged_frees"), "two")))
    r = CliRunner().invoke(cli, ["pair", str(etl), "-o", str(tmp_path / "ds")])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    meta = json.loads((tmp_path / "ds" / "trace.json").read_text())
    assert any(str(sidecar_path(etl)) in w and "paged_frees" in w for w in meta["warnings"])
    # the only tag entry was dropped: the baseline comes from the trace's own pool snapshot instead
    assert meta["tag_baseline_source"] == "pool_snapshot" and meta["tag_baseline"]["Leak"]["start"]
    assert meta["recording"]["seconds"] == 10.5
    r = CliRunner().invoke(cli, ["pair", str(clean), "-o", str(tmp_path / "ds2")])
    ref = json.loads((tmp_path / "ds2" / "trace.json").read_text())
    assert meta["pairing"] == ref["pairing"]  # the trace itself was analyzed in full

    sidecar_path(etl).write_bytes(json.dumps(good()).encode("utf-16"))
    r = CliRunner().invoke(cli, ["report", str(etl), "--format", "json"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
