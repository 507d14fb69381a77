"""Snapshots beside the trace: the kernel's per-tag counters (SystemPoolTagInformation), the loaded kernel
images (SystemModuleInformation, with SeDebugPrivilege enabled first), and at stop the images the finished
trace's own ImageLoad events name — each image read from disk for its PDB identity.

Windows 11 24H2 returns ImageBase 0 from SystemModuleInformation unless the caller has SeDebugPrivilege
*enabled* (administrators hold it disabled), so it is enabled (AdjustTokenPrivileges) before the first
module query; when bases still come back 0 the sidecar says so and the analyzer joins identities by file
name and TimeDateStamp instead of base address.
"""

from __future__ import annotations

import ntpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pooltrace.collector.boundary import WindowsApi
from pooltrace.collector.config import constants
from pooltrace.collector.drivers import dos_path, image_identities, pdb_file_name, read_error
from pooltrace.collector.messages import nt, win32
from pooltrace.collector.pe import PeError, read_identity
from pooltrace.collector.structs import LoadedModule, parse_module_information, parse_pool_tag_information
from pooltrace.collector.tagfilter import TagPattern, matches_any
from pooltrace.tags import format_tag

MB = 1 << 20


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def query(api: WindowsApi, info_class: int, initial: int = 64 * 1024, limit: int = 64 * MB) -> tuple[int, bytearray]:
    """NtQuerySystemInformation with a buffer grown until the answer fits."""
    mismatch = (nt("STATUS_INFO_LENGTH_MISMATCH"), nt("STATUS_BUFFER_TOO_SMALL"))
    buf = bytearray(initial)
    while True:
        status, needed = api.nt_query_system_information(info_class, buf)
        if status not in mismatch or len(buf) >= limit:
            return status, buf
        buf = bytearray(min(limit, max(needed + 4096, 2 * len(buf))))


@dataclass
class Snapshots:
    """Everything read around the trace, and what went wrong reading it (warnings)."""

    api: WindowsApi
    tags: tuple[TagPattern, ...]
    warn: Callable[[str], None]
    modules: list[LoadedModule] = field(default_factory=list)
    debug_privilege: str | None = None  # "enabled", or why not
    bases_hidden: bool = False

    def pool_tags(self, when: str) -> dict | None:
        c = constants()
        status, buf = query(self.api, c["system_info_class"]["SystemPoolTagInformation"])
        try:
            if status:
                raise ValueError(c.ntstatus_name(status))
            entries = parse_pool_tag_information(buf)
        except ValueError as exc:
            self.warn(f"could not read the kernel's pool tag counters at {when} ({exc}): reports will not know "
                      "how much was outstanding before the trace")
            return None
        rows = [{"tag": format_tag(e.tag), "value": e.tag, "paged_allocs": e.paged_allocs,
                 "paged_frees": e.paged_frees, "paged_bytes": e.paged_used, "nonpaged_allocs": e.nonpaged_allocs,
                 "nonpaged_frees": e.nonpaged_frees, "nonpaged_bytes": e.nonpaged_used}
                for e in entries if matches_any(e.tag, self.tags)]
        return {"utc": utc_now(), "entries": sorted(rows, key=lambda r: r["tag"])}

    def _enable_debug_privilege(self) -> None:
        if self.debug_privilege is not None:
            return
        c = constants()
        status = self.api.enable_privilege(c["privileges"]["debug"])
        if status == 0:
            self.debug_privilege = "enabled"
        elif status == win32("ERROR_NOT_ALL_ASSIGNED"):
            self.debug_privilege = "not held"
        else:
            self.debug_privilege = f"not enabled: {c.win32_name(status)}"

    def loaded_modules(self, when: str) -> None:
        c = constants()
        self._enable_debug_privilege()
        status, buf = query(self.api, c["system_info_class"]["SystemModuleInformation"])
        try:
            if status:
                raise ValueError(c.ntstatus_name(status))
            found = parse_module_information(buf, self.api.ansi_code_page())
        except ValueError as exc:
            self.warn(f"could not list the loaded drivers at {when} ({exc}): their PDB identities will be missing")
            return
        if found and not any(m.base for m in found) and not self.bases_hidden:
            self.bases_hidden = True
            self.warn(f"Windows hid the drivers' load addresses (SeDebugPrivilege {self.debug_privilege}): PDB "
                      "identities are joined to the trace by file name and TimeDateStamp instead")
        self.modules += found

    def identities(self, trace: Path | None) -> tuple[list[dict], list[dict]]:
        """Sidecar rows for the snapshot images and for every kernel image the trace loaded that the
        snapshots missed (a driver loaded after start and unloaded before stop)."""
        api = self.api
        root, devices = api.system_root(), api.dos_devices()
        rows, errors = image_identities(self.modules, root, devices, api.open_binary)
        for r in rows:
            r["source"] = "snapshot"
        if trace is None:
            return rows, errors
        try:
            loaded = trace_kernel_images(trace)
        except Exception as exc:  # a damaged or missing trace must not lose the sidecar
            self.warn(f"could not read the image loads in {trace.name} ({exc}): drivers loaded during the trace "
                      "may lack PDB identities")
            return rows, errors
        known = {m.path.lower() for m in self.modules}
        more, more_errors = trace_identities([i for i in loaded if i.path.lower() not in known], root, devices,
                                             api.open_binary)
        return rows + more, errors + more_errors


