"""The recorder's sidecar: what an unmerged kernel trace cannot tell the analyzer, in a JSON file beside it.

``pooltrace record -o OUT.etl`` writes ``OUT.etl.pooltrace.json`` (format "pooltrace-sidecar", version 1)::

    {
      "format": "pooltrace-sidecar", "version": 1,
      "trace": "OUT.etl",                       # file name of the trace it describes
      "created_by": "pooltrace 0.1.0",
      "recording": {"windows": "10.0.22631", "pointer_size": 8, "logger": "pooltrace",
                    "logger_kind": "private" | "kernel", "log_file_mode": ..., "max_file_mb": MB,
                    "buffer_size_kb": ..., "minimum_buffers": ..., "maximum_buffers": ...,
                    "circular": bool,
                    "stacks": ["PoolAlloc", ...], "tag_filter": ["Leak", ...],
                    "kernel_state": {                 # what the kernel had in effect, read back after setup
                        "pool_enabled": bool | null, "group_masks": ["0x00000007", ...] | null,
                        "stacks_enabled": bool | null, "stack_hooks": ["0x0e20", ...] | null,
                        "stacks_set_by": "TraceSetInformation" | "NtSetSystemInformation",
                        "group_mask_set_by": ... same ..., "tag_filter": ["Leak"] | null,
                        "tag_filter_in_effect": bool | null, "unverified": ["what: why", ...]} | null,
                    "debug_privilege": "enabled" | "not held" | "not enabled: ...",
                    "module_bases": "real" | "hidden",  # hidden: every base 0, join by TimeDateStamp
                    "started_utc": ISO-8601, "stopped_utc": ISO-8601, "seconds": float,
                    "stopped_by": "ctrl-c" | "ctrl-break" | "duration" | "command" | "console-close"
                                  | "stopped-elsewhere" | "error",
                    "command": [argv] | null, "command_exit_code": int | null,
                    "events_lost": int | null, "buffers_lost": int | null,
                    "realtime_buffers_lost": int | null, "buffers_written": int | null},
      "modules": [                                # kernel images (loaded at start, at stop, or during the trace)
        {"name": "leaky.sys", "nt_path": "\\??\\C:\\drivers\\leaky.sys", "path": "C:\\drivers\\leaky.sys",
         "base": "0xfffff80412340000",            # hex string; "0x0" where Windows hides kernel addresses
         "size": 32768, "timedatestamp": 1597905451, "checksum": 0,
         "pdb_name": "leaky.pdb", "pdb_guid": "6c5a0b8e-...", "pdb_age": 2,   # pdb_*: null without RSDS
         "pdb_path": "C:\\build\\leaky.pdb",   # the RSDS record's name as written; pdb_name its file name
         "source": "snapshot" | "trace"}        # trace: named only by the trace's ImageLoad events, checked
                                                # against the file's TimeDateStamp and SizeOfImage
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
from pooltrace.jsonrules import DROP, U32, U64, Field, load_json, opt, validate

if TYPE_CHECKING:  # pyarrow is loaded by the commands that read datasets, not by `pooltrace record`
    import pyarrow as pa

SIDECAR_SUFFIX = ".pooltrace.json"
FORMAT, VERSION = "pooltrace-sidecar", 1


def sidecar_path(etl_path: str | os.PathLike) -> Path:
    p = Path(etl_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def read_sidecar(etl_path: str | os.PathLike) -> dict | None:
    """The sidecar of a trace, or None when there is none. A sidecar that is not ours or is damaged is an
    error (PooltraceError), so a stale or foreign file is never joined silently. The content is as written
    (not validated): analysis uses :func:`load_sidecar`."""
    path = sidecar_path(etl_path)
    if not os.path.lexists(path):
        return None
    data = load_json(path, "pooltrace sidecar")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PooltraceError(f"{path} is not a pooltrace sidecar")
    if data.get("version") != VERSION:
        raise PooltraceError(f"{path} has sidecar version {data.get('version')!r}; this pooltrace reads {VERSION}")
    return data


def load_sidecar(etl_path: str | os.PathLike) -> tuple[dict | None, list[str]]:
    """The sidecar for analysis, never an error: (validated content or None, warnings). A file that cannot
    be read or is not a pooltrace sidecar is ignored whole; a field whose value has the wrong type or range
    is dropped (a module or tag entry that lacks a required field is dropped whole). Each warning names the
    file and what was ignored; unknown keys (fields newer recorders add) are kept."""
    try:
        data = read_sidecar(etl_path)
    except PooltraceError as exc:
        return None, [f"sidecar ignored: {exc}"]
    if data is None:
        return None, []
    clean, problems = validate(data, SCHEMA)
    if clean is DROP:
        return None, [f"sidecar ignored: {sidecar_path(etl_path)}: {problems[0]}"]
    if not problems:
        return clean, []
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return clean, [f"sidecar {sidecar_path(etl_path)}: ignored {shown}"]


# ---- the schema of what pooltrace reads from a sidecar ------------------------------------------------

_SNAPSHOT = Field("object", null=True, members={
    "utc": opt("str"),
    "entries": Field("list", required=True, item=Field("object", members={
        "tag": Field("str", required=True), "value": opt("int", hi=U32),
        **{f"{pool}_{what}": Field("int", required=True, hi=U32 if what != "bytes" else U64)
           for pool in ("paged", "nonpaged") for what in ("allocs", "frees", "bytes")}})),
})
SCHEMA = Field("object", members={
    "format": Field("str"), "version": Field("int"), "trace": opt("str"), "created_by": opt("str"),
    "recording": opt("object", members={
        "windows": opt("str"), "pointer_size": opt("int", hi=8), "logger": opt("str"),
        "logger_kind": opt("str"), "log_file_mode": opt("int", hi=U32), "max_file_mb": opt("int", hi=U64),
        "buffer_size_kb": opt("int", hi=U32), "minimum_buffers": opt("int", hi=U32),
        "maximum_buffers": opt("int", hi=U32), "stacks": opt("list", item=Field("str")),
        "tag_filter": opt("list", item=Field("str")), "started_utc": opt("str"), "stopped_utc": opt("str"),
        "seconds": opt("number"), "stopped_by": opt("str"), "command": opt("list", item=Field("str")),
        "command_exit_code": opt("int", lo=-(1 << 63), hi=U64), "events_lost": opt("int", hi=U64),
        "buffers_lost": opt("int", hi=U64), "realtime_buffers_lost": opt("int", hi=U64),
        "buffers_written": opt("int", hi=U64), "circular": opt("bool"),
        "kernel_state": opt("object", members={
            "pool_enabled": opt("bool"), "group_masks": opt("list", item=Field("hex")),
            "stacks_enabled": opt("bool"), "stack_hooks": opt("list", item=Field("hex")),
            "stacks_set_by": opt("str"), "group_mask_set_by": opt("str"),
            "tag_filter": opt("list", item=Field("str")), "tag_filter_in_effect": opt("bool"),
            "unverified": opt("list", item=Field("str"))}),
        "debug_privilege": opt("str"), "module_bases": opt("str")}),
    "modules": opt("list", item=Field("object", members={
        "name": Field("str", required=True), "nt_path": opt("str"), "path": opt("str"), "base": opt("hex"),
        "size": opt("int", hi=U64), "timedatestamp": opt("int", hi=U32), "checksum": opt("int", hi=U32),
        "pdb_name": opt("filename"), "pdb_guid": opt("guid"), "pdb_age": opt("int", hi=U32),
        "pdb_path": opt("str"), "source": opt("str")})),
    "module_errors": opt("list", item=Field("object", members={
        "nt_path": opt("str"), "path": opt("str"), "error": opt("str")})),
    "pool_tags": opt("object", members={
        "filter": opt("list", item=Field("str")), "start": _SNAPSHOT, "stop": _SNAPSHOT}),
})


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
        r["pdb_name"], r["pdb_guid"], r["pdb_age"] = hit.get("pdb_name"), hit["pdb_guid"], hit.get("pdb_age")
        if not r["timedatestamp"] and hit.get("timedatestamp"):
            r["timedatestamp"] = int(hit["timedatestamp"])
        changed = True
    if not changed:
        return modules
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=modules.schema)


def tag_counters(sidecar: dict | None) -> dict[str, list[dict] | None]:
    """The kernel's per-tag counters saved at the start and at the stop (None where not saved), in the form
    pooltrace.baseline takes."""
    pool = (sidecar or {}).get("pool_tags") or {}
    return {when: ((pool.get(when) or {}).get("entries") if pool.get(when) else None) for when in ("start", "stop")}


def tag_baseline(sidecar: dict | None) -> dict[str, dict]:
    """Per tag: outstanding allocations and bytes (paged + nonpaged) by the kernel's counters at the start
    and at the stop of the recording, e.g. ``{"Leak": {"start": {"allocs": 12, "bytes": 4096}, "stop": ...}}``.
    "start" is what was outstanding before the trace began: allocations the trace cannot pair."""
    from pooltrace.baseline import from_counters

    return {tag: {when: ({"allocs": e["allocs"], "bytes": e["bytes"]} if e else None) for when, e in v.items()}
            for tag, v in from_counters(tag_counters(sidecar)).items()}
