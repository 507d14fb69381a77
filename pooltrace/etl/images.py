"""Join image events with the KernelTraceControl records that merged traces carry for them.

xperf/WPR/PerfView merges add, per image, an ImageId record (original file name, TimeDateStamp) and a
DbgID_RSDS record (PDB GUID, age, name) at the image event's timestamp (etl-format.md §2.5). They are
joined to the image by (ProcessId, ImageBase); either order is tolerated.
"""

from __future__ import annotations

import ntpath

import pyarrow as pa

RSDS_OPCODE = 0x24


def image_file_name(nt_path: str | None) -> str:
    """The file name as loaded (``ntoskrnl.exe``) from an NT path; backslashes split on every OS."""
    return ntpath.basename(nt_path or "")


def join_debug_ids(images: pa.Table | None, rsds: pa.Table | None, image_ids: pa.Table | None) -> pa.Table | None:
    """One row per image event with pdb_name, pdb_guid, pdb_age (DbgID_RSDS, not the IL variant) and,
    where the image event lacks it, the TimeDateStamp from ImageId. Returns None without images."""
    if images is None or not images.num_rows:
        return None
    pdb: dict[tuple[int, int], tuple[str, str, int]] = {}
    if rsds is not None:
        for row in rsds.select(["pid", "base", "opcode", "pdb_name", "guid", "age"]).to_pylist():
            if row["opcode"] == RSDS_OPCODE:
                pdb[(row["pid"], row["base"])] = (row["pdb_name"], row["guid"], row["age"])
    stamps: dict[tuple[int, int], int] = {}
    if image_ids is not None:
        for row in image_ids.select(["pid", "base", "timedatestamp"]).to_pylist():
            stamps[(row["pid"], row["base"])] = row["timedatestamp"]
    keys = list(zip(images["pid"].to_pylist(), images["base"].to_pylist(), strict=True))
    found = [pdb.get(k) for k in keys]
    tds = [t or stamps.get(k, 0) for t, k in zip(images["timedatestamp"].to_pylist(), keys, strict=True)]
    out = images.set_column(images.schema.get_field_index("timedatestamp"), "timedatestamp",
                            pa.array(tds, pa.uint32()))
    out = out.append_column("name", pa.array([image_file_name(f) for f in images["filename"].to_pylist()]))
    out = out.append_column("pdb_name", pa.array([f[0] if f else None for f in found], pa.string()))
    out = out.append_column("pdb_guid", pa.array([f[1] if f else None for f in found], pa.string()))
    return out.append_column("pdb_age", pa.array([f[2] if f else None for f in found], pa.uint32()))


def count_joined(images: pa.Table | None, debug: pa.Table | None) -> int:
    """How many KernelTraceControl debug-id records (RSDS and IL-RSDS) match an image event."""
    if images is None or debug is None:
        return 0
    keys = set(zip(images["pid"].to_pylist(), images["base"].to_pylist(), strict=True))
    return sum(k in keys for k in zip(debug["pid"].to_pylist(), debug["base"].to_pylist(), strict=True))
