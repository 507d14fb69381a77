"""The dataset's summary (pooltrace.summary, `summary.npz` written by `pair`): a report that it answers is the
same byte for byte with and without it, in every format, over the shipped samples; the summary is really what
such a report reads (no allocation column but the tags); options it cannot answer read the rows; a summary
that is damaged, stale (allocations.parquet changed) or inconsistent is never used, and a damaged one is said."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pooltrace import api
from pooltrace.analysis import Filters
from pooltrace.cli import cli
from pooltrace.datasetopen import OPENED, load_dataset
from pooltrace.summary import NAME, _digest, read_summary, write_summary
from tests.conftest import ROOT, pair_sample

SAMPLES = ["sample-leak", "sample-growth", "sample-leak-fixed"]
FORMATS = ["text", "json", "csv", "folded", "html"]
# options the summary answers, then options that read the rows
ANSWERED = [[], ["--by", "function"], ["--by", "module"], ["--sort", "growth"], ["--top", "2"],
            ["--min-bytes", "4k"], ["--module", "ntfs.sys"], ["--window", "0:"],
            ["--by", "function", "--top", "1", "--sort", "growth", "--min-bytes", "100"]]
ROWS = [["--by", "tag"], ["--tag", "Leak"], ["--pool", "paged"], ["--window", "1:"], ["--list"]]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per sample: its dataset as `pair` writes it, and a copy without the summary (an older dataset)."""
    out = {}
    for name in SAMPLES:
        ds = pair_sample(tmp_path_factory, ROOT / "traces" / f"{name}.etl")
        assert (ds / NAME).is_file()
        bare = tmp_path_factory.mktemp("bare") / "ds"
        shutil.copytree(ds, bare)
        (bare / NAME).unlink()
        out[name] = (ds, bare)
    return out


def _run(ds: Path, args: list[str], fmt: str, tmp: Path) -> tuple[int, str, str]:
    if fmt == "html":
        html = tmp / f"r{len(list(tmp.iterdir()))}.html"
        r = CliRunner().invoke(cli, ["report", str(ds), "--no-symbols", *args, "--format", fmt, "-o", str(html)])
        text = html.read_text() if r.exit_code == 0 else ""
    else:
        r = CliRunner().invoke(cli, ["report", str(ds), "--no-symbols", *args, "--format", fmt])
        text = r.stdout
    return r.exit_code, text.replace(str(ds), "<ds>"), r.stderr.replace(str(ds), "<ds>")


@pytest.mark.parametrize("name", SAMPLES)
def test_the_same_report_with_and_without_the_summary(pairs, tmp_path, name):
    ds, bare = pairs[name]
    for args in ANSWERED + ROWS:
        for fmt in FORMATS if args in ([], ["--by", "function"], ["--module", "ntfs.sys"]) else ["text", "json"]:
            if args == ["--list"] and fmt not in ("text", "json"):
                continue
            with_summary = _run(ds, args, fmt, tmp_path)
            assert with_summary[0] == 0, (args, fmt, with_summary)
            assert with_summary == _run(bare, args, fmt, tmp_path), (args, fmt)


@pytest.mark.parametrize("name", SAMPLES)
def test_a_default_report_reads_the_summary_not_the_rows(pairs, name):
    ds_path, _ = pairs[name]
    for by in ("stack", "function", "module"):
        ds = load_dataset(ds_path)
        rep, _ = api.analyze(ds, ds_path, by=by, no_symbols=True, filters=Filters(min_bytes=1))
        assert ds.summary is not None and rep.rows is None and set(ds.rows) == set(OPENED)
    ds = load_dataset(ds_path)
    rep, _ = api.analyze(ds, ds_path, by="tag", no_symbols=True)
    assert ds.summary is False and rep.rows is not None  # by tag: the rows


