"""Plain LZ77 "LZXpress" (MS-XCA §2.3, ``COMPRESSION_FORMAT_XPRESS`` = 3): an encoder, and a decoder bounded
by the declared output size.

Windows relogged/merged .etl files store each data buffer's record area compressed with this format
(etl-format.md §1.8). pooltrace only ever *decompresses* real traces (with libfwnt-python); this encoder
exists so that tests, benchmarks and sample traces can contain compressed buffers too. It is a plain
greedy compressor with a hash-chain match finder: correct and reasonably small output, not the best
ratio or speed.

Stream format, as produced here:

* A 32-bit little-endian flag word precedes each group of up to 32 items; the item for bit 31 comes
  first. Bit 0 means "one literal byte", bit 1 means "a match".
* A match is a 16-bit word ``(offset - 1) << 3 | min(length - 3, 7)``: offsets 1..8192, lengths >= 3.
  When the 3-bit field is 7 the length continues in a 4-bit nibble; two consecutive long matches share
  one nibble byte (the first match writes the byte and uses its low half, the next one fills the high
  half). A nibble of 15 continues in one more byte; a byte of 255 continues in a 16-bit word holding
  ``length - 3``, and a 16-bit zero continues in a 32-bit word holding ``length - 3``.
* After the last item the current flag word is completed with 1-bits, so a decoder that stops on "a
  match flag at the end of input" terminates.

Match length limit: MS-XCA allows matches of any length (hence the 32-bit form), but libfwnt's decoder
(``pyfwnt.lzxpress_decompress``, which pooltrace uses) rejects matches longer than 32771 bytes and does not
implement the 32-bit form. ``compress`` therefore caps matches at :data:`PYFWNT_MAX_MATCH` by default;
pass ``max_match=None`` for unbounded matches (every MS-XCA length form, for decoders that follow the
specification fully, e.g. ``dissect.util.compression.lzxpress``).
"""

from __future__ import annotations

import struct

__all__ = ["compress", "decompress", "MAX_OFFSET", "MIN_MATCH", "PYFWNT_MAX_MATCH"]

MIN_MATCH = 3
MAX_OFFSET = 8192  # 13 bits of (offset - 1)
PYFWNT_MAX_MATCH = 32771  # longest match libfwnt decodes (its length counter is 16 bits, checked <= 32771)
_CHAIN_DEPTH = 24  # candidates examined per position (greedy; more only improves the ratio a little)
_GOOD_ENOUGH = 258  # stop searching the chain once a match this long is found
_INSERT_LIMIT = 64  # positions inside a match that are added to the hash chains (head of the match)


def _common_length(data: bytes, a: int, b: int, limit: int) -> int:
    """Length of the common prefix of ``data[a:]`` and ``data[b:]``, at most ``limit``.

    ``b < a``; the ranges may overlap, which is exactly LZ77's overlapping-copy semantics because the
    comparison runs against the original input. Galloping search: chunk sizes double while the chunks
    are equal, then halve down to one byte, so a match of length L costs O(log L) slice comparisons."""
    n = 0
    step = 4
    while n + step <= limit and data[a + n : a + n + step] == data[b + n : b + n + step]:
        n += step
        step *= 2
    while step > 1:
        step //= 2
        if n + step <= limit and data[a + n : a + n + step] == data[b + n : b + n + step]:
            n += step
    return n


class _Output:
    """Item sink handling flag words and the shared length nibble."""

    def __init__(self) -> None:
        self.out = bytearray(4)  # placeholder for the first flag word
        self.flag_pos = 0
        self.flags = 0
        self.flag_count = 0
        self.nibble_pos = -1  # index of a length byte whose high nibble is still free

    def _flag(self, bit: int) -> None:
        self.flags = (self.flags << 1) | bit
        self.flag_count += 1
        if self.flag_count == 32:
            struct.pack_into("<I", self.out, self.flag_pos, self.flags)
            self.flag_pos = len(self.out)
            self.out += b"\0\0\0\0"
            self.flags = 0
            self.flag_count = 0

    def literal(self, byte: int) -> None:
        self.out.append(byte)
        self._flag(0)

    def match(self, offset: int, length: int) -> None:
        out = self.out
        extra = length - MIN_MATCH
        if extra < 7:
            out += struct.pack("<H", ((offset - 1) << 3) | extra)
        else:
            out += struct.pack("<H", ((offset - 1) << 3) | 7)
            extra -= 7
            nibble = min(extra, 15)
            if self.nibble_pos < 0:
                self.nibble_pos = len(out)
                out.append(nibble)
            else:
                out[self.nibble_pos] |= nibble << 4
                self.nibble_pos = -1
            if extra >= 15:
                extra -= 15
                if extra < 255:
                    out.append(extra)
                else:
                    out.append(255)
                    full = length - MIN_MATCH
                    if full <= 0xFFFF:
                        out += struct.pack("<H", full)
                    else:
                        out += struct.pack("<HI", 0, full)
        self._flag(1)

    def finish(self) -> bytes:
        free = 32 - self.flag_count
        flags = ((self.flags << free) | ((1 << free) - 1)) & 0xFFFFFFFF
        struct.pack_into("<I", self.out, self.flag_pos, flags)
        return bytes(self.out)


