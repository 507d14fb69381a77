"""Pool-tag patterns for the kernel filter: byte order, wildcards, validation messages, and matching that
mirrors the kernel's ExCheckSingleFilter (etw-collector.md §4.1, §4.4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pooltrace.collector.tagfilter import matches_any, parse_pattern, parse_patterns, tag_matches
from pooltrace.errors import PooltraceError


def tag(text: str) -> int:
    return int.from_bytes(text.encode("latin-1"), "little")


def test_tags_are_written_as_poolmon_prints_them():
    p = parse_pattern("Leak")
    assert p.value == 0x6B61654C == tag("Leak") and p.text == "Leak"
    assert parse_pattern("Ab").value == tag("Ab  ")  # short tags are space-padded like driver literals
    assert parse_pattern("a*").value == 0x00002A61  # the reference's example
    assert parse_pattern("a*").text == "a*"
    assert parse_pattern("L?ak").value == tag("L?ak")
    assert parse_pattern("\\x01ab").value == int.from_bytes(b"\x01ab ", "little")


@pytest.mark.parametrize(("text", "words"), [
    ("", "1 to 4 characters"),
    ("Leaky", "not 1 to 4 characters"),
    ("Lé€k", "not 1 to 4 characters"),
    ("L*ak", "'*' must be the last character"),
    ("*", "matches every pool tag: leave out --tag"),
    ("????", "matches every pool tag"),
    ("??*", "matches every pool tag"),
])
def test_bad_patterns_are_one_line_errors(text, words):
    with pytest.raises(PooltraceError, match=None) as err:
        parse_pattern(text)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_more_than_four_tags_suggest_analysis_time_filtering():
    assert [p.text for p in parse_patterns(["Leak", "Irp", "Ab*", "Leak", "Mm??"])] == ["Leak", "Irp ", "Ab*", "Mm??"]
    with pytest.raises(PooltraceError) as err:
        parse_patterns(["Leak", "Irp", "Ab*", "Mm??", "File"])
    msg = str(err.value)
    assert "at most 4 pool tags" in msg and "5 were given" in msg and "filter the tags at analysis time" in msg


def test_matching_follows_the_kernel_byte_by_byte():
    assert tag_matches(tag("Leak"), tag("Leak"))
    assert not tag_matches(tag("Leak"), tag("leak"))  # case-sensitive
    assert tag_matches(tag("Leak"), parse_pattern("L?ak").value)
    assert tag_matches(tag("Leak"), parse_pattern("Le*").value)
    assert not tag_matches(tag("Lxak"), parse_pattern("Le*").value)
    assert tag_matches(tag("Ab  "), parse_pattern("Ab").value)
    assert not tag_matches(tag("Abc "), parse_pattern("Ab").value)
    assert matches_any(tag("Irp "), ())  # no filter: everything
    assert not matches_any(tag("Irp "), parse_patterns(["Leak"]))


@given(st.binary(min_size=4, max_size=4), st.lists(st.sampled_from([None, "?"]), min_size=4, max_size=4),
       st.integers(0, 4))
def test_a_pattern_made_from_a_tag_matches_it(raw, wild, star):
    chars = [chr(b) if w is None else "?" for b, w in zip(raw, wild, strict=True)]
    if star < 4:
        chars = chars[:star] + ["*"]
    # skip patterns the parser rejects (match-all, or a literal '*'/'?' byte before the end)
    text = "".join(f"\\x{ord(c):02x}" if c not in "?*" and not 0x20 <= ord(c) < 0x7F or c == "\\" else c
                   for c in chars)
    try:
        p = parse_pattern(text)
    except PooltraceError:
        return
    assert tag_matches(int.from_bytes(raw, "little"), p.value) or any(b in b"*?" for b in raw)
