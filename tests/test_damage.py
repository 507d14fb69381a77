"""Damage in a trace is bounded and said: decompression never grows past a buffer's declared size, and
records hidden behind a damaged fill size (buffer header 0x30) are reported, not silently dropped."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from pooltrace.etl import xpress
from pooltrace.etl.buffers import FLAG_COMPRESSED, decompress, scan_buffers
from tests.conftest import ROOT, read_all

TRACES = ROOT / "traces"
SHIPPED = sorted(TRACES.glob("*.etl"))

# literal "a", then a match one byte back whose 32-bit length form says 4 GiB
BOMB = struct.pack("<I", 0x40000000) + b"a" + struct.pack("<HBBHI", 7, 0x0F, 255, 0, 0xFFFFFFFF)


def test_bounded_decoder_round_trips_every_length_form():
    data = b"\x00" * 70_000 + bytes(range(256)) * 30 + b"x" * 300 + b"end"
    assert xpress.decompress(xpress.compress(data, max_match=None), len(data)) == data


def test_bounded_decoder_stops_at_the_declared_size():
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="past the declared 4096 bytes"):
            xpress.decompress(BOMB, 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert xpress.decompress(BOMB, 100, prefix=True) == b"a" * 100


@pytest.mark.parametrize("stream", [b"", b"\x00\x00\x00\x00", struct.pack("<I", 0x80000000) + b"\x08\x00"])
def test_bounded_decoder_rejects_short_and_backward_streams(stream):
    with pytest.raises(ValueError):
        xpress.decompress(stream, 64)


def test_buffer_decompression_of_a_bomb_is_an_error_not_gigabytes():
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="corrupt|decompressed to"):
        decompress(BOMB, 65_000, 3)
    assert time.monotonic() - t0 < 2


def test_fallback_decoder_is_bounded_too(monkeypatch):
    """The path `sample-leak-fixed.etl` with `ff 00 00 00` at offset 9736 took (2.5 GB before the bound):
    libfwnt refuses the stream and the fallback decoder must stop at the declared size."""
    import pooltrace.etl.buffers as buffers

    def refuse(stream, size):
        raise OSError("libfwnt refused")

    monkeypatch.setitem(buffers.DECOMPRESSORS, 3, ("LZXpress", refuse))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="corrupt .*past the declared 65000 bytes"):
            decompress(BOMB, 65_000, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def _compressed_buffers(data: bytes) -> list[tuple[int, int, int]]:
    idx = scan_buffers(data)
    return [(int(idx.offset[i]), int(idx.size[i]), int(idx.filled[i])) for i in range(len(idx))
            if idx.flags[i] & FLAG_COMPRESSED]


def _shipped_compressed():
    for p in SHIPPED:
        if _compressed_buffers(p.read_bytes()):
            return p
    pytest.skip("no shipped sample with compressed buffers")


def test_a_decompression_bomb_inside_a_trace_is_skipped_and_said(tmp_path):
    src = _shipped_compressed()
    data = bytearray(src.read_bytes())
    off, _size, _filled = _compressed_buffers(bytes(data))[0]
    data[off + 0x48: off + 0x48 + len(BOMB)] = BOMB
    bad = tmp_path / "bomb.etl"
    bad.write_bytes(bytes(data))
    t0 = time.monotonic()
    r = CliRunner().invoke(cli, ["info", "--format", "json", str(bad)])
    assert time.monotonic() - t0 < 10
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["lost"]["buffers_skipped"] == 1
    assert any("corrupt" in w for w in d["warnings"])
    assert "DAMAGED" in d["verdict"]


@pytest.mark.parametrize("src", SHIPPED, ids=lambda p: p.name)
def test_shrunk_fill_size_is_reported_as_damage(tmp_path, src):
    data = src.read_bytes()
    reader, _, _ = read_all(src)
    whole = reader.stats.records
    assert reader.stats.warnings == []
    idx = scan_buffers(data)
    victim = len(idx) // 2
    off = int(idx.offset[victim])
    bad = bytearray(data)
    struct.pack_into("<I", bad, off + 0x30, 0x48)
    path = tmp_path / src.name
    path.write_bytes(bytes(bad))
    reader, _, _ = read_all(path)
    lost = whole - reader.stats.records
    assert lost > 0
    assert len(reader.stats.warnings) == 1
    assert f"buffer {victim} at offset 0x{off:x} is damaged: {lost} records" in reader.stats.warnings[0]
    assert reader.stats.bytes_skipped > 0
    r = CliRunner().invoke(cli, ["info", "--format", "json", str(path)])
    d = json.loads(r.output)
    assert "DAMAGED" in d["verdict"] and f"{lost} records" in d["verdict"]
    r = CliRunner().invoke(cli, ["pair", str(path), "-o", str(tmp_path / "ds")])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "ds" / "trace.json").read_text())
    assert any(f"{lost} records" in w for w in meta["warnings"])
    assert meta["pairing"]["bytes_skipped"] > 0


@pytest.mark.parametrize("src", SHIPPED, ids=lambda p: p.name)
def test_intact_buffers_have_no_hidden_records(src):
    reader, _, _ = read_all(src)
    assert reader.stats.warnings == [] and reader.stats.bytes_skipped == 0


def test_real_samples_have_no_hidden_records(samples):
    for path in sorted(samples.glob("*.etl")):
        reader, _, _ = read_all(path)
        assert not any("follow the end its header gives" in w for w in reader.stats.warnings), path


def test_a_trace_truncated_inside_a_buffer_reads_its_complete_records_and_counts_the_rest(tmp_path):
    # `head -c 100000 sample-leak.etl`: the logfile header survives, the first event buffer is cut short.
    # The records wholly inside the bytes present are read; the cut one is counted in bytes_skipped.
    from pooltrace.etl.buffers import BufferSource
    from pooltrace.etl.records import Chunk, _next_slots, walk

    full = (TRACES / "sample-leak.etl").read_bytes()
    cut = 100_000
    idx = scan_buffers(full)
    b = int(np.searchsorted(idx.offset, cut, "right")) - 1
    off, filled = int(idx.offset[b]), int(idx.filled[b])
    if b == 0 or idx.flags[b] & FLAG_COMPRESSED or filled <= cut - off:
        pytest.skip("the cut does not fall inside the filled part of an uncompressed event buffer")
    source = BufferSource(full, idx)
    chunk = Chunk([source.area(b)], [0])
    before = len(walk(Chunk([source.area(i) for i in range(b)], [0] * b))[0])  # records of the whole buffers
    slots = walk(chunk)[0]
    ends = _next_slots(chunk)[slots] * 8  # where each record of the intact buffer ends
    room = cut - off - 0x48
    whole = int((ends <= room).sum())
    path = tmp_path / "cut.etl"
    path.write_bytes(full[:cut])
    r = CliRunner().invoke(cli, ["info", "--format", "json", str(path)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["records"] == before + whole
    assert d["lost"]["bytes_skipped"] == room - int(ends[whole - 1]) > 0
    assert any(f"the {whole} complete records present in it were read" in w for w in d["warnings"])
    assert "user-mode" not in d["verdict"] and "DAMAGED" in d["verdict"]


def test_a_trace_cut_inside_a_compressed_buffer_counts_the_bytes_present(tmp_path):
    src = next((p for p in SHIPPED if any(f & FLAG_COMPRESSED for f in scan_buffers(p.read_bytes()).flags[1:])), None)
    if src is None:
        pytest.skip("no shipped sample with compressed buffers")
    full = src.read_bytes()
    idx = scan_buffers(full)
    b = next(i for i in range(1, len(idx)) if idx.flags[i] & FLAG_COMPRESSED)
    cut = int(idx.offset[b]) + int(idx.size[b]) // 2
    path = tmp_path / "cut.etl"
    path.write_bytes(full[:cut])
    d = json.loads(CliRunner().invoke(cli, ["info", "--format", "json", str(path)]).output)
    assert d["lost"]["bytes_skipped"] == cut - int(idx.offset[b])
    assert any("that buffer was skipped" in w for w in d["warnings"]) and "DAMAGED" in d["verdict"]


def _uncompressed_buffer(folder: Path) -> tuple[Path, bytearray, int, int, np.ndarray, list]:
    """The first shipped sample (in `folder`) with an uncompressed data buffer: its path, its bytes, that
    buffer's file offset and filled size, and the walk of its records (record starts in 8-byte slots from
    the data area, problems found). Skips the test when every sample's data buffers are compressed."""
    from pooltrace.etl.records import Chunk, walk

    src = next((folder / p.name for p in SHIPPED
                if not all(f & FLAG_COMPRESSED for f in scan_buffers(p.read_bytes()).flags[1:])), None)
    if src is None:
        pytest.skip("no shipped sample with uncompressed data buffers")
    data = bytearray(src.read_bytes())
    idx = scan_buffers(bytes(data))
    i = next(i for i in range(1, len(idx)) if not idx.flags[i] & FLAG_COMPRESSED)
    off, filled = int(idx.offset[i]), int(idx.filled[i])
    slots, _, problems = walk(Chunk([bytes(data[off + 0x48: off + filled])], [0]))
    return src, data, off, filled, slots, problems


