"""Who owns a pool tag: three independent answers, each with its evidence (the logic of ``pooltrace whose``).

1. the trace: the modules whose call sites allocate TAG, from the allocation stacks (a ``.etl``, paired on
   the fly or through an up-to-date ``<trace>.pooltrace/`` beside it, or a dataset directory); the call
   site is the first frame past the pool allocator (ntoskrnl's ``ExAllocate*``/``ExpAllocate*`` routines,
   or, without kernel symbols, past the leading ntoskrnl frames);
2. pooltag.txt: the user's copy from the Debugging Tools for Windows (found by ``find_pooltag``), wildcard
   entries (``Afd?``) included;
3. the driver files: every PE image in the given directories (default on Windows
   ``%SystemRoot%\\System32\\drivers``) holding the tag's four bytes, with each offset, its section and,
   in code, the instruction that loads it (``mov r8d, imm32`` is the Tag argument of ExAllocatePool*).

A tag is given as poolmon prints it (``Leak``, ``Irp`` for ``Irp ``, ``\\x01abc``); ``?`` matches any one
character and ``*`` the rest (``Lea?``, ``Ntf*``).
"""

from __future__ import annotations

import mmap
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pooltrace.errors import PooltraceError
from pooltrace.modulemap import KERNEL_IMAGES, ModuleMap, frame_text
from pooltrace.pe import PeError, parse_pe
from pooltrace.symbols.pooltag import find_pooltag, read_pooltag

ANY = -1
ALLOCATOR = re.compile(r"(Exp?Allocate\w*|ExpAllocateFrom\w*|Vf\w*Allocate\w*|VerifierEx\w*Allocate\w*|"
                       r"Etw\w*|Perf\w*|Exp?Free\w*)")
MAX_SCAN_FILE = 512 << 20
MAX_OFFSETS = 16
DATASET_FILES = ("allocations.parquet", "stacks.parquet", "modules.parquet", "trace.json")
OWNER_COLUMNS = ["tag", "size", "alloc_ns", "fate", "pid", "alloc_stack"]  # of allocations.parquet
# instruction bytes right before an imm32 and what they mean (x64 calling convention: rcx, rdx, r8, r9)
_LOADS = [(b"\x41\xb8", "mov r8d, imm32 (3rd argument: the Tag of ExAllocatePool*)"),
          (b"\x41\xb9", "mov r9d, imm32 (4th argument)"),
          (b"\x41\xba", "mov r10d, imm32"),
          (b"\xba", "mov edx, imm32 (2nd argument: the Tag of ExFreePoolWithTag)"),
          (b"\xb9", "mov ecx, imm32 (1st argument)"),
          (b"\x68", "push imm32 (x86 stack argument)")]


# -- the tag ----------------------------------------------------------------------------------------------
def tag_slots(text: str) -> list[int]:
    """TAG as 4 byte slots (ANY for a wildcard): ``Irp`` -> ``Irp `` (padded like poolmon), ``Le*`` ->
    ``L e ANY ANY``, ``\\x01abc`` -> bytes."""
    slots: list[int] = []
    i = 0
    star = False
    while i < len(text):
        c = text[i]
        if text.startswith("\\x", i) and i + 4 <= len(text):
            try:
                slots.append(int(text[i + 2:i + 4], 16))
            except ValueError:
                raise PooltraceError(f"bad escape in pool tag {text!r}") from None
            i += 4
            continue
        if c == "*":
            star = True
            break
        if c == "?":
            slots.append(ANY)
        else:
            b = c.encode("latin-1", "replace")
            if len(b) != 1 or c not in b.decode("latin-1"):
                raise PooltraceError(f"pool tag {text!r}: {c!r} is not a single-byte character")
            slots.append(b[0])
        i += 1
    if len(slots) > 4 or not slots and not star:
        raise PooltraceError(f"pool tag {text!r}: a tag is 1 to 4 characters")
    slots += [ANY if star else 0x20] * (4 - len(slots))
    return slots


def _tag_bytes(tag: str) -> bytes:
    from pooltrace.tags import parse_tag

    return parse_tag(tag).to_bytes(4, "little")


