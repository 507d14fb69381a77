"""LZXpress (MS-XCA plain LZ77) encoder: round trips through libfwnt and through a reference decoder
written here from the MS-XCA §2.4 description, plus checks of the exact length encodings."""

from __future__ import annotations

import random
import struct

import pyfwnt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace.etl.xpress import MAX_OFFSET, PYFWNT_MAX_MATCH, compress


def reference_decompress(src: bytes) -> bytes:
    """Plain LZ77 decoder following MS-XCA §2.4 step by step (independent of the encoder and libfwnt);
    also checks that every match points inside the output already produced."""
    out = bytearray()
    pos = 0
    flags = 0
    flag_count = 0
    nibble_pos = None
    while True:
        if flag_count == 0:
            flags = struct.unpack_from("<I", src, pos)[0]
            pos += 4
            flag_count = 32
        flag_count -= 1
        if not flags & (1 << flag_count):
            if pos == len(src):
                return bytes(out)
            out.append(src[pos])
            pos += 1
            continue
        if pos == len(src):
            return bytes(out)
        token = struct.unpack_from("<H", src, pos)[0]
        pos += 2
        length = token & 7
        offset = (token >> 3) + 1
        if length == 7:
            if nibble_pos is None:
                length = src[pos] & 0x0F
                nibble_pos = pos
                pos += 1
            else:
                length = src[nibble_pos] >> 4
                nibble_pos = None
            if length == 15:
                length = src[pos]
                pos += 1
                if length == 255:
                    length = struct.unpack_from("<H", src, pos)[0]
                    pos += 2
                    if length == 0:
                        length = struct.unpack_from("<I", src, pos)[0]
                        pos += 4
                    assert length >= 15 + 7
                    length -= 15 + 7
                length += 15
            length += 7
        length += 3
        assert offset <= len(out), "match reaches before the start of the output"
        start = len(out) - offset
        for k in range(length):
            out.append(out[start + k])


def roundtrip(data: bytes, **kw) -> bytes:
    packed = compress(data, **kw)
    assert reference_decompress(packed) == data
    if kw.get("max_match", PYFWNT_MAX_MATCH) is not None:
        assert pyfwnt.lzxpress_decompress(packed, len(data)) == data
    return packed


def record_like_bytes(n_bytes: int, seed: int = 7) -> bytes:
    """Pool + StackWalk records as a kernel buffer holds them (PERFINFO64 headers, 8-byte padding)."""
    rng = random.Random(seed)
    out = bytearray()
    ts = 1_000_000_000
    while len(out) < n_bytes:
        ts += rng.randint(1, 400)
        entry = 0xFFFF_A000_0000_0000 + rng.randrange(1 << 20) * 16
        out += struct.pack("<IHHqIIQQ", 0xC0110002, 40, 0x0E20, ts, 0x200, 0x6B61654C, 0x100, entry)
        n = rng.randint(3, 24)
        frames = [0xFFFF_F804_1200_0000 + rng.randrange(1 << 18) for _ in range(n)]
        out += struct.pack("<IHHqQII", 0xC0110002, 32 + 8 * n, 0x1820, ts + 1, ts, 4, rng.randint(100, 140))
        out += struct.pack(f"<{n}Q", *frames)
    return bytes(out)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"A",
        b"ab",
        b"abc",
        b"abcabcabc",
        bytes(range(256)),
        b"\xff" * 5,
        b"The quick brown fox jumps over the lazy dog. " * 50,
    ],
    ids=lambda d: f"{len(d)}B",
)
def test_roundtrip_small(data):
    roundtrip(data)


def test_empty_input_is_a_lone_terminating_flag_word():
    assert compress(b"") == b"\xff\xff\xff\xff"


def test_one_byte_is_flags_then_literal():
    # one literal (flag bit 31 = 0), the remaining 31 flag bits set to 1 to terminate
    assert compress(b"Z") == struct.pack("<I", 0x7FFFFFFF) + b"Z"


