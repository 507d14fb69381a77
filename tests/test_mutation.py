"""Robustness suite (issue 10 §6): seeded mutations of the shipped samples, their datasets and sidecars, and
odd paths, through every analysis command (info, pair, report in text/JSON/HTML/CSV, tags, diff, whose).
Every run must end with exit 0, 1 or 2 and no traceback, within bounded time and memory, and say so
wherever the input was damaged (tests/mutations.py defines the classes). Commands run in-process through
click's CliRunner; a few run as real subprocesses. The long version is benchmarks/mutation_campaign.py."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import pytest

from tests.mutations import FIRST_KINDS, KINDS, TRACE_KINDS, load_samples, make_case, run_case

CASES_PER_KIND = {"truncate": 6, "truncate-at-buffer": 5, "bit-flips": 5, "buffer-header": 8, "record-header": 5,
                  "compressed-data": 5, "logfile-header": 4, "dataset": 14, "sidecar": 8, "odd-path": 10,
                  "summary": 8}
SECONDS_PER_COMMAND = 20
MAX_RSS_MB = 1500
REPORT_NOTICES = True  # report/tags/diff (text, JSON, HTML, CSV) show trace.json warnings


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return load_samples(tmp_path_factory.mktemp("intact"))


def _seeds():
    for kind in KINDS:
        for k in range(CASES_PER_KIND[kind]):
            yield pytest.param(kind, 1000 * KINDS.index(kind) + k, id=f"{kind}-{k}")


@pytest.mark.parametrize(("kind", "seed"), list(_seeds()))
def test_mutated_input_never_crashes_hangs_or_passes_silently(samples, tmp_path, kind, seed):
    case = make_case(seed, samples, tmp_path, kinds=(kind,))
    cls, problems, runs = run_case(case, tmp_path, notices=REPORT_NOTICES)
    assert cls in ("ok", "bad-input") and not problems, f"{case.kind}: {case.label}: {problems}"
    for r in runs:
        assert r.seconds < SECONDS_PER_COMMAND, (case.label, r.args, r.seconds)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 < MAX_RSS_MB


@pytest.mark.parametrize("kind", ["truncate", "buffer-header", "compressed-data"])
def test_as_a_real_process(samples, tmp_path, kind):
    """A few cases through the installed entry point: exit codes and stderr as a shell sees them."""
    case = make_case(7, samples, tmp_path, kinds=(kind,))
    for args in (["info", str(case.trace)], ["report", str(case.trace), "--format", "json"]):
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "pooltrace", *args], capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "100"})
        assert time.monotonic() - t0 < 60
        assert p.returncode in (0, 2) and "Traceback" not in p.stderr, (case.label, p.stderr)
        if p.returncode == 2:
            assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("pooltrace: error:")


def test_the_case_mix_covers_every_kind():
    assert set(CASES_PER_KIND) == set(KINDS) and set(TRACE_KINDS) < set(KINDS)


@pytest.mark.parametrize(("seed", "kinds"), [(7188, FIRST_KINDS), (12068, FIRST_KINDS), (13185, FIRST_KINDS),
                                            (14175, FIRST_KINDS), (70567, KINDS), (90011, KINDS), (90223, KINDS),
                                            (101447, KINDS)])
def test_campaign_findings_stay_fixed(samples, tmp_path, seed, kinds):
    """Seeds the long campaign (benchmarks/mutation_campaign.py) found, replayed with the case kinds the
    campaign drew from then. 7188: a compressed buffer's fill size shrunk to a point whose bound fell
    inside an LZXpress match; the records past it were dropped in silence. 12068, 13185, 14175: bits
    flipped in a dataset's allocations.parquet gave stack ids past the stacks, used by the streamed report
    before they were checked (a traceback). 70567: allocations.parquet's fate and tag columns swapped; `whose`
    parsed 'freed' as a pool tag (a traceback). 90011: bits flipped in summary.npz made zipfile raise
    NotImplementedError (a zip version it does not implement), not caught by the summary's reader (a traceback).
    90223: a flipped bit in a record's time made the trace's duration larger than int64; `pair`'s summary scan
    binned with it (an OverflowError traceback) where write_summary refuses the trace.json (one line, exit 2).
    101447: a flipped bit in a compressed buffer's stream made the walk land on an end-of-buffer marker with
    617 records after it, dropped in silence."""
    case = make_case(seed, samples, tmp_path, kinds=kinds)
    cls, problems, _runs = run_case(case, tmp_path, notices=REPORT_NOTICES)
    assert cls in ("ok", "bad-input") and not problems, f"{case.kind}: {case.label}: {problems}"
