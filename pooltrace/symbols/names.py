"""Untrusted names and store keys.

PDB and image names come from the trace (DbgID_RSDS records, image events) or from an image's RSDS record:
they are untrusted. Before one takes part in a path it is reduced to a plain file name here: a build path
(``d:\\os\\obj\\amd64fre\\...\\ntkrnlmp.pdb``) keeps its last component; anything that could reach outside
a configured directory (``..``, a drive, a separator left over, NUL or control characters, Windows device
names, trailing dots or spaces that Windows strips) is refused.

Store keys (symsrv layout ``<file>/<KEY>/<file>``):

- PDB: the GUID as Data1 ``%08X``, Data2 ``%04X``, Data3 ``%04X``, Data4 as 16 hex digits, all uppercase,
  followed by the age in hex without padding. ``uuid.UUID.hex`` is exactly the first part.
- image: TimeDateStamp ``%08X`` followed by SizeOfImage ``%x``.
"""

from __future__ import annotations

import os
import re
import uuid

_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$",
             *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_BAD_CHARS = set('<>:"|?*') | {chr(c) for c in range(0x20)} | {"\x7f"}
_KEY = re.compile(r"[0-9A-Fa-f]{1,64}")
MAX_NAME = 255


def safe_file_name(name: str | None) -> str | None:
    """The last path component of an untrusted name, or None when it is not a safe plain file name.

    ``C:\\build\\x.pdb`` -> ``x.pdb``; ``..\\..\\x.pdb``, ``x.pdb\\..``, ``c:x.pdb``, ``x\\0.pdb``, ``NUL.pdb``,
    ``x.pdb.`` -> None. A name containing a ``..`` component anywhere is refused outright, not trimmed."""
    if not isinstance(name, str) or not name:
        return None
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):  # NUL or control characters anywhere: refuse
        return None
    parts = re.split(r"[\\/]+", name)
    if any(p.strip(" ") in ("..", "...") for p in parts):
        return None
    base = parts[-1]
    if not base or base in (".", "..") or any(c in _BAD_CHARS for c in base):
        return None
    if base != base.strip(" ") or base.endswith("."):
        return None
    if len(base.encode("utf-8", "surrogatepass")) > MAX_NAME:
        return None
    if base.split(".")[0].upper() in _RESERVED:
        return None
    return base


def valid_key(key: str) -> bool:
    return isinstance(key, str) and _KEY.fullmatch(key) is not None


def pdb_key(guid: str | uuid.UUID, age: int) -> str:
    """``8AC9C1FC370F91AC4C4C44205044422E2`` from the GUID (canonical text or UUID) and the age."""
    g = guid if isinstance(guid, uuid.UUID) else uuid.UUID(str(guid))
    if not 0 <= int(age) <= 0xFFFFFFFF:
        raise ValueError(f"PDB age {age} out of range")
    return f"{g.hex.upper()}{int(age):X}"


def image_key(timedatestamp: int, size_of_image: int) -> str:
    """``6A7D83265000``: TimeDateStamp ``%08X`` then SizeOfImage ``%x``."""
    return f"{int(timedatestamp) & 0xFFFFFFFF:08X}{int(size_of_image):x}"


def compressed_name(name: str) -> str:
    """The CAB-compressed twin in a store: the last character replaced by ``_`` (``x.pdb`` -> ``x.pd_``)."""
    return name[:-1] + "_"


def inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """True when `path` is `root` or below it (lexically, after normalization)."""
    r = os.path.normcase(os.path.abspath(root))
    p = os.path.normcase(os.path.abspath(path))
    try:
        return os.path.commonpath([r, p]) == r
    except ValueError:  # different drives
        return False


_SIMPLE_DECORATED = re.compile(r"\?([A-Za-z_$][\w$]*)((?:@[A-Za-z_$][\w$]*)*)@@[A-Z$].*")


def undecorate(name: str) -> str:
    """A light MSVC undecoration for public-only PDBs: ``?Track@PoolTracker@Nt@@SAK_KK@Z`` ->
    ``Nt::PoolTracker::Track``. Names it does not understand (operators, templates, C names) are returned
    unchanged."""
    if not name.startswith("?") or name.startswith(("??", "?$")):
        return name
    m = _SIMPLE_DECORATED.fullmatch(name)
    if m is None:
        return name
    scopes = [s for s in m.group(2).split("@") if s]
    return "::".join([*reversed(scopes), m.group(1)])