def test_random_bytes_roundtrip():
    data = random.Random(1).randbytes(100_000)
    packed = roundtrip(data)
    # incompressible: literal bytes plus one flag word per 32 items
    assert len(packed) <= len(data) + 4 * (len(data) // 32 + 2)


def test_record_bytes_roundtrip_and_shrink():
    data = record_like_bytes(200_000)
    packed = roundtrip(data)
    assert len(packed) < len(data) * 0.6


def test_repetitive_input_compresses_hard():
    data = b"PoolTag!" * 20_000
    packed = roundtrip(data)
    assert len(packed) < len(data) // 100


def test_long_matches_over_4096_bytes():
    block = random.Random(3).randbytes(5000)
    data = block * 6 + b"tail"
    packed = roundtrip(data)
    # the first copy is 5000 literals (+ a 4-byte flag word per 32); the five repeats at offset 5000 need
    # only a handful of matches, not another 25000 literals
    assert len(packed) < len(block) * 9 // 8 + 100


def test_repeat_farther_than_the_window_is_not_referenced():
    # the second copy is 10000 bytes back, beyond the 8192-byte window: it has to be literals
    block = random.Random(4).randbytes(10_000)
    packed = roundtrip(block + block)
    assert len(packed) > 2 * len(block)
    assert MAX_OFFSET == 8192


def test_matches_are_capped_for_libfwnt_by_default():
    data = b"a" * 200_001
    packed = roundtrip(data)
    # 200000 bytes of match in pieces of at most 32771: at least 7 matches
    assert len(packed) >= 4 + 1 + 7 * 2
    uncapped = roundtrip(data, max_match=None)
    assert len(uncapped) < len(packed)


def _first_match(packed: bytes) -> tuple[int, int, bytes]:
    """For compress(b'a' * (L + 1)): the token after flags + literal, and the bytes after it."""
    assert packed[4:5] == b"a"
    token = struct.unpack_from("<H", packed, 5)[0]
    return token >> 3, token & 7, packed[7:]


@pytest.mark.parametrize(
    ("length", "expect_tail"),
    [
        (3, b""),  # length - 3 in the token
        (9, b""),
        (10, bytes([0])),  # token 7, nibble = length - 10
        (24, bytes([14])),
        (25, bytes([15, 0])),  # nibble 15, byte = length - 25
        (279, bytes([15, 254])),
        (280, bytes([15, 255]) + struct.pack("<H", 277)),  # byte 255, u16 = length - 3
        (4099, bytes([15, 255]) + struct.pack("<H", 4096)),
        (PYFWNT_MAX_MATCH, bytes([15, 255]) + struct.pack("<H", PYFWNT_MAX_MATCH - 3)),
    ],
)
def test_length_encodings(length, expect_tail):
    data = b"a" * (length + 1)
    packed = roundtrip(data)
    offset_minus_1, low, tail = _first_match(packed)
    assert offset_minus_1 == 0
    assert low == min(length - 3, 7)
    assert tail == expect_tail


@pytest.mark.parametrize("length", [65538, 65539, 70_000, 300_000])
def test_16_and_32_bit_length_forms_uncapped(length):
    data = b"a" * (length + 1)
    packed = roundtrip(data, max_match=None)
    _, low, tail = _first_match(packed)
    assert low == 7
    assert tail[:2] == bytes([15, 255])
    if length - 3 <= 0xFFFF:
        assert tail[2:] == struct.pack("<H", length - 3)
    else:
        assert tail[2:] == struct.pack("<HI", 0, length - 3)


def test_uncapped_output_matches_dissect_decoder():
    lzxpress = pytest.importorskip("dissect.util.compression.lzxpress")
    data = b"x" * 100_000 + record_like_bytes(20_000) + b"\0" * 70_000
    assert lzxpress.decompress(compress(data, max_match=None)) == data


def test_two_long_matches_share_one_nibble_byte():
    # literal 'a', match(1, 20), literal 'b', match(1, 20): both lengths need the nibble (20 - 10 = 10)
    data = b"a" * 21 + b"b" * 21
    packed = roundtrip(data)
    flags = struct.unpack_from("<I", packed, 0)[0]
    assert flags >> 28 == 0b0101  # literal, match, literal, match
    assert packed[4:] == b"a" + struct.pack("<H", 7) + bytes([0xAA]) + b"b" + struct.pack("<H", 7)


def test_flag_words_every_32_items():
    data = bytes(range(40))  # 40 distinct bytes: 40 literals, two flag words
    packed = roundtrip(data)
    assert packed[:4] == b"\0\0\0\0"  # 32 literal flags
    assert packed[36:40] == struct.pack("<I", 0x00FFFFFF)  # 8 literals, then terminating 1-bits
    assert len(packed) == 4 + 32 + 4 + 8


def test_max_match_must_allow_a_match():
    with pytest.raises(ValueError):
        compress(b"abc", max_match=2)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4000))
def test_property_arbitrary_binary(data):
    roundtrip(data)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.binary(min_size=1, max_size=40), st.integers(min_value=1, max_value=300)),
        min_size=1,
        max_size=12,
    )
)
def test_property_repetitive(chunks):
    data = b"".join(chunk * times for chunk, times in chunks)
    roundtrip(data)
