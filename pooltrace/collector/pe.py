"""The identity the sidecar records for a driver file: TimeDateStamp, SizeOfImage, CheckSum and the PDB
identity (RSDS) — read with the shared PE parser (pooltrace/pe.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from pooltrace.pe import PeError, parse_pe

__all__ = ["PeError", "PeIdentity", "read_identity", "read_identity_file"]


@dataclass(frozen=True)
class PeIdentity:
    machine: int
    timedatestamp: int
    size_of_image: int
    checksum: int
    pdb_guid: str | None  # lowercase, dashed: the form modules.parquet uses
    pdb_age: int | None
    pdb_name: str | None


def read_identity(f: BinaryIO) -> PeIdentity:
    """Parse an open PE file (binary, seekable)."""
    img = parse_pe(f)
    cv = img.codeview
    return PeIdentity(img.machine, img.timedatestamp, img.size_of_image, img.checksum,
                      str(cv.guid) if cv else None, cv.age if cv else None, cv.pdb_path if cv else None)


def read_identity_file(path) -> PeIdentity:
    with open(path, "rb") as f:
        return read_identity(f)