def test_a_record_dropped_for_inconsistent_sizes_is_a_warning(tmp_path):
    """Mutation campaign seed 1200: a SYSTEM header's version word set to 0xffff claims 8 extension slots,
    so header and payload sizes disagree and the record is dropped: that loss must be said."""
    _src, data, off, _filled, slots, _ = _uncompressed_buffer(TRACES)
    at = off + 0x48 + 8 * int(slots[len(slots) // 2])
    assert data[at + 2] in (1, 2)  # a SYSTEM header: its first u16 is the version word
    struct.pack_into("<H", data, at, 0xFFFF)
    path = tmp_path / "t.etl"
    path.write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["info", "--format", "json", str(path)])
    d = json.loads(r.output)
    assert any("record(s) dropped" in w for w in d["warnings"]) and "DAMAGED" in d["verdict"]


def test_a_record_size_grown_over_the_records_after_it_is_damage(tmp_path):
    """Mutation campaign seed 2781: a record's Size grown so that it covers the next records (0x38 ->
    0x1038) made the walk step over them in silence. The records hidden inside the claimed size still form
    a valid chain to where the walk goes on: they are counted, warned about and info says DAMAGED."""
    from pooltrace.etl.records import SYSLIKE_LUT

    src, data, off, _filled, slots, problems = _uncompressed_buffer(TRACES)
    before = json.loads(CliRunner().invoke(cli, ["info", "--format", "json", str(src)]).output)
    assert not problems
    base = off + 0x48
    j = next(j for j in range(len(slots) // 2, len(slots) - 10) if SYSLIKE_LUT[data[base + 8 * int(slots[j]) + 2]])
    at = off + 0x48 + 8 * int(slots[j])
    struct.pack_into("<H", data, at + 4, 8 * int(slots[j + 10] - slots[j]))  # Size now ends where record j+10 starts
    path = tmp_path / "t.etl"
    path.write_bytes(bytes(data))
    d = json.loads(CliRunner().invoke(cli, ["info", "--format", "json", str(path)]).output)
    hidden = 8 * int(slots[j + 10] - slots[j + 1])
    assert any(f"runs over 9 valid record(s) ({hidden} bytes)" in w for w in d["warnings"]), d["warnings"]
    assert "DAMAGED" in d["verdict"] and d["lost"]["bytes_skipped"] == before["lost"]["bytes_skipped"] + hidden


def test_the_swallowed_record_check_leaves_intact_traces_alone():
    from pooltrace.etl.buffers import BufferSource
    from pooltrace.etl.records import Chunk, walk

    for p in SHIPPED:
        data = p.read_bytes()
        idx = scan_buffers(data)
        src = BufferSource(data, idx)
        chunk = Chunk([src.area(i) for i in range(1, len(idx))], [0] * (len(idx) - 1))
        assert not walk(chunk)[2], p.name


# A fill size (buffer header 0x30) cut anywhere: at a record start, 1..8 bytes into a record, in the middle of
# one, to the data area's start. Whatever is lost is counted (records and bytes) and said; nothing goes silently.
FILL_CUTS = {"record-start": 0, "1-byte-in": 1, "4-bytes-in": 4, "8-bytes-in": 8, "mid-record": None}


def _cut_buffer(data: bytes, victim: int) -> tuple[int, int, int, list[int], list[int]]:
    """(file offset, intact data area length, compressed flag, record starts, record ends) of a buffer."""
    from pooltrace.etl.buffers import BufferSource
    from pooltrace.etl.records import Chunk, _next_slots, walk

    idx = scan_buffers(data)
    area = BufferSource(data, idx).area(victim)
    chunk = Chunk([area], [0])
    slots = walk(chunk)[0]
    ends = (_next_slots(chunk)[slots] * 8).tolist()
    return int(idx.offset[victim]), len(area), int(idx.flags[victim] & FLAG_COMPRESSED), (slots * 8).tolist(), ends


@pytest.mark.parametrize("cut", FILL_CUTS)
@pytest.mark.parametrize("name", [p.name for p in SHIPPED])
def test_a_fill_size_cut_anywhere_counts_and_says_every_record_lost(shipped, tmp_path, name, cut):
    src = shipped / name
    data = src.read_bytes()
    whole = read_all(src)[0].stats.records
    victim = len(scan_buffers(data)) // 2
    off, n, _compressed, starts, ends = _cut_buffer(data, victim)
    j = len(starts) // 2
    into = FILL_CUTS[cut] if FILL_CUTS[cut] is not None else (ends[j] - starts[j]) // 2
    assert into < ends[j] - starts[j]
    fill = 0x48 + starts[j] + into
    bad = bytearray(data)
    struct.pack_into("<I", bad, off + 0x30, fill)
    path = tmp_path / name
    path.write_bytes(bytes(bad))
    reader, _, _ = read_all(path)
    said = [w for w in reader.stats.warnings if f"buffer {victim} at offset 0x{off:x} is damaged:" in w]
    assert len(said) == 1 and f"(filled size {fill})" in said[0], reader.stats.warnings
    lost = int(said[0].split("is damaged: ")[1].split()[0])
    assert reader.stats.records + lost == whole and lost == len(starts) - j
    # bytes: from the first record not wholly inside the fill to the end of the data (its padding aside)
    assert 0 <= ((n + 7) & ~7) - starts[j] - reader.stats.bytes_skipped < 8


def test_campaign_seed_7188_fill_size_shrunk_in_a_compressed_buffer_is_said_everywhere(shipped, tmp_path):
    """Mutation campaign seed 7188: sample-leak-fixed.etl buffer 10's fill size 0xffd0 -> 0xe0. The bound
    just past 0xe0 fell inside an LZXpress match, libfwnt refused it, and the check for records past the
    fill end never saw them: 945 records were dropped with exit 0 and no warning in any command."""
    src = shipped / "sample-leak-fixed.etl"
    data = src.read_bytes()
    idx = scan_buffers(data)
    victim = 10
    assert idx.flags[victim] & FLAG_COMPRESSED and idx.filled[victim] > 0xE0
    off, n, _compressed, starts, _ends = _cut_buffer(data, victim)
    lost = sum(s >= 0xE0 - 0x48 for s in starts)
    bad = bytearray(data)
    struct.pack_into("<I", bad, off + 0x30, 0xE0)
    path = tmp_path / "seed7188.etl"
    path.write_bytes(bytes(bad))
    runner = CliRunner()
    d = json.loads(runner.invoke(cli, ["info", "--format", "json", str(path)]).output)
    said = f"buffer {victim} at offset 0x{off:x} is damaged: {lost} records"
    assert d["records"] + lost == read_all(src)[0].stats.records
    assert any(said in w for w in d["warnings"]) and "DAMAGED" in d["verdict"]
    assert d["lost"]["bytes_skipped"] == n - (0xE0 - 0x48)
    r = runner.invoke(cli, ["pair", str(path), "-o", str(tmp_path / "ds")])
    assert r.exit_code == 0, r.output
    assert any(said in w for w in json.loads((tmp_path / "ds" / "trace.json").read_text())["warnings"])
    rep = runner.invoke(cli, ["report", str(tmp_path / "ds"), "--format", "json"])
    assert any(said in w for w in json.loads(rep.output)["warnings"])
    text = runner.invoke(cli, ["tags", str(tmp_path / "ds")], env={"COLUMNS": "400"}).output
    assert said in " ".join(text.split())


@pytest.mark.parametrize("fill", [0, 0x20, 0x47, "past", 0xFFFFFFFF])
@pytest.mark.parametrize("name", [p.name for p in SHIPPED])
def test_an_impossible_or_grown_fill_size_is_said(shipped, tmp_path, name, fill):
    """A fill size inside the buffer header or past the buffer: the buffer is skipped, and its records are
    counted and said as lost (they follow the end the header gives). A compressed buffer's fill grown past
    what its stream holds: the buffer is skipped and said (its compressed bytes counted)."""
    src = shipped / name
    data = src.read_bytes()
    whole = read_all(src)[0].stats.records
    idx = scan_buffers(data)
    victim = len(idx) // 2
    off = int(idx.offset[victim])
    compressed = bool(idx.flags[victim] & FLAG_COMPRESSED)
    value = fill if fill != "past" else int(idx.filled[victim] if compressed else idx.size[victim]) + 8
    bad = bytearray(data)
    struct.pack_into("<I", bad, off + 0x30, value)
    path = tmp_path / name
    path.write_bytes(bytes(bad))
    reader, _, _ = read_all(path)
    if compressed and fill == "past":
        assert reader.stats.buffers_skipped == 1 and reader.stats.bytes_skipped == int(idx.size[victim])
        assert any(f"buffer {victim} at offset 0x{off:x} skipped: " in w for w in reader.stats.warnings)
        return
    assert any(f"impossible fill size {value}" in w for w in reader.stats.warnings)
    said = [w for w in reader.stats.warnings if "is damaged:" in w]
    lost = int(said[0].split("is damaged: ")[1].split()[0])
    assert reader.stats.records + lost == whole and reader.stats.bytes_skipped > 0


def test_a_record_size_grown_past_the_fill_end_is_not_taken_for_a_shrunk_fill(shipped, tmp_path):
    """A damaged record Size that runs past the fill end makes the walk stop there too; with nothing valid
    where that size says the next record is, no records are claimed to follow the end (the walk's own
    warning says the damage)."""
    _src, data, off, filled, slots, _ = _uncompressed_buffer(shipped)
    at = off + 0x48 + 8 * int(slots[-2])
    assert data[at + 2] in (1, 2)  # a SYSTEM header: Size at +4
    struct.pack_into("<H", data, at + 4, filled - 0x48 - 8 * int(slots[-2]) + 0x23)  # into the 0xFF tail, unaligned
    path = tmp_path / "t.etl"
    path.write_bytes(bytes(data))
    reader, _, _ = read_all(path)
    assert any("runs past the buffer's filled end" in w for w in reader.stats.warnings), reader.stats.warnings
    assert not any("follow the end its header gives" in w for w in reader.stats.warnings)
