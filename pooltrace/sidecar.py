"""The recorder's sidecar: what an unmerged kernel trace cannot tell the analyzer, in a JSON file beside it.

``pooltrace record -o OUT.etl`` writes ``OUT.etl.pooltrace.json`` (format "pooltrace-sidecar", version 1)::

    {
      "format": "pooltrace-sidecar", "version": 1,
      "trace": "OUT.etl",                       # file name of the trace it describes
      "created_by": "pooltrace 0.1.0",
      "recording": {"windows": "10.0.22631", "pointer_size": 8, "logger": "pooltrace",
                    "logger_kind": "private" | "kernel", "log_file_mode": ..., "max_file_mb": null | MB,
                    "buffer_size_kb": ..., "minimum_buffers": ..., "maximum_buffers": ...,
                    "stacks": ["PoolAlloc", ...], "tag_filter": ["Leak", ...],
                    "started_utc": ISO-8601, "stopped_utc": ISO-8601, "seconds": float,
                    "stopped_by": "ctrl-c" | "ctrl-break" | "duration" | "command" | "console-close"
                                  | "stopped-elsewhere" | "error",
                    "command": [argv] | null, "command_exit_code": int | null,
                    "events_lost": int | null, "buffers_lost": int | null,
                    "realtime_buffers_lost": int | null, "buffers_written": int | null},
      "modules": [                                # loaded kernel images (at start and at stop), read from disk
        {"name": "leaky.sys", "nt_path": "\\??\\C:\\drivers\\leaky.sys", "path": "C:\\drivers\\leaky.sys",
         "base": "0xfffff80412340000",            # hex string; "0x0" where Windows hides kernel addresses
         "size": 32768, "timedatestamp": 1597905451, "checksum": 0,
         "pdb_name": "leaky.pdb", "pdb_guid": "6c5a0b8e-...", "pdb_age": 2}   # pdb_*: null without RSDS
      ],
      "module_errors": [{"nt_path": ..., "path": ..., "error": "..."}],
      "pool_tags": {                              # the kernel's per-tag counters (what poolmon shows)
        "filter": ["Leak"],                       # the tag patterns; [] = every tag was recorded and stored
        "start": {"utc": ISO-8601, "entries": [{"tag": "Leak", "value": 1801545036,
                  "paged_allocs": n, "paged_frees": n, "paged_bytes": n,
                  "nonpaged_allocs": n, "nonpaged_frees": n, "nonpaged_bytes": n}, ...]} | null,
        "stop": {... same ...} | null
      }
    }

Joining PDB identities to modules.parquet (:func:`merge_pdb_identities`): kernel images only (pid 0) that
the trace left without a PDB GUID; match on lowercased file name + TimeDateStamp when both sides have a
non-zero TimeDateStamp, else on lowercased file name + base address.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pooltrace.errors import PooltraceError

if TYPE_CHECKING:  # pyarrow is loaded by the commands that read datasets, not by `pooltrace record`
    import pyarrow as pa

SIDECAR_SUFFIX = ".pooltrace.json"
FORMAT, VERSION = "pooltrace-sidecar", 1


def sidecar_path(etl_path: str | os.PathLike) -> Path:
    p = Path(etl_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def read_sidecar(etl_path: str | os.PathLike) -> dict | None:
    """The sidecar of a trace, or None when there is none. A sidecar that is not ours or is damaged is an
    error (PooltraceError), so a stale or foreign file is never joined silently."""
    path = sidecar_path(etl_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PooltraceError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PooltraceError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PooltraceError(f"{path} is not a pooltrace sidecar")
    if data.get("version") != VERSION:
        raise PooltraceError(f"{path} has sidecar version {data.get('version')!r}; this pooltrace reads {VERSION}")
    return data


def write_sidecar(etl_path: str | os.PathLike, data: dict) -> Path:
    """Write atomically: a temporary file beside it, then a rename."""
    path = sidecar_path(etl_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _base(value) -> int | None:
    if value is None:
        return None
    return int(value, 16) if isinstance(value, str) else int(value)


def merge_pdb_identities(modules: pa.Table, sidecar: dict | None) -> pa.Table:
    """Fill pdb_name, pdb_guid, pdb_age (and a missing timedatestamp) of kernel images in a
    modules.parquet-shaped table from the sidecar. Identities the trace carries are never replaced."""
    if not sidecar or not sidecar.get("modules") or not modules.num_rows:
        return modules
    by_stamp: dict[tuple[str, int], dict] = {}
    by_base: dict[tuple[str, int], dict] = {}
    for m in sidecar["modules"]:
        if not m.get("pdb_guid"):
            continue
        name = (m.get("name") or "").lower()
        if m.get("timedatestamp"):
            by_stamp.setdefault((name, int(m["timedatestamp"])), m)
        base = _base(m.get("base"))
        if base:
            by_base.setdefault((name, base), m)
    rows = modules.to_pylist()
    changed = False
    for r in rows:
        if r["pdb_guid"] is not None or r["pid"] != 0:
            continue
        name = (r["name"] or "").lower()
        hit = by_stamp.get((name, r["timedatestamp"])) if r["timedatestamp"] else None
        if hit is None:
            hit = by_base.get((name, r["base"]))
        if hit is None:
            continue
        r["pdb_name"], r["pdb_guid"], r["pdb_age"] = hit["pdb_name"], hit["pdb_guid"], hit["pdb_age"]
        if not r["timedatestamp"] and hit.get("timedatestamp"):
            r["timedatestamp"] = int(hit["timedatestamp"])
        changed = True
    if not changed:
        return modules
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=modules.schema)


def tag_baseline(sidecar: dict | None) -> dict[str, dict]:
    """Per tag: outstanding allocations and bytes (paged + nonpaged) by the kernel's counters at the start
    and at the stop of the recording, e.g. ``{"Leak": {"start": {"allocs": 12, "bytes": 4096}, "stop": ...}}``.
    "start" is what was outstanding before the trace began: allocations the trace cannot pair."""
    out: dict[str, dict] = {}
    pool = (sidecar or {}).get("pool_tags") or {}
    for when in ("start", "stop"):
        snap = pool.get(when)
        if not snap:
            continue
        for e in snap["entries"]:
            # the counters are 32-bit and wrap on busy tags: the difference is taken modulo 2**32
            allocs = ((e["paged_allocs"] - e["paged_frees"]) % (1 << 32)
                      + (e["nonpaged_allocs"] - e["nonpaged_frees"]) % (1 << 32))
            out.setdefault(e["tag"], {"start": None, "stop": None})[when] = {
                "allocs": allocs, "bytes": e["paged_bytes"] + e["nonpaged_bytes"]}
    return out
