"""Bad input never crashes: a one-line error with exit code 2, or a partial result whose warnings name
what was skipped. Never a traceback, never a hang."""

from __future__ import annotations

import json
import random
import struct
import zlib

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pooltrace.cli import cli
from pooltrace.errors import TraceError
from pooltrace.etl.reader import EtlReader
from pooltrace.etl.writer import TraceWriter
from tests.conftest import read_all


def small_trace(compressed=False, n=400, cpus=2) -> bytes:
    rng = random.Random(3)
    w = TraceWriter(pointer_size=8, cpus=cpus, compressed=compressed, buffer_size=0x1000)
    ts = w.start_qpc
    for i in range(n):
        ts += 5
        cpu = i % cpus
        w.pool(cpu, ts, 0x0E20, 0, "Leak", 64, 0xFFFF000000000000 + 64 * i, tid=8, pid=4)
        w.stack(cpu, ts, ts, 4, 8, [rng.randrange(1 << 64) for _ in range(12)])
    return w.to_bytes()


def buffer_offsets(data: bytes) -> list[int]:
    offs, off = [], 0
    while off + 0x48 <= len(data):
        offs.append(off)
        off += struct.unpack_from("<I", data, off)[0]
    return offs


def run_info(path):
    result = CliRunner().invoke(cli, ["info", "--format", "json", str(path)])
    assert "Traceback" not in result.output
    return result


def assert_one_line_error(result, text):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pooltrace: error:") and text in lines[0], result.output


def png_bytes() -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


@pytest.mark.parametrize(("content", "text"), [
    (b"", "empty file"),
    (random.Random(1).randbytes(1 << 20), "not an .etl trace"),
    (png_bytes(), "not an .etl trace"),
    (b"\x00" * 4096, "not an .etl trace"),
])
def test_foreign_files(tmp_path, content, text):
    path = tmp_path / "x.etl"
    path.write_bytes(content)
    assert_one_line_error(run_info(path), text)


def test_missing_file_and_directory(tmp_path):
    assert_one_line_error(run_info(tmp_path / "nope.etl"), "cannot open")
    result = run_info(tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_truncated_inside_header_buffer(tmp_path):
    path = tmp_path / "t.etl"
    path.write_bytes(small_trace()[:0x400])
    assert_one_line_error(run_info(path), "truncated inside buffer 0")


@pytest.mark.parametrize("compressed", [False, True])
def test_truncated_at_a_buffer_boundary(tmp_path, compressed):
    data = small_trace(compressed)
    offs = buffer_offsets(data)
    path = tmp_path / "t.etl"
    path.write_bytes(data[:offs[len(offs) // 2]])
    result = run_info(path)
    assert result.exit_code == 0
    d = json.loads(result.output)
    assert any("file is truncated" in w for w in d["warnings"])
    assert 0 < d["events"]["pool_alloc"] < 400


@pytest.mark.parametrize("compressed", [False, True])
def test_truncated_inside_a_data_buffer(tmp_path, compressed):
    data = small_trace(compressed)
    offs = buffer_offsets(data)
    cut = offs[len(offs) // 2] + 0x60
    path = tmp_path / "t.etl"
    path.write_bytes(data[:cut])
    result = run_info(path)
    assert result.exit_code == 0
    d = json.loads(result.output)
    assert any(f"file truncated inside buffer {len(offs) // 2}" in w for w in d["warnings"])
    assert 0 < d["events"]["pool_alloc"] < 400


def test_corrupt_buffer_size_field(tmp_path):
    data = bytearray(small_trace())
    offs = buffer_offsets(bytes(data))
    k = len(offs) // 2
    struct.pack_into("<I", data, offs[k], 5)
    path = tmp_path / "t.etl"
    path.write_bytes(bytes(data))
    reader, tables, _ = read_all(path)
    assert any("corrupt buffer header" in w for w in reader.stats.warnings)
    assert 0 < tables["pool"].num_rows < 400


def test_corrupt_compressed_buffer_is_skipped_and_named(tmp_path):
    data = bytearray(small_trace(compressed=True))
    offs = buffer_offsets(bytes(data))
    k = len(offs) // 2
    data[offs[k] + 0x48: offs[k] + 0x68] = b"\xff" * 32
    path = tmp_path / "t.etl"
    path.write_bytes(bytes(data))
    reader, tables, _ = read_all(path)
    st_ = reader.stats
    assert st_.buffers_skipped == 1 and any(f"buffer {k} at offset" in w for w in st_.warnings)
    assert 0 < tables["pool"].num_rows < 400
    d = json.loads(run_info(path).output)
    assert d["lost"]["buffers_skipped"] == 1 and "unreadable" in d["verdict"]


def test_corrupt_record_size_inside_a_buffer(tmp_path):
    data = bytearray(small_trace())
    offs = buffer_offsets(bytes(data))
    rec = offs[2] + 0x48 + 56 + 8 * 4 + 8 * 12  # third record of the buffer (pool 56 bytes, stack 128)
    struct.pack_into("<H", data, rec + 4, 3)
    path = tmp_path / "t.etl"
    path.write_bytes(bytes(data))
    reader, tables, _ = read_all(path)
    assert reader.stats.bytes_skipped > 0
    assert any("record header not valid" in w for w in reader.stats.warnings)
    assert 300 < tables["pool"].num_rows < 400


def test_events_lost_flag_and_header_counts_are_reported(tmp_path):
    w = TraceWriter(pointer_size=8, cpus=1, events_lost=17, buffers_lost=2, buffer_size=0x400)
    for i in range(50):
        w.pool(0, w.start_qpc + i, 0x0E20, 0, "Leak", 8, 0x1000 + i * 16)
    w.flag_buffer(0, 0, 0x2)
    w.flag_buffer(0, 1, 0x4)
    path = tmp_path / "l.etl"
    w.save(path)
    d = json.loads(run_info(path).output)
    assert d["lost"] | {"malformed_records": {}} == {
        "events_lost": 17, "buffers_lost": 2, "buffers_flagged_events_lost": 1, "buffers_flagged_buffer_lost": 1,
        "buffers_skipped": 0, "bytes_skipped": 0, "malformed_records": {}}
    assert "17 events and 2 buffers lost" in d["verdict"]


def test_unused_space_after_the_last_buffer(tmp_path):
    path = tmp_path / "p.etl"
    path.write_bytes(small_trace() + b"\x00" * 70000)
    reader, tables, _ = read_all(path)
    assert reader.stats.warnings == [] and tables["pool"].num_rows == 400


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=12),
       st.booleans(), st.integers(0, 10**9))
def test_random_corruption_never_crashes(edits, compressed, cut):
    data = bytearray(SMALL[compressed])
    for pos, val in edits:
        data[pos % len(data)] = val
    data = bytes(data[: max(1, cut % (len(data) + 1))])
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".etl") as fh:
        fh.write(data)
        fh.flush()
        try:
            reader = EtlReader(fh.name)
        except TraceError:
            return
        for _ in reader.batches():
            pass
        reader.close()


SMALL = {False: small_trace(False, n=120), True: small_trace(True, n=120)}
