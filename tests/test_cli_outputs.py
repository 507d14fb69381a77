"""Outputs never cost a user a file, and every failure is one line with exit code 2: `pair -o` replaces only
a pooltrace dataset or an empty directory, `-o FILE` never overwrites an input, files are written atomically,
OS errors and closed pipes are handled once for every command, legacy console encodings get ASCII."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from pooltrace.outputs import atomic_write


def run(*args, cwd=None):
    if cwd is None:
        return CliRunner().invoke(cli, [str(a) for a in args])
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(old)


def one_line_error(r, code=2) -> str:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pooltrace: error: "), r.stderr
    return lines[0]


@pytest.fixture
def trace(tmp_path, shipped):
    t = tmp_path / "t.etl"
    shutil.copy(shipped / "sample-leak-fixed.etl", t)
    return t


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shipped):
    from pooltrace.dataset import pair_trace

    d = tmp_path_factory.mktemp("ds") / "fixed.pooltrace"
    pair_trace(shipped / "sample-leak-fixed.etl", d)
    return d


# ---- pair -o DIR -------------------------------------------------------------------------------------

def test_pair_refuses_a_directory_that_is_not_a_dataset(trace, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    err = one_line_error(run("pair", trace, "-o", thesis))
    assert err.endswith("not a pooltrace dataset; choose a new or empty directory")
    assert [p.name for p in thesis.iterdir()] == ["chapter1.tex"]
    assert (thesis / "chapter1.tex").read_text() == "years of work"


def test_pair_never_replaces_the_directory_holding_its_input(trace, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.move(trace, work / "t.etl")
    err = one_line_error(run("pair", "t.etl", "-o", "../work", cwd=work))
    assert "holds the input" in err
    assert (work / "t.etl").stat().st_size > 0 and [p.name for p in work.iterdir()] == ["t.etl"]


def test_pair_into_the_current_empty_directory_and_again(trace, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for _ in range(2):  # the second run replaces the dataset it wrote
        r = run("pair", trace, "-o", ".", cwd=out)
        assert r.exit_code == 0, r.output
        assert r.stdout.startswith(f"{out}: ")  # the absolute path, not "."
    assert sorted(p.name for p in out.iterdir()) == ["allocations.parquet", "modules.parquet", "stacks.parquet",
                                                     "summary.npz", "trace.json"]
    assert json.loads((out / "trace.json").read_text())["source"]["path"] == str(trace.resolve())


def test_pair_replaces_an_earlier_dataset_but_keeps_other_files(trace, tmp_path):
    out = tmp_path / "ds"
    assert run("pair", trace, "-o", out, "-q").exit_code == 0
    (out / "README.txt").write_text("my notes")
    assert run("pair", trace, "-o", out, "-q").exit_code == 0
    assert (out / "README.txt").read_text() == "my notes"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_pair_missing_parent_and_a_file_in_the_way(trace, tmp_path):
    err = one_line_error(run("pair", trace, "-o", tmp_path / "no" / "such" / "ds"))
    assert "does not exist" in err
    (tmp_path / "f").write_text("x")
    r = run("pair", trace, "-o", tmp_path / "f")  # click's usage error
    assert r.exit_code == 2 and "is a file" in r.stderr and (tmp_path / "f").read_text() == "x"


def test_report_cache_beside_a_trace_never_replaces_a_foreign_directory(trace, tmp_path):
    foreign = tmp_path / "t.pooltrace"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    r = run("report", trace, "--format", "json", "--no-symbols")
    assert r.exit_code == 0, r.output
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]  # paired in a temporary directory instead


# ---- -o FILE -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["html", "text", "json"])
def test_output_that_is_an_input_is_refused(trace, fmt):
    before = trace.read_bytes()
    err = one_line_error(run("report", trace, "--format", fmt, "-o", trace))
    assert "is an input" in err and trace.read_bytes() == before


def test_diff_output_that_is_an_input_or_inside_an_input_dataset_is_refused(trace, dataset):
    before = trace.read_bytes()
    assert "is an input" in one_line_error(run("diff", trace, dataset, "-o", trace))
    assert trace.read_bytes() == before
    assert "is an input" in one_line_error(run("diff", trace, dataset, "-o", dataset / "trace.json"))


OUTPUT_COMMANDS = {"report": ("report", "{ds}"), "tags": ("tags", "{ds}"), "diff": ("diff", "{ds}", "{ds}"),
                   "trend": ("trend", "{ds}", "{ds}")}


@pytest.mark.parametrize("name", sorted(OUTPUT_COMMANDS))
def test_an_existing_output_file_is_kept_byte_for_byte_without_force(name, dataset, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_bytes(b"years of notes\r\n\x00")
    args = [a.format(ds=dataset) for a in OUTPUT_COMMANDS[name]]
    err = one_line_error(run(*args, "-o", precious))
    assert err == f"pooltrace: error: -o {precious}: exists; pass --force to replace it"
    assert precious.read_bytes() == b"years of notes\r\n\x00"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]
    r = run(*args, "-o", precious, "--force")
    assert r.exit_code == 0, r.output
    assert precious.read_bytes() != b"years of notes\r\n\x00" and precious.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]  # no temporary file left
    assert "--force" in run(name, "--help").output


def test_force_never_lets_an_output_replace_an_input(trace):
    before = trace.read_bytes()
    assert "is an input" in one_line_error(run("report", trace, "-o", trace, "--force"))
    assert trace.read_bytes() == before


def test_output_file_is_written_whole_and_keeps_its_mode(dataset, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old")
    out.chmod(0o640)
    r = run("report", dataset, "--format", "json", "-o", out, "--no-symbols", "--force")
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["totals"]["outstanding_count"] > 0
    assert out.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    from pooltrace.errors import PooltraceError

    target = tmp_path / "a.txt"
    target.write_text("old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(PooltraceError, match="a.txt: cannot write: No space left on device"):
        atomic_write(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_output_in_a_missing_directory_is_one_line(dataset, tmp_path):
    err = one_line_error(run("report", dataset, "--format", "json", "-o", tmp_path / "nope" / "r.json"))
    assert "does not exist" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_output_in_a_read_only_directory_is_one_line(dataset, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "Permission denied" in one_line_error(run("report", dataset, "-o", ro / "r.txt"))
    finally:
        ro.chmod(0o700)


# ---- one error path ----------------------------------------------------------------------------------

def test_os_errors_are_one_line_and_verbose_shows_the_detail(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "trace.json").write_text('{"pooltrace_version": "0"}')
    r = run("report", d)
    one_line_error(r)
    rv = run("--verbose", "report", d)
    assert rv.exit_code == 2 and len(rv.stderr.strip().splitlines()) >= 1
    rv2 = run("report", d, "--verbose")
    assert rv2.exit_code == 2 and rv2.stderr.startswith("pooltrace: error: ")


def test_stack_window_must_be_a_finite_number(trace):
    for bad in ("nan", "inf", "-1"):
        r = run("pair", trace, "--stack-window", bad)
        assert r.exit_code == 2 and "Traceback" not in r.output and "--stack-window" in r.output


def test_window_after_the_trace_is_refused(dataset):
    err = one_line_error(run("report", dataset, "--window", "1000:"))
    assert "after the trace's end" in err
    r = run("report", dataset, "--window", "1:1000", "--no-symbols")
    assert r.exit_code == 0 and "ends after the trace's end" in r.stderr


def test_min_bytes_takes_sizes_like_fail_on_growth(dataset):
    plain = json.loads(run("report", dataset, "--format", "json", "--min-bytes", "10240", "--no-symbols").stdout)
    k = json.loads(run("report", dataset, "--format", "json", "--min-bytes", "10k", "--no-symbols").stdout)
    assert plain["groups"] == k["groups"] and all(g["bytes"] >= 10240 for g in k["groups"])
    assert run("report", dataset, "--min-bytes", "lots").exit_code == 2


def test_symbols_options(dataset, tmp_path):
    assert "no such directory" in one_line_error(run("report", dataset, "--symbols", tmp_path / "nope"))
    r = run("report", dataset, "--symbols", tmp_path, "--no-symbols")
    assert r.exit_code == 2 and "exclude each other" in r.output


def test_list_only_with_formats_that_show_it(dataset, tmp_path):
    for fmt in ("csv", "folded", "html"):
        r = run("report", dataset, "--list", "--format", fmt, "-o", tmp_path / f"x.{fmt}")
        assert r.exit_code == 2 and "--list works with" in r.output
        assert not (tmp_path / f"x.{fmt}").exists()


# ---- pipes and encodings -----------------------------------------------------------------------------

def _pooltrace(args, env=None, **kw):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "pooltrace", *map(str, args)], capture_output=True, env=e, **kw)


def test_closed_pipe_ends_quietly(dataset):
    p = subprocess.Popen([sys.executable, "-m", "pooltrace", "report", str(dataset), "--list", "--no-symbols"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # what `| head -1` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


def test_cp1252_output_uses_ascii_fallbacks(shipped, dataset, tmp_path):
    r = _pooltrace(["diff", dataset, dataset, "--no-symbols"], env={"PYTHONIOENCODING": "cp1252"})
    assert r.returncode == 0, r.stderr.decode()
    text = r.stdout.decode("cp1252")
    assert "d bytes" in text and "Traceback" not in r.stderr.decode()
    r = _pooltrace(["report", dataset, "--no-symbols"], env={"PYTHONIOENCODING": "cp1252"})
    assert r.returncode == 0 and "Windows build" in r.stdout.decode("cp1252")


def test_text_output_has_no_ansi_and_no_trailing_spaces_when_piped(dataset):
    r = _pooltrace(["report", dataset, "--no-symbols"], env={"COLUMNS": ""})
    out = r.stdout.decode()
    assert r.returncode == 0 and "\x1b[" not in out
    assert all(line == line.rstrip() for line in out.splitlines())
    assert max(len(line) for line in out.splitlines()) <= 100
    wide = _pooltrace(["report", dataset, "--no-symbols"], env={"COLUMNS": "160"}).stdout.decode()
    assert max(len(line) for line in wide.splitlines()) > 100 or wide == out


@pytest.mark.parametrize("name", ["info", "pair", "report", "tags", "diff", "whose"])
def test_every_option_has_help_and_the_command_an_example(name):
    cmd = cli.get_command(None, name)
    missing = [p.name for p in cmd.params if isinstance(p, __import__("click").Option) and not p.help]
    assert missing == []
    assert (cmd.epilog or "").startswith("Example: pooltrace ")
    r = run(name, "--help")
    assert r.exit_code == 0 and "Example: pooltrace" in r.stdout