def compress(data: bytes, *, max_match: int | None = PYFWNT_MAX_MATCH) -> bytes:
    """Compress ``data`` to a plain LZXpress stream that ``RtlDecompressBuffer(COMPRESSION_FORMAT_XPRESS)``
    (or ``pyfwnt.lzxpress_decompress(stream, len(data))``) restores exactly.

    ``max_match`` caps the length of one match (``None``: no cap; see the module docstring)."""
    if max_match is not None and max_match < MIN_MATCH:
        raise ValueError(f"max_match must be at least {MIN_MATCH}")
    data = bytes(data)
    n = len(data)
    sink = _Output()
    head: dict[bytes, int] = {}  # last position of each 3-byte sequence
    prev = [-1] * n  # previous position with the same 3-byte sequence

    def insert(pos: int) -> None:
        key = data[pos : pos + MIN_MATCH]
        prev[pos] = head.get(key, -1)
        head[key] = pos

    i = 0
    last_hashable = n - MIN_MATCH
    while i < n:
        best_len = 0
        best_off = 0
        if i <= last_hashable:
            key = data[i : i + MIN_MATCH]
            cand = head.get(key, -1)
            limit = n - i if max_match is None else min(n - i, max_match)
            depth = _CHAIN_DEPTH
            while cand >= 0 and i - cand <= MAX_OFFSET and depth:
                depth -= 1
                # a candidate can only win if it also matches at position best_len (cheap pre-check)
                if best_len and (best_len >= limit or data[cand + best_len] != data[i + best_len]):
                    cand = prev[cand]
                    continue
                # every candidate shares the 3-byte key, so it matches at least MIN_MATCH bytes
                length = MIN_MATCH + _common_length(data, i + MIN_MATCH, cand + MIN_MATCH, limit - MIN_MATCH)
                if length > best_len:
                    best_len, best_off = length, i - cand
                    if length >= _GOOD_ENOUGH or length == limit:
                        break
                cand = prev[cand]
            prev[i] = head.get(key, -1)
            head[key] = i
        if best_len >= MIN_MATCH:
            sink.match(best_off, best_len)
            end = i + best_len
            # index only the head and the tail of a long match (speed): the head keeps short repeats
            # findable, the tail is where the next match most likely starts
            stop = min(end, last_hashable + 1)
            for p in range(i + 1, min(i + _INSERT_LIMIT, stop)):
                insert(p)
            for p in range(max(i + _INSERT_LIMIT, end - _INSERT_LIMIT), stop):
                insert(p)
            i = end
        else:
            sink.literal(data[i])
            i += 1
    return sink.finish()


def decompress(stream: bytes, out_size: int, *, prefix: bool = False) -> bytes:
    """Decode a plain LZXpress stream that must produce exactly ``out_size`` bytes (every MS-XCA length form).

    The fallback for streams libfwnt rejects (matches longer than :data:`PYFWNT_MAX_MATCH`). Unlike
    ``dissect.util``'s decoder it never writes past ``out_size``: the output buffer is allocated once at
    that size and a stream that would go past it, refer before its start or end early raises ValueError.
    Sizes read from a damaged trace therefore cannot make memory grow beyond what the buffer declares.
    ``prefix=True`` asks for the first ``out_size`` bytes only: a match crossing that end is cut there."""
    src = memoryview(bytes(stream))
    n = len(src)
    out = bytearray(out_size)
    pos = 0
    i = 0
    flags = 0
    nflags = 0
    nibble_at = -1
    u16 = struct.Struct("<H").unpack_from
    u32 = struct.Struct("<I").unpack_from
    while pos < out_size:
        if nflags == 0:
            if i + 4 > n:
                raise ValueError(f"stream ends after {pos} of {out_size} bytes")
            flags = u32(src, i)[0]
            i += 4
            nflags = 32
        nflags -= 1
        if not (flags >> nflags) & 1:
            if i >= n:
                raise ValueError(f"stream ends after {pos} of {out_size} bytes")
            out[pos] = src[i]
            pos += 1
            i += 1
            continue
        if i + 2 > n:
            raise ValueError(f"stream ends after {pos} of {out_size} bytes")
        word = u16(src, i)[0]
        i += 2
        offset = (word >> 3) + 1
        length = word & 7
        if length == 7:
            if nibble_at < 0:
                if i >= n:
                    raise ValueError("stream ends inside a match length")
                nibble_at = i
                length = src[i] & 15
                i += 1
            else:
                length = src[nibble_at] >> 4
                nibble_at = -1
            if length == 15:
                if i >= n:
                    raise ValueError("stream ends inside a match length")
                length = src[i]
                i += 1
                if length == 255:
                    if i + 2 > n:
                        raise ValueError("stream ends inside a match length")
                    length = u16(src, i)[0]
                    i += 2
                    if length == 0:
                        if i + 4 > n:
                            raise ValueError("stream ends inside a match length")
                        length = u32(src, i)[0]
                        i += 4
                    if length < 15 + 7:
                        raise ValueError("invalid match length")
                    length -= 15 + 7
                length += 15
            length += 7
        length += MIN_MATCH
        if offset > pos:
            raise ValueError(f"match refers {offset} bytes back at output position {pos}")
        if length > out_size - pos:
            if prefix:
                length = out_size - pos
            else:
                raise ValueError(f"stream decompresses past the declared {out_size} bytes")
        start = pos - offset
        end = pos + length
        while pos < end:  # overlapping copy: the source run doubles each step
            k = min(end - pos, pos - start)
            out[pos:pos + k] = out[start:start + k]
            pos += k
    return bytes(out)