@dataclass(frozen=True)
class TraceImage:
    path: str
    base: int
    size: int
    timedatestamp: int


def trace_kernel_images(trace: Path) -> list[TraceImage]:
    """Distinct kernel images (pid 0) named by the trace's image events, read with pooltrace's own reader
    (imported here: it pulls numpy and pyarrow, which the record start path must not)."""
    from pooltrace.etl.reader import EtlReader

    seen: dict[tuple[str, int], TraceImage] = {}
    with EtlReader(trace) as reader:
        for batch in reader.batches():
            table = batch.get("image")
            if table is None:
                continue
            cols = table.select(["pid", "filename", "base", "size", "timedatestamp"]).to_pydict()
            for pid, name, base, size, stamp in zip(cols["pid"], cols["filename"], cols["base"], cols["size"],
                                                    cols["timedatestamp"], strict=True):
                if pid == 0 and name:
                    seen.setdefault((name.lower(), base), TraceImage(name, base, size, stamp))
    return list(seen.values())


def trace_identities(images: Iterable[TraceImage], system_root: str, dos_devices, open_binary
                     ) -> tuple[list[dict], list[dict]]:
    """Identities of images seen only in the trace, cross-checked: the file on disk must have the
    TimeDateStamp (when the event has one) and SizeOfImage the ImageLoad event recorded, or it is
    another build than the one that ran and gets no identity."""
    rows: list[dict] = []
    errors: list[dict] = []
    for img in images:
        path = dos_path(img.path, system_root, dos_devices)
        if path is None:
            errors.append({"nt_path": img.path, "error": "cannot resolve the path"})
            continue
        try:
            with open_binary(path) as f:
                ident = read_identity(f)
        except (OSError, PeError) as exc:
            errors.append({"nt_path": img.path, "path": path, "error": read_error(exc)})
            continue
        if (img.timedatestamp and ident.timedatestamp != img.timedatestamp) or ident.size_of_image != img.size:
            errors.append({"nt_path": img.path, "path": path, "error": (
                f"the file on disk (TimeDateStamp 0x{ident.timedatestamp:08x}, SizeOfImage 0x{ident.size_of_image:x}) "
                f"is not the image loaded during the trace (0x{img.timedatestamp:08x}, 0x{img.size:x})")})
            continue
        rows.append({
            "name": ntpath.basename(img.path), "nt_path": img.path, "path": path, "base": f"0x{img.base:x}",
            "size": img.size, "timedatestamp": ident.timedatestamp, "checksum": ident.checksum,
            "pdb_name": pdb_file_name(ident.pdb_name), "pdb_guid": ident.pdb_guid, "pdb_age": ident.pdb_age,
            "pdb_path": ident.pdb_name, "source": "trace",
        })
    return rows, errors
