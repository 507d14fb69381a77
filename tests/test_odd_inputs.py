"""Inputs a trace can be but should not be: a named pipe or device (refused before open, never a hang), a
damaged clock frequency in the logfile header, a very long trace name, an oversized declared buffer fill.
Each is exit 0 with a warning or exit 2 with one line, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from pooltrace.etl.buffers import FLAG_COMPRESSED, scan_buffers
from pooltrace.etl.logfile import LogfileHeader
from pooltrace.etl.reader import EtlReader
from tests.conftest import ROOT

SAMPLE = ROOT / "traces" / "sample-leak-fixed.etl"
TRACE_COMMANDS = [["info"], ["pair"], ["report"], ["report", "--format", "json"], ["tags"]]


def one_line_error(r, *words):
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pooltrace: error:"), r.output
    for w in words:
        assert w in lines[0], r.output


@pytest.mark.parametrize("args", TRACE_COMMANDS + [["diff", "{p}"], ["whose", "Leak", "--no-scan"]],
                         ids=lambda a: " ".join(a))
def test_a_named_pipe_is_refused_before_open(tmp_path, args):
    fifo = tmp_path / "t.etl"
    os.mkfifo(fifo)
    argv = [a.replace("{p}", str(fifo)) for a in args]
    argv = argv[:1] + [str(fifo)] + argv[1:] if argv[0] != "whose" else ["whose", "Leak", str(fifo), "--no-scan"]
    r = CliRunner().invoke(cli, argv)  # a blocking open() would hang here
    one_line_error(r, str(fifo), "not a regular file")


def test_a_character_device_is_refused():
    r = CliRunner().invoke(cli, ["info", "/dev/zero"])
    one_line_error(r, "/dev/zero", "not a regular file (a character device)")


def _perf_freq_offset(data: bytes) -> int:
    """File offset of PerfFreq in the logfile header (etl-format.md §1.5), found from the parsed header."""
    with EtlReader(SAMPLE) as r:
        freq = r.header.perf_freq
    payload = 0x48 + 0x20  # first buffer's header, then the SYSTEM header of the hook-0 record
    off = payload + 0xF8 + 8
    assert struct.unpack_from("<q", data, off)[0] == freq
    return off


@pytest.mark.parametrize("freq", [1, 0, -1, 1 << 62])
def test_a_damaged_clock_frequency_is_a_warning_not_an_overflow(tmp_path, freq):
    data = bytearray(SAMPLE.read_bytes())
    struct.pack_into("<q", data, _perf_freq_offset(bytes(data)), freq)
    path = tmp_path / "t.etl"
    path.write_bytes(bytes(data))
    for args in TRACE_COMMANDS:
        r = CliRunner().invoke(cli, [args[0], str(path), *args[1:]])
        assert r.exit_code == 0 and r.exception is None, (args, r.output, r.exception)
    r = CliRunner().invoke(cli, ["info", "--format", "json", str(path)])
    d = json.loads(r.output)
    assert d["clock"]["ticks_per_second"] is None
    assert any("implausible QPC frequency" in w for w in d["warnings"]) and "DAMAGED" in d["verdict"]


def test_clock_frequency_bounds():
    h = LogfileHeader(*([0] * 21))
    h.clock_type = 1
    for freq, ok in ((999, False), (1_000, True), (10_000_000, True), (100_000_000_000, True), (10**11 + 1, False)):
        h.perf_freq = freq
        assert (h.ticks_per_second == freq) is ok and (h.clock_problem is None) is ok


@pytest.mark.parametrize("length", [244, 251])
def test_a_very_long_trace_name(tmp_path, length):
    """244: the temporary directory's name was too long; 251: the cache `<stem>.pooltrace` itself is (report
    and whose analyze in a temporary directory instead, pair says it cannot create the dataset)."""
    path = tmp_path / ("a" * (length - 4) + ".etl")
    shutil.copyfile(SAMPLE, path)
    for args in [*TRACE_COMMANDS, ["diff", str(path)], ["whose"]]:
        argv = ["whose", "Leak", str(path), "--no-scan", "--no-symbols"] if args[0] == "whose" else \
            [args[0], str(path), *args[1:]]
        r = CliRunner().invoke(cli, argv)
        if args[0] == "pair" and length > 246:
            one_line_error(r, "cannot create the dataset directory", "File name too long")
        else:
            assert r.exit_code == 0 and r.exception is None, (args, r.output, r.exception)


def test_a_compressed_fill_size_beyond_the_loggers_buffers_is_not_allocated(tmp_path):
    data = bytearray(SAMPLE.read_bytes())
    idx = scan_buffers(bytes(data))
    victims = [int(idx.offset[i]) for i in range(len(idx)) if idx.flags[i] & FLAG_COMPRESSED]
    if not victims:
        pytest.skip("no compressed buffer in the sample")
    for off in victims:
        struct.pack_into("<I", data, off + 0x30, 60 << 20)  # 60 MB each, under the 64 MB sanity bound
    path = tmp_path / "t.etl"
    path.write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["info", "--format", "json", str(path)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["lost"]["buffers_skipped"] == len(victims)
    assert any("larger than the logger's buffers" in w for w in d["warnings"])


@pytest.mark.parametrize("command", [["info"], ["pair"], ["report"], ["tags"]])
def test_a_symlink_loop_is_one_line(tmp_path, command):
    loop = tmp_path / "loop.etl"
    loop.symlink_to(loop)
    r = CliRunner().invoke(cli, [command[0], str(loop)])
    assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert "Traceback" not in r.output and str(loop) in r.output


def test_growth_of_a_block_freed_before_the_window_starts():
    """Damaged times (a free earlier than the window start for a block allocated inside it) bin at the start."""
    import numpy as np

    from pooltrace.growth import growth_table

    null = np.iinfo(np.int64).min
    out = growth_table(np.array([500, 600], np.int64), np.array([100, null], np.int64), np.array([64, 32], np.uint64),
                       np.array([0, 0], np.int64), 1, 200, 1200, null)
    assert len(out) == 1
