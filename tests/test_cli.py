"""CLI conventions: --version, --help everywhere, python -m pooltrace, the progress bar and --quiet."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from pooltrace import __version__
from pooltrace.cli import SHORT_HELP, cli, common
from tests.conftest import ROOT


def test_version_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "pooltrace", "--version"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"pooltrace, version {__version__}"


@pytest.mark.parametrize("command", cli.list_commands(None))
def test_help_on_every_command(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0 and "Usage: " in result.output and "--help" in result.output


@pytest.mark.parametrize("command", cli.list_commands(None))
def test_listed_short_help_is_the_commands_own(command):
    """`pooltrace --help` lists commands without importing them: its table must say what they say."""
    assert cli.get_command(None, command).get_short_help_str(limit=1000) == SHORT_HELP[command]


@pytest.mark.parametrize("argv", [["--help"], ["record", "--help"], ["profile", "--help"], ["pair", "--help"]])
def test_start_up_imports_no_data_libraries(argv):
    """Lazy command loading: help for the group, `record` and `pair` load neither pyarrow, numpy nor rich."""
    code = ("import sys; from pooltrace.cli import cli\n"
            f"try: cli.main({argv!r}, prog_name='pooltrace')\n"
            "except SystemExit: pass\n"
            "print(sorted(m for m in ('pyarrow', 'numpy', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "Usage: " in out.stdout and out.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_option_is_a_usage_error():
    result = CliRunner().invoke(cli, ["report", "x.etl", "--no-such-option"])
    assert result.exit_code == 2


def test_progress_bar_on_stderr_and_quiet(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "PROGRESS_MIN_BYTES", 0)
    monkeypatch.setenv("POOLTRACE_PROGRESS", "1")
    trace = ROOT / "traces" / "sample-leak.etl"
    shown = subprocess.run([sys.executable, "-c", "from pooltrace.cli import common, main; "
                            "common.PROGRESS_MIN_BYTES = 0; main()", "pair", str(trace), "-o", str(tmp_path / "a")],
                           capture_output=True, text=True, cwd=ROOT, timeout=120,
                           env={**__import__("os").environ, "POOLTRACE_PROGRESS": "1", "COLUMNS": "100"})
    assert shown.returncode == 0 and "pairing sample-leak.etl" in shown.stderr
    quiet = subprocess.run([sys.executable, "-c", "from pooltrace.cli import common, main; "
                            "common.PROGRESS_MIN_BYTES = 0; main()", "pair", str(trace), "-o", str(tmp_path / "b"),
                            "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                           env={**__import__("os").environ, "POOLTRACE_PROGRESS": "1"})
    assert quiet.returncode == 0 and quiet.stderr.strip().startswith("warning: 3 events")
    assert "pairing" not in quiet.stderr


def test_data_commands_leave_pandas_unimported_but_available():
    """pyarrow's pandas probe is answered without importing pandas (arrowprobe); DataFrames still work."""
    code = ("import sys\n"
            "from pooltrace.arrowprobe import skip_pandas_probe\n"
            "skip_pandas_probe()\n"
            "import numpy as np, pyarrow as pa\n"
            "t = pa.table({'a': np.arange(3)})\n"
            "t['a'].to_numpy()\n"
            "print('pandas' in sys.modules)\n"
            "print(t.to_pandas()['a'].tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["False", "[0, 1, 2]"]


@pytest.mark.parametrize(("preset", "expected"), [(None, "1"), ("3", "3")])
def test_blas_runs_single_threaded_unless_the_user_says(tmp_path, preset, expected):
    """numpy's OpenBLAS would start a spinning thread per core; the command line asks for one (the decode
    workers inherit it), keeping a value the user set."""
    code = ("import atexit, os, sys\n"
            "atexit.register(lambda: print('blas', os.environ.get('OPENBLAS_NUM_THREADS')))\n"
            "from pooltrace.cli import main\n"
            "main()\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if preset is not None:
        env["OPENBLAS_NUM_THREADS"] = preset
    out = subprocess.run([sys.executable, "-c", code, "info", str(ROOT / "traces" / "sample-leak.etl")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].split() == ["blas", expected]


TEARDOWN_PROBE = ("import atexit, sys, threading, time\n"
                  "class Probe:\n"
                  "    def __del__(self):\n"
                  "        print('teardown', flush=True)\n"
                  "probe = Probe()  # freed by the interpreter's teardown only\n"
                  "atexit.register(lambda: print('handler', flush=True))\n"
                  "if sys.argv.pop(1) == 'thread':\n"
                  "    threading.Thread(target=lambda: time.sleep(0.5) or print('thread done', flush=True)).start()\n"
                  "from pooltrace.cli import main\n"
                  "main()\n")


@pytest.mark.parametrize(("args", "code"), [(["pair", "{trace}", "-o", "{out}"], 0), (["pair", "{out}.etl"], 2),
                                            (["--version"], 0)])
def test_the_process_ends_without_teardown_once_the_command_is_done(tmp_path, args, code):
    """After the command, the exit handlers run and the output is flushed, then the process ends without the
    interpreter's teardown (0.1 s of a pair run): the exit code and every line are kept."""
    argv = [a.format(trace=ROOT / "traces" / "sample-leak.etl", out=tmp_path / "ds") for a in args]
    out = subprocess.run([sys.executable, "-c", TEARDOWN_PROBE, "main", *argv], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == code, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "handler" and "teardown" not in lines
    if code == 0 and argv[0] == "pair":
        assert lines[0].startswith(f"{tmp_path / 'ds'}: 5,150 allocations")
    if code == 2:
        assert out.stderr.startswith("pooltrace: error:") and len(out.stderr.strip().splitlines()) == 1


def test_a_thread_still_running_is_joined_by_the_normal_exit(tmp_path):
    """Skipping the teardown would cut off a thread that still runs: then the process exits normally."""
    out = subprocess.run([sys.executable, "-c", TEARDOWN_PROBE, "thread", "--version"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert {"thread done", "handler", "teardown"} <= set(out.stdout.splitlines())
