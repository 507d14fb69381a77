"""The user's pooltag.txt (shipped with the Debugging Tools for Windows, ``<kit>\\Debuggers\\x64\\triage``):
which binary owns a tag, as Microsoft documents it. Not shipped with pooltrace; read from where it is.

Format, one tag per line::

    rem comment lines start with "rem"
    Leak - leaky.sys     - leaky test driver buffers
    Afd? - afd.sys       - AFD objects                    ("?" matches any one character)
    CM?? - nt!cm         - Configuration Manager          ("nt!cm": ntoskrnl.exe, component cm)
    Cc   - nt!cc         - Cache Manager                  (tags shorter than 4 characters end in spaces)

The tag is the first four characters (trailing blanks are part of it, as in ``Irp ``); the binary and the
description follow, each after `` - ``. Lines that do not parse are counted, not fatal.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

KERNEL_ALIASES = {"nt": "ntoskrnl.exe", "ntos": "ntoskrnl.exe", "ntoskrnl": "ntoskrnl.exe", "hal": "hal.dll"}
_LINE = re.compile(r"^(?P<tag>\S{1,4})\s+-\s*(?P<rest>.*)$")


@dataclass(frozen=True)
class PoolTagEntry:
    tag: str  # as written, padded to 4 characters; may hold "?" wildcards
    binary: str  # "afd.sys", "nt!cc", "<unknown>", "" when absent
    description: str
    line: int

    @property
    def wildcard(self) -> bool:
        return "?" in self.tag

    def matches(self, tag: str) -> bool:
        t = tag.ljust(4)[:4]
        return all(p == "?" or p == c for p, c in zip(self.tag, t, strict=True))

    @property
    def module(self) -> str | None:
        """The image file the binary field names (``nt!cc`` -> ``ntoskrnl.exe``), or None if unknown."""
        b = self.binary.strip()
        if not b or b.startswith("<"):
            return None
        head = b.split("!", 1)[0].strip()
        alias = KERNEL_ALIASES.get(head.lower())
        if alias:
            return alias
        return head if "." in head else f"{head}.sys"

    @property
    def component(self) -> str | None:
        return self.binary.split("!", 1)[1].strip() if "!" in self.binary else None


@dataclass
class PoolTagFile:
    path: Path
    entries: list[PoolTagEntry]
    skipped: int  # lines that are neither comments nor entries

    def lookup(self, tag: str) -> list[PoolTagEntry]:
        """Entries for `tag`: exact ones first, then wildcard entries, each in file order."""
        exact = [e for e in self.entries if not e.wildcard and e.matches(tag)]
        wild = [e for e in self.entries if e.wildcard and e.matches(tag)]
        return exact + wild

    def describe(self, tag: str) -> str | None:
        """One line for a tag: the best entry's description and binary (``cache manager (nt!cc)``)."""
        found = self.lookup(tag)
        if not found:
            return None
        e = found[0]
        if e.binary and e.description:
            return f"{e.description} ({e.binary})"
        return e.description or e.binary or None

    def search(self, pattern: str) -> list[PoolTagEntry]:
        """Entries whose tag a query with ``?``/``*`` wildcards matches (``Lea?``, ``Ntf*``)."""
        rx = _query_regex(pattern)
        return [e for e in self.entries if rx.fullmatch(e.tag) or (not e.wildcard and rx.fullmatch(e.tag.rstrip()))]


def _query_regex(pattern: str) -> re.Pattern:
    out = []
    for c in pattern:
        out.append("." if c == "?" else ".*" if c == "*" else re.escape(c))
    tail = "" if pattern.endswith("*") else " *"
    return re.compile("".join(out) + tail, re.S)


def _decode(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", "replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def parse_pooltag(text: str, path: Path | str = "pooltag.txt") -> PoolTagFile:
    entries: list[PoolTagEntry] = []
    skipped = 0
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r\n")
        stripped = line.strip()
        if not stripped or stripped.lower() == "rem" or stripped.lower().startswith(("rem ", "rem\t", "//", ";")):
            continue
        tag, rest = _split_tag(line)
        if tag is None:
            skipped += 1
            continue
        parts = re.split(r"\s+-\s+", rest.strip(), maxsplit=1)
        if len(parts) == 2:
            binary, desc = parts[0].strip(), parts[1].strip()
        elif re.fullmatch(r"\S+\.(sys|dll|exe)|nt!\S+|<unknown>", rest.strip(), re.I):
            binary, desc = rest.strip(), ""
        else:
            binary, desc = "", rest.strip()
        entries.append(PoolTagEntry(tag, binary, desc, n))
    return PoolTagFile(Path(path), entries, skipped)


def _split_tag(line: str) -> tuple[str | None, str]:
    """The tag is the first 4 characters when `` - `` follows them (``Irp  - ...``, ``Cc   - ...``); otherwise
    a 1-4 character token followed by a dash (``Cc - nt!cc - ...``, ``Ntfx\t-\t...``)."""
    if line[4:7] == " - " and line[:4].strip():
        return line[:4], line[7:]
    m = _LINE.match(line)
    if m is None:
        return None, ""
    tag = m.group("tag").strip()
    if not tag or any(c.isspace() for c in tag):
        return None, ""
    return tag.ljust(4), m.group("rest")


def read_pooltag(path: str | os.PathLike) -> PoolTagFile:
    p = Path(path)
    return parse_pooltag(_decode(p.read_bytes()), p)


def default_pooltag_paths() -> list[Path]:
    """Where pooltag.txt usually is: ``POOLTRACE_POOLTAG``, then the Windows Kits debuggers' triage folders."""
    out: list[Path] = []
    env = os.environ.get("POOLTRACE_POOLTAG")
    if env:
        out.append(Path(env).expanduser())
    if sys.platform == "win32":
        for var in ("ProgramFiles(x86)", "ProgramFiles"):
            base = os.environ.get(var)
            if not base:
                continue
            for arch in ("x64", "arm64", "x86"):
                out.append(Path(base) / "Windows Kits" / "10" / "Debuggers" / arch / "triage" / "pooltag.txt")
    return out


load_pooltag = read_pooltag


def find_pooltag(explicit: str | os.PathLike | None = None) -> Path | None:
    if explicit:
        return Path(explicit)
    return next((p for p in default_pooltag_paths() if p.is_file()), None)