def slots_match(slots: list[int], raw: bytes, raw_wild: bytes = b"") -> bool:
    """`raw` (4 bytes) against the slots; positions where `raw_wild` has ``?`` match anything."""
    for k, s in enumerate(slots):
        if s == ANY or raw_wild[k:k + 1] == b"?":
            continue
        if raw[k] != s:
            return False
    return True


def slots_text(slots: list[int]) -> str:
    return "".join("?" if s == ANY else chr(s) if 0x20 <= s < 0x7F and s != 0x5C else f"\\x{s:02x}"
                   for s in slots)


def _slots_regex(slots: list[int]) -> re.Pattern:
    return re.compile(b"".join(b"." if s == ANY else re.escape(bytes([s])) for s in slots), re.S)


# -- answer 1: the trace ----------------------------------------------------------------------------------
def open_dataset(path: Path, progress=None) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The dataset directory for `path`: itself, an up-to-date ``<trace>.pooltrace/``, or a fresh pairing
    into a temporary directory (returned too, for the caller to clean up)."""
    from pooltrace.datasetcheck import verify_dataset
    from pooltrace.datasetopen import fresh_cache

    if path.is_dir():
        missing = [f for f in DATASET_FILES if not (path / f).exists()]
        if missing:
            raise PooltraceError(f"{path}: not a pooltrace dataset (missing {', '.join(missing)})")
        verify_dataset(path, OWNER_COLUMNS)
        return path, None
    from pooltrace.dataset import pair_trace
    from pooltrace.datasetschema import default_output

    ds = default_output(path)
    try:
        if all((ds / f).exists() for f in DATASET_FILES) and fresh_cache(ds, path):
            verify_dataset(ds, OWNER_COLUMNS)
            return ds, None
    except (OSError, PooltraceError):
        pass  # no usable cache (a damaged one is not trusted): pair again, into a temporary directory
    tmp = tempfile.TemporaryDirectory(prefix="pooltrace-whose-")
    try:
        pair_trace(path, Path(tmp.name) / "ds", progress=progress)
    except BaseException:
        tmp.cleanup()
        raise
    return Path(tmp.name) / "ds", tmp


def trace_owners(ds: Path, slots: list[int], *, symbols: str | None, enabled: bool, local_dirs: list[Path],
                 quiet: bool, top: int, warn) -> dict:
    from pooltrace.datasetcheck import (
        MODULE_KEYS,
        check_no_nulls,
        check_stacks,
        read_parquet,
        read_trace_json,
        rerun_error,
    )
    from pooltrace.notices import closest, pool_verdict, trace_warnings

    meta = read_trace_json(ds)
    allocs = read_parquet(ds / "allocations.parquet", columns=OWNER_COLUMNS)
    check_no_nulls(ds / "allocations.parquet", allocs, ["tag", "size", "fate", "pid"])
    tags = pc.unique(allocs["tag"]).to_pylist()
    try:
        wanted = [t for t in tags if t is not None and slots_match(slots, _tag_bytes(t))]
    except ValueError as exc:  # a tag column that holds something else (columns swapped, tampered)
        raise rerun_error(ds / "allocations.parquet", f"column tag: {exc}") from None
    rows = allocs.filter(pc.and_(pc.is_in(allocs["tag"], pa.array(wanted, pa.string())),
                                 pc.is_valid(allocs["alloc_ns"])))
    source = meta.get("source")
    out = {"dataset": str(ds), "trace": source.get("path") if isinstance(source, dict) else source,
           "tags": sorted(wanted), "allocations": rows.num_rows, "outstanding": 0,
           "outstanding_bytes": 0, "without_stack": 0, "owners": [], "symbols": [],
           "pool_verdict": pool_verdict(meta), "warnings": trace_warnings(meta),
           "closest_tags": [] if wanted else closest(slots_text(slots).strip("?* "), [t.strip() for t in tags if t])}
    if not rows.num_rows:
        return out
    fate = rows["fate"].cast(pa.string()).to_numpy(zero_copy_only=False)
    size = rows["size"].to_numpy()
    outstanding = fate == "outstanding"
    out["outstanding"] = int(outstanding.sum())
    out["outstanding_bytes"] = int(size[outstanding].sum())
    stack_col = rows["alloc_stack"]
    has = pc.is_valid(stack_col).to_numpy(zero_copy_only=False)
    out["without_stack"] = int((~has).sum())
    sid = stack_col.fill_null(-1).to_numpy()
    ids, inv = np.unique(sid[has], return_inverse=True)
    if not len(ids):
        return out
    n_alloc = np.bincount(inv, minlength=len(ids))
    n_out = np.bincount(inv, weights=outstanding[has], minlength=len(ids)).astype(np.int64)
    b_out = np.bincount(inv, weights=np.where(outstanding[has], size[has], 0), minlength=len(ids)).astype(np.int64)
    b_all = np.bincount(inv, weights=size[has], minlength=len(ids)).astype(np.int64)
    first = {}
    pid = rows["pid"].to_numpy()[has]
    ns = rows["alloc_ns"].to_numpy()[has]
    for k, j in enumerate(inv.tolist()):
        first.setdefault(j, k)
    st = read_parquet(ds / "stacks.parquet")
    check_no_nulls(ds / "stacks.parquet", st, ["stack_id"])
    check_stacks(ds, st["stack_id"].to_numpy(), sid)
    st = st.filter(pc.is_in(st["stack_id"], pa.array(ids, pa.int64())))
    frames_by_id = dict(zip(st["stack_id"].to_pylist(), st["frames"].to_pylist(), strict=True))
    modules = read_parquet(ds / "modules.parquet")
    check_no_nulls(ds / "modules.parquet", modules, MODULE_KEYS)
    mm = ModuleMap(modules, int(meta.get("pointer_size") or 8))
    flat, f_pid, f_ns, f_ret, owner_of = [], [], [], [], []
    for j, s in enumerate(ids.tolist()):
        fr = frames_by_id.get(s) or []
        k = first[j]
        flat.extend(fr)
        f_pid.extend([int(pid[k])] * len(fr))
        f_ns.extend([int(ns[k])] * len(fr))
        f_ret.extend([False] + [True] * (len(fr) - 1) if fr else [])
        owner_of.append((len(flat) - len(fr), len(fr)))
    addr = np.array(flat, dtype=np.uint64)
    mod, rva = mm.locate(addr, np.array(f_pid, dtype=np.int64), np.array(f_ns, dtype=np.int64))
    from pooltrace.symbols import Symbolizer

    sym = Symbolizer(modules, symbol_path=symbols, enabled=enabled, local_dirs=local_dirs, progress=not quiet,
                     warn=warn)
    names = sym.lookup(mod, rva, np.array(f_ret, dtype=bool))
    mod_l, rva_l, addr_l = mod.tolist(), rva.tolist(), addr.tolist()

    def text(i: int) -> str:
        m = mod_l[i]
        return frame_text(mm.names[m] if m >= 0 else None, rva_l[i], addr_l[i], names[i])

    owners: dict[str, dict] = {}
    for j, (start, count) in enumerate(owner_of):
        site = None
        for i in range(start, start + count):
            m = mod_l[i]
            mname = mm.names[m].lower() if m >= 0 else ""
            if names[i] is not None:
                if ALLOCATOR.fullmatch(names[i][0]):
                    continue
            elif mname in KERNEL_IMAGES:
                continue  # no symbols for the kernel: its leading frames are taken as the allocator
            site = i
            break
        if site is None:
            owner, site_text, caller = "(allocator only)", "(no frame past the allocator)", None
        else:
            owner = mm.names[mod_l[site]] if mod_l[site] >= 0 else "(no module)"
            site_text = text(site)
            caller = text(site + 1) if site + 1 < start + count else None
        o = owners.setdefault(owner, {"module": owner, "allocations": 0, "outstanding": 0, "outstanding_bytes": 0,
                                      "bytes": 0, "sites": {}})
        o["allocations"] += int(n_alloc[j])
        o["outstanding"] += int(n_out[j])
        o["outstanding_bytes"] += int(b_out[j])
        o["bytes"] += int(b_all[j])
        s = o["sites"].setdefault(site_text, {"site": site_text, "caller": caller, "allocations": 0,
                                              "outstanding": 0, "outstanding_bytes": 0})
        s["allocations"] += int(n_alloc[j])
        s["outstanding"] += int(n_out[j])
        s["outstanding_bytes"] += int(b_out[j])
    ranked = sorted(owners.values(), key=lambda o: (-o["allocations"], o["module"]))
    for o in ranked:
        o["sites"] = sorted(o["sites"].values(), key=lambda s: (-s["allocations"], s["site"]))[:top]
    out["owners"] = ranked
    out["symbols"] = sym.status()
    return out


# -- answer 3: the files ----------------------------------------------------------------------------------
def default_driver_dirs() -> list[Path]:
    if sys.platform != "win32":
        return []
    return [Path(os.environ.get("SYSTEMROOT") or r"C:\Windows") / "System32" / "drivers"]


def _walk(target: Path):
    if target.is_file():
        yield target, True
        return
    for root, dirs, files in os.walk(target, followlinks=False):
        dirs.sort()
        for f in sorted(files):
            yield Path(root) / f, False


def scan_files(targets: list[Path], slots: list[int]) -> dict:
    """Every PE image under `targets` holding the tag. A file given explicitly is scanned whatever it is, but
    counted in ``files_scanned`` only when it parses as a PE image; otherwise it is listed in ``not_images``."""
    rx = _slots_regex(slots)
    hits, scanned, errors, not_images = [], 0, 0, []
    for target in targets:
        if not target.exists():
            raise PooltraceError(f"{target}: no such file or directory")
        for path, explicit in _walk(target):
            try:
                if path.is_symlink() or not path.is_file():
                    continue
                size = path.stat().st_size
                if not size or size > MAX_SCAN_FILE:
                    continue
                with open(path, "rb") as f:
                    is_image = _is_pe(f)
                    if not explicit and not is_image:
                        continue
                    if is_image:
                        scanned += 1
                    else:
                        not_images.append(str(path))
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                        found = [m.start() for m in rx.finditer(data)]
                        if found:
                            hits.append(_describe(path, data, found))
            except (OSError, ValueError):
                errors += 1
    return {"targets": [str(t) for t in targets], "files_scanned": scanned, "unreadable": errors, "files": hits,
            "not_images": not_images}


def _is_pe(f) -> bool:
    """The open file starts with MZ and its headers parse as a PE image."""
    if f.read(2) != b"MZ":
        return False
    try:
        parse_pe(f)
    except PeError:
        return False
    finally:
        f.seek(0)
    return True


def _describe(path: Path, data, offsets: list[int]) -> dict:
    try:
        pe = parse_pe(path)
    except (OSError, PeError):
        pe = None
    items = []
    for off in offsets[:MAX_OFFSETS]:
        sect = pe.section_at_offset(off) if pe else None
        load = None
        if sect is not None and sect.executable:
            load = next((what for prefix, what in _LOADS if data[max(0, off - len(prefix)):off] == prefix),
                        "in code")
        items.append({"offset": off, "section": sect.name if sect else None,
                      "rva": pe.rva_of_offset(off) if pe else None,
                      "literal": bytes(data[off:off + 4]).decode("latin-1"), "instruction": load})
    strong = sum(1 for i in items if i["instruction"] and i["instruction"].startswith(("mov", "push")))
    return {"path": str(path), "count": len(offsets), "code_loads": strong, "offsets": items}


# -- the three answers together ---------------------------------------------------------------------------
def split_paths(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(traces, scan targets): dataset directories and ``.etl`` files are traces, the rest is scanned."""
    traces, targets = [], []
    for p in map(Path, paths):
        if p.is_dir() and (p / "trace.json").exists() and (p / "allocations.parquet").exists():
            traces.append(p)
        elif p.suffix.lower() == ".etl":
            if not p.is_file():
                raise PooltraceError(f"{p}: not a regular file; give an .etl file" if p.exists()
                                     else f"{p}: no such trace")
            traces.append(p)
        else:
            targets.append(p)
    return traces, targets


