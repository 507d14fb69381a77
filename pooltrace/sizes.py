"""Byte sizes as people type them (``4096``, ``64k``, ``1.5MB``, ``2GiB``): one parser for every option."""

from __future__ import annotations

import re

UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
         "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes as an int; k/m/g/t (with or without b, kib...) are powers of 1024. ValueError names the input."""
    m = _SIZE.fullmatch(str(text).lower())
    if not m or m.group(2) not in UNITS:
        raise ValueError(f"{text!r} is not a size: give bytes like 4096, 64k or 1.5MB")
    return round(float(m.group(1)) * UNITS[m.group(2)])
