"""pprof output: a gzipped profile.proto message (github.com/google/pprof, proto/profile.proto) with two
sample types, inuse_objects/count and inuse_space/bytes, one sample per group, and one location and
function per distinct frame text — module-relative, so `pprof -diff_base` compares two runs.

The message is small and flat, so it is encoded here with the protobuf wire format directly (varints and
length-delimited fields); tests decode it with the `protobuf` package against the published schema.
"""

from __future__ import annotations

import gzip

from pooltrace.analysis import Report


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _field_bytes(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _packed(num: int, values: list[int]) -> bytes:
    return _field_bytes(num, b"".join(_varint(v) for v in values))


class _Strings:
    def __init__(self) -> None:
        self.index = {"": 0}
        self.items = [""]

    def __call__(self, s: str) -> int:
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.items)
            self.items.append(s)
        return i


def to_pprof(report: Report) -> bytes:
    strings = _Strings()
    out = bytearray()
    # Profile.sample_type = 1 (ValueType: type = 1, unit = 2)
    for typ, unit in (("inuse_objects", "count"), ("inuse_space", "bytes")):
        out += _field_bytes(1, _field_varint(1, strings(typ)) + _field_varint(2, strings(unit)))
    loc_ids: dict[str, int] = {}
    functions = bytearray()
    locations = bytearray()
    for g in report.groups:
        ids = []
        for frame in g.key:  # innermost first, as pprof wants
            lid = loc_ids.get(frame)
            if lid is None:
                lid = loc_ids[frame] = len(loc_ids) + 1
                # Function: id = 1, name = 2, system_name = 3
                functions += _field_bytes(5, _field_varint(1, lid) + _field_varint(2, strings(frame)) +
                                          _field_varint(3, strings(frame)))
                # Location: id = 1, line = 4 (Line: function_id = 1)
                locations += _field_bytes(4, _field_varint(1, lid) + _field_bytes(4, _field_varint(1, lid)))
            ids.append(lid)
        sample = _packed(1, ids) + _packed(2, [g.count, g.bytes])
        for tag in list(g.tags)[:1]:  # Label: key = 1, str = 2
            sample += _field_bytes(3, _field_varint(1, strings("tag")) + _field_varint(2, strings(tag)))
        out += _field_bytes(2, sample)
    out += locations + functions
    for s in strings.items:
        out += _field_bytes(6, s.encode("utf-8"))
    w = report.window
    out += _field_varint(10, max(0, w.end_ns - w.start_ns))  # duration_nanos
    out += _field_varint(14, strings.index["inuse_space"])  # default_sample_type
    return gzip.compress(bytes(out), mtime=0)
