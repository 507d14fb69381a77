"""Pool-tag patterns for the kernel's tag filter (etw-collector.md §4.1, §4.4).

A pattern is written as poolmon prints tags (``Leak``; ``\\xNN`` for other bytes) and becomes the ULONG
whose lowest byte is the first character. The kernel compares byte by byte, first byte first: ``?``
matches any byte, ``*`` matches the rest of the tag, anything else must be equal (case-sensitive).
Patterns shorter than 4 characters without ``*`` are padded with spaces, as short tags are in drivers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pooltrace.collector.config import constants
from pooltrace.errors import PooltraceError
from pooltrace.tags import format_tag, parse_tag

ANY_BYTE, REST = 0x3F, 0x2A  # '?', '*'


@dataclass(frozen=True)
class TagPattern:
    text: str  # canonical, as poolmon would print it (wildcards kept)
    value: int  # the ULONG handed to the kernel


def parse_pattern(text: str) -> TagPattern:
    if not text:
        raise PooltraceError("--tag needs a pool tag of 1 to 4 characters")
    try:
        value = parse_tag(text)
    except ValueError as exc:  # too long, or not an 8-bit character (UnicodeEncodeError)
        raise PooltraceError(f"pool tag {text!r} is not 1 to 4 characters of 8 bits each "
                             "(write other bytes as \\xNN)") from exc
    raw = value.to_bytes(4, "little")
    if REST in raw:
        star = raw.index(REST)
        if raw[star + 1:].strip(b" "):
            raise PooltraceError(f"in --tag {text!r}, '*' must be the last character: it matches the rest of "
                                 "the tag (use '?' for a single character)")
        raw = raw[:star + 1].ljust(4, b"\0")
        value = int.from_bytes(raw, "little")
        shown = format_tag(value).split("*", 1)[0] + "*"
    else:
        shown = format_tag(value)
    significant = raw.split(b"*", 1)[0] if REST in raw else raw
    if all(b == ANY_BYTE for b in significant):
        raise PooltraceError(f"--tag {text!r} matches every pool tag: leave out --tag to record all tags")
    return TagPattern(shown, value)


def pattern_text(value: int) -> str:
    """A tag pattern as read back from the kernel, written as --tag takes it (``*`` ends it)."""
    raw = value.to_bytes(4, "little")
    return format_tag(value).split("*", 1)[0] + "*" if REST in raw else format_tag(value)


def parse_patterns(texts: Iterable[str]) -> tuple[TagPattern, ...]:
    """Validated, de-duplicated patterns; more than the kernel's 4 is an error."""
    out: list[TagPattern] = []
    for text in texts:
        p = parse_pattern(text)
        if all(p.value != q.value for q in out):
            out.append(p)
    limit = constants()["events"]["max_tags"]
    if len(out) > limit:
        raise PooltraceError(f"the kernel filters at most {limit} pool tags and {len(out)} were given "
                             f"({', '.join(p.text for p in out)}): record with at most {limit} --tag, or "
                             "without --tag and filter the tags at analysis time (pooltrace report --tag ...)")
    return tuple(out)


def tag_matches(tag: int, pattern: int) -> bool:
    """The kernel's per-pattern check (ExCheckSingleFilter, §4.1)."""
    t, p = tag.to_bytes(4, "little"), pattern.to_bytes(4, "little")
    for tb, pb in zip(t, p, strict=True):
        if pb == REST:
            return True
        if pb != ANY_BYTE and pb != tb:
            return False
    return True


def matches_any(tag: int, patterns: Iterable[TagPattern]) -> bool:
    patterns = tuple(patterns)
    return not patterns or any(tag_matches(tag, p.value) for p in patterns)
