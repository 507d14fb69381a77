"""A tampered dataset directory is a one-line error naming the file and the problem (exit 2, "re-run
`pooltrace pair`") in every command that reads it, including whose; a damaged cache beside a trace is
rebuilt, not trusted. One case per kind of tampering the mutation campaign found (issue 10 §2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from tests.conftest import ROOT, pair_sample

SAMPLE = ROOT / "traces" / "sample-leak-fixed.etl"


@pytest.fixture(scope="module")
def paired(tmp_path_factory) -> Path:
    return pair_sample(tmp_path_factory, SAMPLE)


def _rewrite(path: Path, edit) -> None:
    table = pq.read_table(path)
    pq.write_table(edit(table), path)


def _retype(name, array_of):
    def edit(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index(name)
        return t.set_column(i, name, array_of(t[name]))
    return edit


def _swap(a, b):
    def edit(t: pa.Table) -> pa.Table:
        names = list(t.column_names)
        i, j = names.index(a), names.index(b)
        names[i], names[j] = b, a
        return t.rename_columns(names)
    return edit


def _truncate(name, keep):
    def edit(ds: Path):
        p = ds / name
        data = p.read_bytes()
        p.write_bytes(data[:int(len(data) * keep)])
    return edit


def _json(text):
    def edit(ds: Path):
        (ds / "trace.json").write_text(text)
    return edit


def _meta(change):
    def edit(ds: Path):
        meta = json.loads((ds / "trace.json").read_text())
        change(meta)
        (ds / "trace.json").write_text(json.dumps(meta))
    return edit


def _parquet(name, table_edit):
    def edit(ds: Path):
        _rewrite(ds / name, table_edit)
    return edit


def _stacks_dir(ds: Path):
    (ds / "stacks.parquet").unlink()
    (ds / "stacks.parquet").mkdir()


TAMPER = {
    "trace.json []": (_json("[]"), "trace.json", "not an object"),
    'trace.json "x"': (_json('"x"'), "trace.json", "not an object"),
    "trace.json nested 100,000 deep": (_json("[" * 100_000 + "]" * 100_000), "trace.json", "nested too deeply"),
    "trace.json empty": (_json(""), "trace.json", "not valid JSON"),
    "trace.json utf-16": (lambda ds: (ds / "trace.json").write_bytes(
        (ds / "trace.json").read_text().encode("utf-16")), "trace.json", "not UTF-8"),
    "trace.json without pairing": (_meta(lambda m: m.pop("pairing")), "trace.json", "no 'pairing'"),
    "trace.json pointer_size string": (_meta(lambda m: m.update(pointer_size="8")), "trace.json", "pointer_size"),
    "trace.json warnings a string": (_meta(lambda m: m.update(warnings="x")), "trace.json", "warnings"),
    "stacks.parquet an empty directory": (_stacks_dir, "stacks.parquet", "not a regular file"),
    "frames as strings": (_parquet("stacks.parquet", _retype(
        "frames", lambda c: pa.array([[str(x) for x in f] for f in c.to_pylist()], pa.list_(pa.string())))),
        "stacks.parquet", "column 'frames'"),
    "stack ids shifted": (_parquet("stacks.parquet", _retype(
        "stack_id", lambda c: pa.array([x + 1000 for x in c.to_pylist()], pa.int64()))),
        "stacks.parquet", "stack_id"),
    "modules name and pid swapped": (_parquet("modules.parquet", _swap("name", "pid")), "modules.parquet",
                                     "column"),
    "modules base as string": (_parquet("modules.parquet", _retype(
        "base", lambda c: pa.array([hex(x) for x in c.to_pylist()]))), "modules.parquet", "column 'base'"),
    "size as float": (_parquet("allocations.parquet", _retype("size", lambda c: c.cast(pa.float64()))),
                      "allocations.parquet", "column 'size'"),
    "size with nulls": (_parquet("allocations.parquet", _retype(
        "size", lambda c: pa.array([None] + c.to_pylist()[1:], pa.uint64()))), "allocations.parquet", "nulls"),
    "module names with nulls": (_parquet("modules.parquet", _retype(
        "name", lambda c: pa.array([None] * len(c), pa.string()))), "modules.parquet", "column 'name' has"),
    "allocations truncated": (_truncate("allocations.parquet", 0.5), "allocations.parquet", "Parquet"),
    "allocations empty": (_truncate("allocations.parquet", 0), "allocations.parquet", "Parquet"),
    "modules truncated": (_truncate("modules.parquet", 0.7), "modules.parquet", "Parquet"),
    "stacks truncated": (_truncate("stacks.parquet", 0.9), "stacks.parquet", "Parquet"),
}

COMMANDS = {
    "report": lambda ds: ["report", str(ds)],
    "report json": lambda ds: ["report", str(ds), "--format", "json"],
    "tags": lambda ds: ["tags", str(ds)],
    "diff": lambda ds: ["diff", str(ds), str(ds)],
    "whose": lambda ds: ["whose", "Leak", str(ds), "--no-symbols", "--no-scan"],
}


@pytest.mark.parametrize("kind", TAMPER)
def test_a_tampered_dataset_is_one_line_naming_the_file(paired, tmp_path, kind):
    edit, name, words = TAMPER[kind]
    ds = tmp_path / "ds"
    shutil.copytree(paired, ds)
    edit(ds)
    for label, args in COMMANDS.items():
        r = CliRunner().invoke(cli, args(ds))
        out = r.output.strip()
        assert r.exit_code == 2 and r.exception is None or isinstance(r.exception, SystemExit), (label, out)
        assert "Traceback" not in out, (label, out)
        lines = out.splitlines()
        assert len(lines) == 1, (label, out)
        assert str(ds / name) in lines[0] and words in lines[0] and "re-run `pooltrace pair`" in lines[0], \
            (label, out)


def test_same_typed_columns_swapped_never_crash(paired, tmp_path):
    """base and size swapped keep the schema: nonsense frames, but an answer, not a traceback."""
    ds = tmp_path / "ds"
    shutil.copytree(paired, ds)
    _rewrite(ds / "modules.parquet", _swap("base", "size"))
    for label, args in COMMANDS.items():
        r = CliRunner().invoke(cli, args(ds))
        assert r.exit_code in (0, 2) and "Traceback" not in r.output, (label, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit), (label, r.exception)


@pytest.mark.parametrize("command", ["report", "whose"])
def test_a_damaged_cache_beside_a_trace_is_rebuilt(tmp_path, command):
    etl = tmp_path / "t.etl"
    shutil.copyfile(SAMPLE, etl)
    r = CliRunner().invoke(cli, ["report", str(etl)])
    assert r.exit_code == 0, r.output
    cache = tmp_path / "t.pooltrace"
    assert (cache / "trace.json").is_file()
    good = r.output
    data = (cache / "stacks.parquet").read_bytes()
    (cache / "stacks.parquet").write_bytes(data[: len(data) // 2])
    args = ["report", str(etl)] if command == "report" else ["whose", "Leak", str(etl), "--no-symbols", "--no-scan"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    if command == "report":
        assert r.output == good
        pq.read_table(cache / "stacks.parquet")  # rebuilt


def _spoil_column(path: Path, column: str) -> None:
    """Overwrite the data of one column chunk with 0xff, leaving the footer (so the schema check) intact."""
    meta = pq.read_metadata(path).row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column)
    data = bytearray(path.read_bytes())
    start = chunk.data_page_offset + 40
    end = min(start + 2000, chunk.data_page_offset + chunk.total_compressed_size)
    data[start:end] = b"\xff" * (end - start)
    path.write_bytes(bytes(data))


CACHE_COMMANDS = {
    "report": lambda etl: ["report", str(etl)],
    "report-json": lambda etl: ["report", str(etl), "--format", "json"],
    "tags": lambda etl: ["tags", str(etl)],
    "diff": lambda etl: ["diff", str(etl), str(etl)],
}


@pytest.mark.parametrize("command", list(CACHE_COMMANDS))
def test_a_cache_damaged_inside_a_column_is_rebuilt_when_read(tmp_path, command):
    """Columns are read when used, after the cache was checked and reused: damage found then rebuilds the
    cache (said on stderr) and the answer is the intact one; the next run reuses the rebuilt cache."""
    etl = tmp_path / "t.etl"
    shutil.copyfile(SAMPLE, etl)
    args = CACHE_COMMANDS[command](etl)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    good = r.stdout
    cache = tmp_path / "t.pooltrace"
    _spoil_column(cache / "allocations.parquet", "free_ns")
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert r.stdout == good
    assert "allocations.parquet" in r.stderr and "rebuilding the cache from its trace" in r.stderr
    pq.read_table(cache / "allocations.parquet")  # rebuilt
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and r.stdout == good and "rebuilding" not in r.stderr


def test_a_named_dataset_damaged_inside_a_column_stays_an_error(paired, tmp_path):
    """A dataset the user named is not pooltrace's to rebuild: one line naming the file, exit 2."""
    ds = tmp_path / "ds"
    shutil.copytree(paired, ds)
    _spoil_column(ds / "allocations.parquet", "free_ns")
    r = CliRunner().invoke(cli, ["report", str(ds)])
    assert r.exit_code == 2, r.output
    assert "allocations.parquet" in r.stderr and "re-run `pooltrace pair`" in r.stderr
    assert "rebuilding" not in r.stderr and "Traceback" not in r.output
