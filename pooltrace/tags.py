"""Pool tags as poolmon prints them: the 4 bytes of the ULONG in memory order (etw-collector.md §4.4),
so the ULONG 0x6B61654C is ``Leak``. Bytes outside printable ASCII are shown as ``\\xNN``. Also the few
tags pooltrace itself can explain without the user's pooltag.txt (KERNEL_TAGS)."""

from __future__ import annotations


def format_tag(value: int) -> str:
    out = []
    for byte in int(value).to_bytes(4, "little"):
        out.append(chr(byte) if 0x20 <= byte < 0x7F and byte != 0x5C else f"\\x{byte:02x}")
    return "".join(out)


def parse_tag(text: str) -> int:
    """Inverse of format_tag; shorter tags are padded with spaces as poolmon does."""
    raw = bytearray()
    i = 0
    while i < len(text):
        if text.startswith("\\x", i) and i + 4 <= len(text):
            raw.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            raw += text[i].encode("latin-1")
            i += 1
    if len(raw) > 4:
        raise ValueError(f"pool tag {text!r} is longer than 4 characters")
    return int.from_bytes(bytes(raw).ljust(4, b" "), "little")


# Tags a pool trace always shows that no driver owns. With pool tracing on, the kernel allocates its own
# tracking tables (non-paged NX) under `Pool` and logs those allocations too (etl-format.md, Corrections).
KERNEL_TAGS = {"Pool": "the kernel's own pool tracking tables (nt), allocated while pool tracing is on"}


def builtin_description(tag: str) -> str | None:
    return KERNEL_TAGS.get(tag)
