"""Loaded kernel images -> PDB identities for the sidecar.

The kernel names its images by NT paths (``\\SystemRoot\\system32\\ntoskrnl.exe``,
``\\??\\C:\\drivers\\x.sys``, ``\\Device\\HarddiskVolume3\\...``, sometimes ``System32\\drivers\\x.sys``);
:func:`dos_path` turns them into paths a Win32 program can open. The PE files are then read by
:mod:`pooltrace.collector.pe`.
"""

from __future__ import annotations

import ntpath
from collections.abc import Callable, Iterable, Mapping
from typing import BinaryIO

from pooltrace.collector.pe import PeError, read_identity
from pooltrace.collector.structs import LoadedModule


def dos_path(nt_path: str, system_root: str, dos_devices: Mapping[str, str]) -> str | None:
    """A Win32 path for a kernel image path, or None when it cannot be resolved.
    ``dos_devices`` maps drive names (``C:``) to their NT device (``\\Device\\HarddiskVolume3``)."""
    p = nt_path.strip()
    low = p.lower()
    root = system_root.rstrip("\\")
    if low.startswith("\\systemroot\\"):
        return root + p[len("\\SystemRoot"):]
    for prefix in ("\\??\\", "\\\\?\\", "\\dosdevices\\", "\\global??\\"):
        if low.startswith(prefix):
            return p[len(prefix):]
    if low.startswith("\\device\\"):
        for drive, device in dos_devices.items():
            dev = device.rstrip("\\").lower()
            if low == dev or low.startswith(dev + "\\"):
                return drive.rstrip("\\") + p[len(dev):]
        return None
    if len(p) >= 3 and p[1] == ":" and p[2] == "\\":
        return p
    if p.startswith("\\"):  # \Windows\System32\... : on the system drive
        return root[:2] + p
    if p:  # relative to the Windows directory (System32\drivers\x.sys)
        return root + "\\" + p
    return None


def image_identities(modules: Iterable[LoadedModule], system_root: str, dos_devices: Mapping[str, str],
                     open_binary: Callable[[str], BinaryIO]) -> tuple[list[dict], list[dict]]:
    """One sidecar row per distinct image (same path and base counted once), and the images that could
    not be read, each with the reason."""
    rows: list[dict] = []
    errors: list[dict] = []
    seen: set[tuple[str, int]] = set()
    for m in modules:
        key = (m.path.lower(), m.base)
        if key in seen:
            continue
        seen.add(key)
        path = dos_path(m.path, system_root, dos_devices)
        if path is None:
            errors.append({"nt_path": m.path, "error": "cannot resolve the path"})
            continue
        try:
            with open_binary(path) as f:
                ident = read_identity(f)
        except (OSError, PeError) as exc:
            errors.append({"nt_path": m.path, "path": path, "error": read_error(exc)})
            continue
        rows.append({
            "name": ntpath.basename(m.path), "nt_path": m.path, "path": path, "base": f"0x{m.base:x}",
            "size": m.size or ident.size_of_image, "timedatestamp": ident.timedatestamp, "checksum": ident.checksum,
            "pdb_name": pdb_file_name(ident.pdb_name), "pdb_guid": ident.pdb_guid, "pdb_age": ident.pdb_age,
            "pdb_path": ident.pdb_name,
        })
    return rows, errors


def pdb_file_name(pdb_path: str | None) -> str | None:
    """The PDB's file name from an RSDS record's name (often the linker's full path): what symbol servers
    and the sidecar's pdb_name use."""
    return ntpath.basename(pdb_path.replace("/", "\\")) or None if pdb_path else None


def read_error(exc: Exception) -> str:
    """The one-line reason a driver file could not be read: the OS's text, else the error's, else its type."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
