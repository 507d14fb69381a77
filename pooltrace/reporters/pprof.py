"""pprof output: a gzipped profile.proto message (github.com/google/pprof, proto/profile.proto) with two
sample types, inuse_objects/count and inuse_space/bytes, one sample per group.

Functions are named without offsets (`leaky.sys!AllocateLeakyBuffer`; `leaky.sys+0x1022` without
symbols), so `pprof -top` aggregates per function and `pprof -diff_base` matches functions across a
rebuild; each distinct frame is a location whose address is its module-relative offset (RVA), in one
mapping per module (file name = module, starting at 0, `has_functions` set); frames outside every module
keep their absolute address and no mapping.

The message is small and flat, so it is encoded here with the protobuf wire format directly (varints and
length-delimited fields); tests decode it with the `protobuf` package against the published schema.
"""

from __future__ import annotations

import gzip

from pooltrace.analysis import Report
from pooltrace.compare import match_frame


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


def _module_address(frame: str, rvas: dict[str, int]) -> tuple[str | None, int]:
    """(module, module-relative address) of a frame text; (None, absolute address) outside every module."""
    if frame.startswith("0x") and "!" not in frame:
        try:
            return None, int(frame, 16)
        except ValueError:
            return None, 0
    module = frame.split("!", 1)[0] if "!" in frame else frame.rsplit("+0x", 1)[0]
    if frame in rvas:
        return module, rvas[frame]
    tail = frame.rsplit("+0x", 1)[1] if "+0x" in frame else "0"
    try:
        return module, int(tail, 16)  # no renderer address known: the offset in the text
    except ValueError:
        return module, 0


def to_pprof(report: Report) -> bytes:
    strings = _Strings()
    out = bytearray()
    # Profile.sample_type = 1 (ValueType: type = 1, unit = 2)
    for typ, unit in (("inuse_objects", "count"), ("inuse_space", "bytes")):
        out += _field_bytes(1, _field_varint(1, strings(typ)) + _field_varint(2, strings(unit)))
    loc_ids: dict[str, int] = {}
    fn_ids: dict[str, int] = {}
    maps: dict[str, list[int]] = {}  # module -> [mapping id, highest address + 1]
    functions = bytearray()
    locations = bytearray()
    for g in report.groups:
        ids = []
        for frame in g.key:  # innermost first, as pprof wants
            lid = loc_ids.get(frame)
            if lid is None:
                lid = loc_ids[frame] = len(loc_ids) + 1
                name = match_frame(frame)
                module, addr = _module_address(frame, report.frame_rvas)
                fid = fn_ids.get(name)
                if fid is None:
                    fid = fn_ids[name] = len(fn_ids) + 1
                    # Function: id = 1, name = 2, system_name = 3, filename = 4
                    functions += _field_bytes(5, _field_varint(1, fid) + _field_varint(2, strings(name)) +
                                              _field_varint(3, strings(name)) +
                                              (_field_varint(4, strings(module)) if module else b""))
                loc = _field_varint(1, lid)
                if module:
                    m = maps.setdefault(module, [len(maps) + 1, 0])
                    m[1] = max(m[1], addr + 1)
                    loc += _field_varint(2, m[0])
                # Location: id = 1, mapping_id = 2, address = 3, line = 4 (Line: function_id = 1)
                locations += _field_bytes(4, loc + _field_varint(3, addr) + _field_bytes(4, _field_varint(1, fid)))
            ids.append(lid)
        sample = _packed(1, ids) + _packed(2, [g.count, g.bytes])
        for tag in list(g.tags)[:1]:  # Label: key = 1, str = 2
            sample += _field_bytes(3, _field_varint(1, strings("tag")) + _field_varint(2, strings(tag)))
        out += _field_bytes(2, sample)
    for module, (mid, limit) in maps.items():
        # Mapping: id = 1, memory_start = 2, memory_limit = 3, file_offset = 4, filename = 5, has_functions = 7
        out += _field_bytes(3, _field_varint(1, mid) + _field_varint(2, 0) + _field_varint(3, limit) +
                            _field_varint(4, 0) + _field_varint(5, strings(module)) + _field_varint(7, 1))
    out += locations + functions
    for s in strings.items:
        out += _field_bytes(6, s.encode("utf-8"))
    w = report.window
    out += _field_varint(10, max(0, w.end_ns - w.start_ns))  # duration_nanos
    out += _field_varint(14, strings.index["inuse_space"])  # default_sample_type
    return gzip.compress(bytes(out), mtime=0)