def pooltag_entries(slots: list[int], pooltag: Path | None = None) -> dict:
    """The pooltag.txt answer: the file found (``find_pooltag``) and its entries matching the tag."""
    pt = find_pooltag(pooltag)
    if pt is None:
        return {"file": None, "entries": []}
    try:
        parsed = read_pooltag(pt)
    except OSError as exc:
        raise PooltraceError(f"{pt}: cannot read pooltag.txt: {exc.strerror or exc}") from None
    entries = [e for e in parsed.entries
               if slots_match(slots, e.tag.encode("latin-1", "replace"), e.tag.encode("latin-1", "replace"))]
    entries.sort(key=lambda e: (e.wildcard, e.line))
    return {"file": str(pt), "entries": [
        {"tag": e.tag, "binary": e.binary, "module": e.module, "component": e.component,
         "description": e.description, "line": e.line, "wildcard": e.wildcard} for e in entries]}


def find_owners(tag: str, paths: Iterable[Path | str] = (), *, pooltag: Path | None = None,
                symbols: str | None = None, no_symbols: bool = False, scan: bool = True, top: int = 10,
                quiet: bool = True, warn: Callable[[str], None] | None = None,
                pairing_progress: Callable[[Path], AbstractContextManager] | None = None) -> dict:
    """Who owns pool tag `tag`: ``{"tag", "query", "pooltag", "trace"?, "scan", "warnings", "verdict"}``.

    `paths`: at most one trace (``.etl`` or dataset directory) and directories or files to scan (default
    on Windows the drivers directory). `pairing_progress(path)` is a context manager yielding a
    progress(done, total) callback for pairing a trace on the fly (the CLI's progress bar)."""
    slots = tag_slots(tag)
    traces, targets = split_paths(paths)
    if len(traces) > 1:
        raise PooltraceError("give at most one trace or dataset")
    answer: dict = {"tag": slots_text(slots), "query": tag}
    warnings: list[str] = []

    def warned(message: str) -> None:
        warnings.append(message)
        if warn is not None:
            warn(message)

    answer["pooltag"] = pooltag_entries(slots, pooltag)
    if traces:
        src = traces[0]
        bar = pairing_progress(src if src.is_file() else src / "allocations.parquet") if pairing_progress \
            else nullcontext(None)
        with bar as progress:
            ds, tmp = open_dataset(src, progress)
        try:
            local = [src.parent if src.is_file() else src, ds]
            if src.is_dir():
                local.append(src.parent)
            answer["trace"] = trace_owners(ds, slots, symbols=symbols, enabled=not no_symbols, local_dirs=local,
                                           quiet=quiet, top=top, warn=warned)
        finally:
            if tmp is not None:
                tmp.cleanup()
        answer["trace"]["source"] = str(src)
    if scan:
        dirs = targets or default_driver_dirs()
        answer["scan"] = scan_files(dirs, slots) if dirs else None
    else:
        answer["scan"] = None
    answer["warnings"] = warnings
    answer["verdict"] = verdict(answer)
    return answer


def verdict(a: dict) -> str:
    """One line naming the owners each answer found."""
    parts = []
    tr = a.get("trace")
    if tr and tr["owners"]:
        o = tr["owners"][0]
        parts.append(f"the trace's call sites are in {o['module']}" +
                     (f" (and {len(tr['owners']) - 1} other module(s))" if len(tr["owners"]) > 1 else ""))
    mods = sorted({e["module"] for e in a["pooltag"]["entries"] if e["module"]})
    if mods:
        parts.append("pooltag.txt says " + ", ".join(mods))
    sc = a.get("scan")
    if sc and sc["files"]:
        best = sorted(sc["files"], key=lambda f: (-f["code_loads"], -f["count"], f["path"]))
        names = [Path(f["path"]).name for f in best[:3]]
        parts.append("the tag's bytes are in " + ", ".join(names) + (" ..." if len(best) > 3 else ""))
    if not parts:
        return f"no owner found for {a['tag']!r}"
    return f"{a['tag']!r}: " + "; ".join(parts)