def test_an_older_dataset_keeps_working_and_pair_replaces_a_stale_summary(pairs, tmp_path):
    """A dataset without a summary is reported from its rows; pairing into a dataset directory writes the
    new summary, and removes an old one when it writes none."""
    ds, bare = pairs["sample-leak"]
    d = load_dataset(bare)
    rep, _ = api.analyze(d, bare, no_symbols=True)
    assert d.summary is None and rep.rows is not None
    out = tmp_path / "out"
    shutil.copytree(ds, out)
    (out / NAME).write_bytes(b"old")
    r = CliRunner().invoke(cli, ["pair", str(ROOT / "traces" / "sample-growth.etl"), "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    summary, problem = read_summary(load_dataset(out))
    assert summary is not None and problem is None


def _damaged_copy(ds: Path, tmp: Path, how) -> Path:
    out = tmp / "ds"
    shutil.copytree(ds, out)
    how(out / NAME, out)
    return out


def _flip(seed: int):
    def how(p: Path, _ds: Path) -> None:
        raw = bytearray(p.read_bytes())
        rng = np.random.default_rng(seed)
        for b in rng.integers(0, len(raw) * 8, int(rng.integers(1, 8))).tolist():
            raw[b // 8] ^= 1 << (b % 8)
        p.write_bytes(bytes(raw))
    return how


def _rewrite(change):
    """Change the summary's arrays and write it back with a matching SHA-256 (a consistent-looking file)."""
    def how(p: Path, _ds: Path) -> None:
        with np.load(p) as z:
            a = {k: z[k].copy() for k in z.files}
        a.pop("digest")
        change(a)
        a["digest"] = np.frombuffer(_digest(a), dtype=np.uint8)
        with open(p, "wb") as f:
            np.savez(f, **a)
    return how


def _bump(name: str, at: int = 0, by: int = 1):
    def change(a):
        a[name][at] += by
    return change


DAMAGE = {
    "truncated": lambda p, _: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p, _: p.write_bytes(b""),
    "not a zip": lambda p, _: p.write_bytes(b"PK\x03\x04 not really"),
    "a directory": lambda p, _: (p.unlink(), p.mkdir()),
    "a named pipe": lambda p, _: (p.unlink(), os.mkfifo(p)),
    **{f"bits flipped {s}": _flip(s) for s in range(6)},
    "counts changed": _rewrite(_bump("counts")),
    "bytes per tag changed": _rewrite(_bump("pair_bytes")),
    "lifetimes changed": _rewrite(_bump("lifetime_counts", 2)),
    "a key past the stacks": _rewrite(lambda a: a["keys"].__setitem__(-1, 10**6)),
    "a row past the rows": _rewrite(lambda a: a["first_row"].__setitem__(0, 10**9)),
    "stack count": _rewrite(_bump("stacks")),
    "growth arrays cut": _rewrite(lambda a: a.__setitem__("up_w", a["up_w"][:-1])),
    "an array missing": _rewrite(lambda a: a.pop("pid")),
    "an array retyped": _rewrite(lambda a: a.__setitem__("counts", a["counts"].astype(np.float64))),
    "digest of other content": lambda p, _: _rewrite(_bump("counts"))(p, _) or _flip(99)(p, _),
}
STALE = {
    "another version": _rewrite(_bump("version")),
    "allocations.parquet rewritten": lambda _, ds: pq.write_table(
        pq.read_table(ds / "allocations.parquet").slice(1), ds / "allocations.parquet"),
    "allocations.parquet changed in one byte": lambda _, ds: (ds / "allocations.parquet").write_bytes(
        (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:])((ds / "allocations.parquet").read_bytes())),
}


@pytest.mark.parametrize("kind", list(DAMAGE) + list(STALE))
def test_a_damaged_or_stale_summary_is_never_used(pairs, tmp_path, kind):
    """The report is the one the rows give (the intact one when only the summary is damaged); a damaged
    summary is said on stderr (one line naming it), a stale one is simply not the dataset's."""
    ds, bare = pairs["sample-leak"]
    out = _damaged_copy(ds, tmp_path, {**DAMAGE, **STALE}[kind])
    summary, problem = read_summary(load_dataset(out)) if kind != "allocations.parquet changed in one byte" \
        else (None, None)
    assert summary is None
    if kind in STALE:
        assert problem is None
        without = tmp_path / "without"
        shutil.copytree(out, without)
        (without / NAME).unlink()
        for args in ([], ["--by", "function"]):
            got, want = _run(out, args, "json", tmp_path), _run(without, args, "json", tmp_path)
            assert got[:2] == want[:2], kind
        return
    assert problem is not None and problem.startswith(str(out / NAME)), problem
    for args in ([], ["--by", "function"]):
        code, text, err = _run(out, args, "json", tmp_path)
        assert code == 0 and (code, text) == _run(bare, args, "json", tmp_path)[:2], kind
        assert f"<ds>/{NAME}" in err and "reads the allocation rows instead" in err, err


def test_write_summary_needs_a_duration(pairs, tmp_path):
    """Without the trace's duration the default window follows the rows: no summary is written."""
    import json

    ds, _ = pairs["sample-leak"]
    out = tmp_path / "ds"
    shutil.copytree(ds, out)
    (out / NAME).unlink()
    meta = json.loads((out / "trace.json").read_text())
    meta["duration_ns"] = None
    (out / "trace.json").write_text(json.dumps(meta))
    assert write_summary(out) is False and not (out / NAME).exists()


@pytest.mark.parametrize("name", SAMPLES)
def test_the_summary_holds_the_stacks_of_the_outstanding_allocations(pairs, name):
    """Its keys are the stacks the rows' report groups (each group's stacks), and its growth counts one row of
    bins per key; the rows' report and the summary's give every group the same growth."""
    ds_path, _ = pairs[name]
    ds = load_dataset(ds_path)
    summary, problem = read_summary(ds)
    assert summary is not None and problem is None
    rows_ds = load_dataset(ds_path)
    rep, _ = api.analyze(rows_ds, ds_path, no_symbols=True, rows=True)
    assert sorted(sid for g in rep.groups for sid in g.stack_ids) == summary.per_key.keys.tolist()
    assert summary.growth.keys == len(summary.per_key.keys)
    quick, _ = api.analyze(ds, ds_path, no_symbols=True)
    assert [g.growth for g in quick.groups] == [g.growth for g in rep.groups]
