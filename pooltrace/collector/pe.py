"""A PE file's identity for symbol lookup, read with ``struct`` from the file on disk: TimeDateStamp,
SizeOfImage, CheckSum and the CodeView RSDS record (PDB GUID, age, PDB path) of its debug directory.

This is what KernelTraceControl's DbgID_RSDS records carry in merged traces (etl-format.md §2.5); an
unmerged kernel trace has no such records, so the collector reads them from the drivers themselves.
Path: DOS header ``e_lfanew`` -> ``PE\\0\\0`` -> COFF header -> optional header (PE32 or PE32+) -> data
directory 6 (debug) -> IMAGE_DEBUG_DIRECTORY entries of type 2 (CodeView) -> ``RSDS`` GUID age path.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import BinaryIO

PE32, PE32_PLUS = 0x10B, 0x20B
DEBUG_DIRECTORY_INDEX = 6
DEBUG_TYPE_CODEVIEW = 2
DEBUG_ENTRY = struct.Struct("<IIHHIIII")  # IMAGE_DEBUG_DIRECTORY, 28 bytes
SECTION = struct.Struct("<8sIIIIIIHHI")  # IMAGE_SECTION_HEADER, 40 bytes
MAX_DEBUG_ENTRIES = 64
MAX_PDB_PATH = 1024


class PeError(ValueError):
    """Not a PE file, or a damaged one."""


@dataclass(frozen=True)
class PeIdentity:
    machine: int
    timedatestamp: int
    size_of_image: int
    checksum: int
    pdb_guid: str | None  # lowercase, dashed: the form modules.parquet uses
    pdb_age: int | None
    pdb_name: str | None


def _read(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise PeError(f"truncated at offset {offset:#x}")
    return data


def read_identity(f: BinaryIO) -> PeIdentity:
    """Parse an open PE file (binary, seekable)."""
    dos = _read(f, 0, 0x40)
    if dos[:2] != b"MZ":
        raise PeError("no MZ header")
    (lfanew,) = struct.unpack_from("<I", dos, 0x3C)
    head = _read(f, lfanew, 24)
    if head[:4] != b"PE\0\0":
        raise PeError("no PE signature")
    machine, n_sections, timedatestamp, _, _, opt_size, _ = struct.unpack_from("<HHIIIHH", head, 4)
    opt_at = lfanew + 24
    opt = _read(f, opt_at, opt_size)
    if len(opt) < 2:
        raise PeError("no optional header")
    (magic,) = struct.unpack_from("<H", opt, 0)
    if magic == PE32:
        n_dirs_at, dirs_at = 92, 96
    elif magic == PE32_PLUS:
        n_dirs_at, dirs_at = 108, 112
    else:
        raise PeError(f"unknown optional header magic {magic:#x}")
    if len(opt) < dirs_at:
        raise PeError("optional header too short")
    size_of_image, = struct.unpack_from("<I", opt, 56)
    checksum, = struct.unpack_from("<I", opt, 64)
    (n_dirs,) = struct.unpack_from("<I", opt, n_dirs_at)
    rsds = None
    if n_dirs > DEBUG_DIRECTORY_INDEX and len(opt) >= dirs_at + 8 * (DEBUG_DIRECTORY_INDEX + 1):
        rva, size = struct.unpack_from("<II", opt, dirs_at + 8 * DEBUG_DIRECTORY_INDEX)
        if rva and size:
            sections = [SECTION.unpack(_read(f, opt_at + opt_size + i * SECTION.size, SECTION.size))
                        for i in range(n_sections)]
            rsds = _find_rsds(f, _rva_to_offset(rva, sections), min(size // DEBUG_ENTRY.size, MAX_DEBUG_ENTRIES),
                              sections)
    guid, age, name = rsds if rsds else (None, None, None)
    return PeIdentity(machine, timedatestamp, size_of_image, checksum, guid, age, name)


def _rva_to_offset(rva: int, sections: list[tuple]) -> int:
    for _, vsize, vaddr, raw_size, raw_ptr, *_ in sections:
        if vaddr <= rva < vaddr + max(vsize, raw_size):
            return raw_ptr + rva - vaddr
    raise PeError(f"debug directory RVA {rva:#x} is in no section")


def _find_rsds(f: BinaryIO, offset: int, count: int, sections: list[tuple]) -> tuple[str, int, str] | None:
    for i in range(count):
        _, _, _, _, typ, size, rva, pointer = DEBUG_ENTRY.unpack(_read(f, offset + i * DEBUG_ENTRY.size,
                                                                       DEBUG_ENTRY.size))
        if typ != DEBUG_TYPE_CODEVIEW or size < 24:
            continue
        at = pointer or _rva_to_offset(rva, sections)
        data = _read(f, at, min(size, 24 + MAX_PDB_PATH))
        if data[:4] != b"RSDS":
            continue  # NB10 (old VC6 CodeView) and others carry no GUID
        guid = str(uuid.UUID(bytes_le=data[4:20]))
        (age,) = struct.unpack_from("<I", data, 20)
        name = data[24:].split(b"\0", 1)[0].decode("utf-8", errors="replace")
        return guid, age, name
    return None


def read_identity_file(path) -> PeIdentity:
    with open(path, "rb") as f:
        return read_identity(f)
