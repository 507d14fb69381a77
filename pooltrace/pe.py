"""Just enough of the PE/COFF format (pure Python) to identify an image: TimeDateStamp, SizeOfImage,
CheckSum, the section table and the CodeView RSDS record (PDB GUID, age, name) from the debug directory.
Only the headers and the debug data are read, with every offset checked against the file size; a
malformed file raises PeError. Used by the symbolizer (images found in symbol stores) and by the
collector (drivers loaded on the recording machine).
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

IMAGE_DEBUG_TYPE_CODEVIEW = 2
IMAGE_SCN_CNT_CODE = 0x20
IMAGE_SCN_MEM_EXECUTE = 0x20000000
MAX_HEADER = 1 << 20
MAX_DEBUG_ENTRIES = 64
MAX_SECTIONS = 96


class PeError(ValueError):
    """Not a PE image, or a malformed one."""


@dataclass(frozen=True)
class Section:
    name: str
    rva: int
    virtual_size: int
    raw_offset: int
    raw_size: int
    characteristics: int

    @property
    def executable(self) -> bool:
        return bool(self.characteristics & (IMAGE_SCN_CNT_CODE | IMAGE_SCN_MEM_EXECUTE))


@dataclass(frozen=True)
class CodeView:
    guid: uuid.UUID
    age: int
    pdb_path: str  # as stored in the image: a file name with /pdbaltpath:%_PDB%, else often a build path


@dataclass
class PeImage:
    machine: int
    timedatestamp: int
    size_of_image: int
    image_base: int
    pe32_plus: bool
    checksum: int = 0
    sections: list[Section] = field(default_factory=list)
    codeview: CodeView | None = None

    def section_at_offset(self, offset: int) -> Section | None:
        for s in self.sections:
            if s.raw_offset <= offset < s.raw_offset + s.raw_size:
                return s
        return None

    def rva_of_offset(self, offset: int) -> int | None:
        s = self.section_at_offset(offset)
        return None if s is None else s.rva + offset - s.raw_offset


def _u(fmt: str, data: bytes, off: int) -> tuple:
    size = struct.calcsize(fmt)
    if off < 0 or off + size > len(data):
        raise PeError("truncated header")
    return struct.unpack_from(fmt, data, off)


def parse_pe(source: str | os.PathLike | BinaryIO) -> PeImage:
    """Identify the image at a path or in an open binary, seekable file (reads its headers and debug
    directory only)."""
    if hasattr(source, "read"):
        return _parse(source)
    with open(source, "rb") as f:
        return _parse(f)


def _parse(f: BinaryIO) -> PeImage:
    f.seek(0, os.SEEK_END)
    file_size = f.tell()
    f.seek(0)
    head = f.read(min(file_size, 4096))
    if head[:2] != b"MZ":
        raise PeError("no MZ header")
    (lfanew,) = _u("<I", head, 0x3C)
    if lfanew > MAX_HEADER or lfanew + 24 > file_size:
        raise PeError("bad e_lfanew")
    f.seek(0)
    head = f.read(lfanew + 24)
    if head[lfanew:lfanew + 4] != b"PE\0\0":
        raise PeError("no PE signature")
    machine, nsect, tds, _symptr, _nsym, opt_size, _chars = _u("<HHIIIHH", head, lfanew + 4)
    if nsect > MAX_SECTIONS:
        raise PeError(f"{nsect} sections")
    f.seek(0)
    head = f.read(lfanew + 24 + opt_size + 40 * nsect)
    opt = lfanew + 24
    (magic,) = _u("<H", head, opt)
    if magic not in (0x10B, 0x20B):
        raise PeError(f"unknown optional header magic 0x{magic:x}")
    plus = magic == 0x20B
    image_base = _u("<Q", head, opt + 24)[0] if plus else _u("<I", head, opt + 28)[0]
    (size_of_image,) = _u("<I", head, opt + 56)
    (checksum,) = _u("<I", head, opt + 64)
    ndirs_at, dirs_at = (opt + 108, opt + 112) if plus else (opt + 92, opt + 96)
    (ndirs,) = _u("<I", head, ndirs_at)
    sections = []
    sect_at = opt + opt_size
    for i in range(nsect):
        name, vsize, vaddr, rsize, rptr = _u("<8sIIII", head, sect_at + 40 * i)
        (chars,) = _u("<I", head, sect_at + 40 * i + 36)
        sections.append(Section(name.rstrip(b"\0").decode("latin-1"), vaddr, vsize, rptr, rsize, chars))
    img = PeImage(machine, tds, size_of_image, image_base, plus, checksum, sections)
    if ndirs > 6 and opt + opt_size >= dirs_at + 7 * 8:
        dbg_rva, dbg_size = _u("<II", head, dirs_at + 6 * 8)
        if dbg_rva and dbg_size:
            img.codeview = _read_codeview(f, file_size, img, dbg_rva, dbg_size)
    return img


def _file_offset(img: PeImage, rva: int) -> int | None:
    for s in img.sections:
        if s.rva <= rva < s.rva + max(s.virtual_size, s.raw_size):
            off = rva - s.rva
            return s.raw_offset + off if off < s.raw_size else None
    return None


def _read_codeview(f, file_size: int, img: PeImage, rva: int, size: int) -> CodeView | None:
    off = _file_offset(img, rva)
    if off is None:
        return None
    count = min(size // 28, MAX_DEBUG_ENTRIES)
    f.seek(off)
    table = f.read(count * 28)
    for i in range(len(table) // 28):
        _chars, _tds, _maj, _min, typ, data_size, data_rva, ptr = struct.unpack_from("<IIHHIIII", table, 28 * i)
        if not ptr and data_rva:  # no file pointer: locate the data through its RVA
            ptr = _file_offset(img, data_rva) or 0
        if typ != IMAGE_DEBUG_TYPE_CODEVIEW or not 24 <= data_size <= 24 + 1024 or ptr + data_size > file_size:
            continue
        f.seek(ptr)
        data = f.read(data_size)
        if data[:4] != b"RSDS":
            continue  # NB10 (PDB 2.0) and others: no GUID to key a store lookup on
        guid = uuid.UUID(bytes_le=data[4:20])
        (age,) = struct.unpack_from("<I", data, 20)
        raw = data[24:].split(b"\0", 1)[0]
        return CodeView(guid, age, raw.decode("utf-8", "replace"))
    return None


def read_identity(path: str | Path) -> CodeView | None:
    """The RSDS record of the image at `path`, or None (no debug directory, not PE, unreadable)."""
    try:
        return parse_pe(path).codeview
    except (OSError, PeError, struct.error):
        return None
