"""Symbols: turn ``module+rva`` frames into ``module!function+offset`` with the modules' PDBs.

    sym = Symbolizer(modules, symbol_path=None, local_dirs=[trace_dir])
    sym.lookup(mod_rows, rvas)   # [(function, offset) | None, ...]
    sym.status()                 # per module asked about: found / not found / mismatch / no identity

PDBs are located lazily, once per PDB identity (name, GUID, DBI age) of the module rows actually asked
about, in this order: the parsed-table cache, `local_dirs` (plain directories; ``<dir>/symbols`` as a
symbol store), then the symbol path (``--symbols`` or ``_NT_ALT_SYMBOL_PATH``/``_NT_SYMBOL_PATH``, WinDbg
syntax, see symbolpath.py). Without a symbol path nothing touches the network. A module without a PDB
identity in the trace (an unmerged trace) is identified through its image: ``name/<TimeDateStamp><
SizeOfImage>/name`` in the same places, whose RSDS record names the PDB.

A PDB is used only when its GUID and DBI age equal the trace's; a mismatched one is reported and never
used. Names from the trace are untrusted and reduced to plain file names (names.safe_file_name).
"""

from __future__ import annotations

import bisect
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pooltrace.errors import PooltraceError
from pooltrace.pe import PeError, parse_pe
from pooltrace.symbols.names import image_key, inside, pdb_key, safe_file_name
from pooltrace.symbols.pdbtable import CACHE_VERSION, FunctionTable, PdbReadError, read_pdb
from pooltrace.symbols.store import Found, Locator
from pooltrace.symbols.symbolpath import SymbolPathError, default_cache_dir, parse_symbol_path, uses_network

__all__ = ["Symbolizer", "default_cache_dir", "system_image_dirs"]

FOUND, NOT_FOUND, MISMATCH, NO_IDENTITY, DISABLED = "found", "not found", "mismatch", "no identity", "disabled"
SMALL_LOOKUP = 64
_UNSET = object()


def system_image_dirs() -> list[Path]:
    """Where a Windows machine keeps kernel images: searched (by file name only, matched by
    TimeDateStamp and SizeOfImage) to identify a module of an unmerged trace recorded on this machine."""
    if sys.platform != "win32":
        return []
    root = Path(os.environ.get("SYSTEMROOT") or r"C:\Windows")
    return [root / "System32" / "drivers", root / "System32"]


@dataclass
class _Group:
    """One PDB identity (or one image key, for rows without one): resolved once, shared by its rows."""

    module: str
    pdb_name: str | None = None
    guid: uuid.UUID | None = None
    age: int | None = None
    image: tuple[str, str] | None = None  # (file name, image key) when the identity must come from the image
    status: str | None = None
    source: str | None = None
    detail: str = ""
    table: FunctionTable | None = None

    def as_dict(self) -> dict:
        return {"module": self.module, "pdb_name": self.pdb_name,
                "pdb_guid": str(self.guid) if self.guid else None, "pdb_age": self.age,
                "status": self.status, "source": self.source, "detail": self.detail}


class Symbolizer:
    def __init__(self, modules: pa.Table, symbol_path: str | None = None, enabled: bool = True,
                 local_dirs: Iterable[str | os.PathLike] = (), cache_dir: str | os.PathLike | None = None,
                 progress: bool = True, warn: Callable[[str], None] | None = None):
        self.enabled = enabled
        self.warnings: list[str] = []
        self._warn_cb = warn
        cols = ["name", "pdb_name", "pdb_guid", "pdb_age", "timedatestamp", "size"]
        data = modules.select(cols).to_pydict() if modules.num_rows else {c: [] for c in cols}
        self._names = data["name"]
        self._pdb_names = data["pdb_name"]
        self._guids = data["pdb_guid"]
        self._ages = data["pdb_age"]
        self._tds = data["timedatestamp"]
        self._sizes = data["size"]
        if symbol_path is None:
            symbol_path = ";".join(p for p in (os.environ.get("_NT_ALT_SYMBOL_PATH"),
                                               os.environ.get("_NT_SYMBOL_PATH")) if p)
        self.symbol_path = symbol_path or ""
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        try:
            self.entries = parse_symbol_path(self.symbol_path, self.cache_dir / "sym")
        except SymbolPathError as exc:
            raise PooltraceError(str(exc)) from None
        self.online = uses_network(self.entries)
        self.local_dirs = [Path(d) for d in local_dirs]
        self.progress = progress
        self._locator: Locator | None = None
        self._row_group: dict[int, _Group] = {}
        self._row_table: dict[int, FunctionTable | None] = {}
        self._groups: dict[tuple, _Group] = {}
        self._pdbs: dict[tuple[str, str], tuple[str, str | None, str, FunctionTable | None]] = {}
        self._cache_ok = True

    # -- API ------------------------------------------------------------------------------------------
    def lookup(self, mod_rows, rvas, return_address=True) -> list[tuple[str, int] | None]:
        """(function, offset of the address itself from the function's start) per frame, or None.
        With `return_address` (a bool, or one per frame) the function holding ``rva - 1`` is looked up."""
        mod_rows = np.asarray(mod_rows, dtype=np.int64).ravel()
        rvas = np.asarray(rvas, dtype=np.uint64).ravel()
        n = len(mod_rows)
        if len(rvas) != n:
            raise ValueError("mod_rows and rvas differ in length")
        out: list[tuple[str, int] | None] = [None] * n
        if not n:
            return out
        ra = np.broadcast_to(np.asarray(return_address, dtype=bool), (n,))
        if n <= SMALL_LOOKUP:  # one stack at a time: plain Python beats numpy's per-call overhead
            return self._lookup_small(mod_rows.tolist(), rvas.tolist(), ra.tolist(), out)
        # sorted(set()) rather than np.unique, which imports numpy.ma (tens of ms of a report's start)
        present = sorted(set(mod_rows[(mod_rows >= 0) & (mod_rows < len(self._names))].tolist()))
        tables = {r: self._table_for_row(r) for r in present}
        live = [r for r in present if tables[r] is not None]
        if not live:
            return out
        if len(live) == 1 and len(present) == 1 and (mod_rows == live[0]).all():
            groups = [(live[0], np.arange(n))]
        else:
            order = np.argsort(mod_rows, kind="stable")
            srt = mod_rows[order]
            lo = np.searchsorted(srt, live, side="left")
            hi = np.searchsorted(srt, live, side="right")
            groups = [(r, order[a:b]) for r, a, b in zip(live, lo.tolist(), hi.tolist(), strict=True)]
        for r, idx in groups:
            t = tables[r]
            q = rvas[idx]
            look = np.where(ra[idx] & (q > 0), q - np.uint64(1), q)
            f = t.find(look)
            ok = f >= 0
            if not ok.any():
                continue
            f_ok = f[ok]
            off = (q[ok] - t.func_start[f_ok]).astype(np.int64)
            names = t.names
            for i, fi, o in zip(idx[ok].tolist(), f_ok.tolist(), off.tolist(), strict=True):
                out[i] = (names[fi], o)
        return out

    def _lookup_small(self, rows: list[int], rvas: list[int], ra: list[bool], out: list) -> list:
        limit = len(self._names)
        resolved = self._row_table
        bisect_right = bisect.bisect_right
        for i, (r, q, is_ret) in enumerate(zip(rows, rvas, ra, strict=True)):
            if r < 0 or r >= limit:
                continue
            t = resolved.get(r, _UNSET)
            if t is _UNSET:
                t = self._table_for_row(r)
            if t is None:
                continue
            starts, funcs, fstart = t.lists()
            look = q - 1 if is_ret and q > 0 else q
            j = bisect_right(starts, look) - 1
            if j >= 0 and funcs[j] >= 0:
                f = funcs[j]
                out[i] = (t.names[f], q - fstart[f])
        return out

    def status(self) -> list[dict]:
        """One entry per module/PDB identity asked about, in the order they were first asked."""
        return [g.as_dict() for g in self._groups.values()]

    # -- resolution -----------------------------------------------------------------------------------
    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        if self._warn_cb is not None:
            self._warn_cb(message)

    @property
    def locator(self) -> Locator:
        if self._locator is None:
            self._locator = Locator(self.entries, self.local_dirs, warn=self._warn, progress=self.progress)
        return self._locator

    def _table_for_row(self, row: int) -> FunctionTable | None:
        g = self._row_group.get(row)
        if g is None:
            g = self._group_for_row(row)
            self._row_group[row] = g
        if g.status is None:
            self._resolve(g)
        table = g.table if g.table is not None and len(g.table) else None
        self._row_table[row] = table
        return table

    def _group_for_row(self, row: int) -> _Group:
        name = self._names[row] or ""
        if not self.enabled:
            return self._group(("disabled", name.lower()), _Group(name, status=DISABLED, detail="--no-symbols"))
        pdb_name, guid, age = self._pdb_names[row], self._guids[row], self._ages[row]
        if pdb_name and guid and age is not None:
            safe = safe_file_name(pdb_name)
            try:
                g_uuid = uuid.UUID(str(guid))
            except ValueError:
                g_uuid = None
            if safe is None or g_uuid is None:
                what = f"unsafe PDB name {pdb_name!r}" if safe is None else f"malformed PDB GUID {guid!r}"
                self._warn(f"symbols: {name}: {what} in the trace; not looked up")
                return self._group(("bad", name.lower(), pdb_name, guid),
                                   _Group(name, pdb_name, None, age, status=NO_IDENTITY, detail=what))
            return self._group(("pdb", safe.lower(), pdb_key(g_uuid, age)), _Group(name, safe, g_uuid, int(age)))
        image = safe_file_name(name)
        tds, size = self._tds[row], self._sizes[row]
        if image and tds and size:
            return self._group(("image", image.lower(), image_key(tds, size)),
                               _Group(name, image=(image, image_key(tds, size))))
        why = ("the trace has no PDB identity for it (not a merged trace) and no TimeDateStamp to find its image"
               if image else f"unsafe module name {name!r}")
        return self._group(("none", name.lower()), _Group(name, status=NO_IDENTITY, detail=why))

    def _group(self, key: tuple, g: _Group) -> _Group:
        return self._groups.setdefault(key, g)

    def _resolve(self, g: _Group) -> None:
        if g.image is not None and g.pdb_name is None and not self._identify_from_image(g):
            return
        g.status, g.source, g.detail, g.table = self._pdb(g.pdb_name, g.guid, g.age, g.detail)

    def _pdb(self, name: str, guid: uuid.UUID, age: int, note: str
             ) -> tuple[str, str | None, str, FunctionTable | None]:
        key = pdb_key(guid, age)
        memo = self._pdbs.get((name.lower(), key))
        if memo is not None:
            return memo
        prefix = f"{note}; " if note else ""
        cache_file = self._cache_path("tables", name, key, f"functions-v{CACHE_VERSION}.npz")
        table = FunctionTable.load(cache_file) if cache_file is not None and cache_file.exists() else None
        if table is not None and table.meta.get("guid") == str(guid) and table.meta.get("age") == age:
            # the file used now is the cached table (named by the PDB's identity), not the PDB it was first
            # built from: that may be in another checkout, or gone
            result = (FOUND, str(cache_file), f"{prefix}{len(table):,} functions (cached table)", table)
        else:
            found = self.locator.find(name, key, self._pdb_validator(guid, age), kind="pdb")
            if found.status == FOUND:
                table = found.payload
                table.meta["source"] = found.source
                if cache_file is not None:
                    self._save(table, cache_file)
                kind = "public symbols only" if table.meta.get("public_only") else "full symbols"
                result = (FOUND, found.source, f"{prefix}{len(table):,} functions ({kind})", table)
            else:
                result = (found.status, None, prefix + self._not_found_detail(name, key, found), None)
                if found.status == NOT_FOUND and self.symbol_path:  # offline, a miss is the expected case
                    self._warn(f"symbols: {name} {key} not found ({self._where()})")
        self._pdbs[(name.lower(), key)] = result
        return result

    def _identify_from_image(self, g: _Group) -> bool:
        image, ikey = g.image
        note_file = self._cache_path("images", image, ikey, "identity.json")
        ident = None
        if note_file is not None and note_file.exists():
            try:
                ident = json.loads(note_file.read_text())  # the image it was read from may be gone: not named
                ident = (str(ident["pdb_name"]), uuid.UUID(ident["guid"]), int(ident["age"]), f"cached in {note_file}")
            except (OSError, ValueError, KeyError, TypeError):
                ident = None
        if ident is None:
            ext = image.rsplit(".", 1)[-1].lower() if "." in image else "bin"
            found = self.locator.find(image, ikey, self._image_validator(image, ikey), kind=ext)
            if found.status != FOUND:
                found = self._system_image(image, ikey) or found
            if found.status != FOUND:
                g.status = NO_IDENTITY if found.status == NOT_FOUND else MISMATCH
                g.detail = (f"the trace has no PDB identity for {image} (not a merged trace) and the image "
                            f"{image}/{ikey} was " + ("not found" if found.status == NOT_FOUND else
                                                      f"mismatched: {found.detail}"))
                return False
            cv = found.payload
            if cv is None:
                g.status, g.detail, g.source = NO_IDENTITY, f"{found.source} has no RSDS debug record", found.source
                return False
            pdb_name = safe_file_name(cv.pdb_path)
            if pdb_name is None:
                g.status, g.detail = NO_IDENTITY, f"{found.source}: unsafe PDB name {cv.pdb_path!r}"
                self._warn(f"symbols: {g.detail}")
                return False
            ident = (pdb_name, cv.guid, cv.age, f"from the image {found.source}")
            if note_file is not None:
                self._write_text(note_file, json.dumps({"pdb_name": pdb_name, "guid": str(cv.guid), "age": cv.age,
                                                        "source": found.source}))
        g.pdb_name, g.guid, g.age = ident[0], ident[1], ident[2]
        g.detail = f"PDB identity {ident[3]}"
        return True

    def _system_image(self, image: str, ikey: str) -> Found | None:
        check = self._image_validator(image, ikey)
        for d in system_image_dirs():
            p = d / image
            if inside(d, p) and p.is_file() and check(p)[0] == "ok":
                return Found(FOUND, p, str(p), check(p)[1])
        return None

    # -- validators -----------------------------------------------------------------------------------
    @staticmethod
    def _pdb_validator(guid: uuid.UUID, age: int):
        def validate(path: Path):
            try:
                ident, table = read_pdb(path, want=(guid, age))
            except PdbReadError as exc:
                return "bad", str(exc)
            if table is None:
                return "mismatch", (f"it is GUID {ident.guid} age {ident.age}, the trace's module needs "
                                    f"GUID {guid} age {age}")
            return "ok", table
        return validate

    @staticmethod
    def _image_validator(image: str, ikey: str):
        def validate(path: Path):
            try:
                pe = parse_pe(path)
            except (OSError, PeError) as exc:
                return "bad", f"not a PE image ({exc})"
            got = image_key(pe.timedatestamp, pe.size_of_image)
            if got.upper() != ikey.upper():
                return "mismatch", f"TimeDateStamp/SizeOfImage {got}, the trace's {image} is {ikey}"
            return "ok", pe.codeview
        return validate

    # -- cache ----------------------------------------------------------------------------------------
    def _cache_path(self, area: str, name: str, key: str, leaf: str) -> Path | None:
        root = self.cache_dir / area
        p = root / name.lower() / key.upper() / leaf
        return p if inside(root, p) else None

    def _save(self, table: FunctionTable, path: Path) -> None:
        if not self._cache_ok:
            return
        try:
            table.save(path)
        except OSError as exc:
            self._cache_ok = False
            self._warn(f"symbols: cannot write the symbol cache {self.cache_dir}: {exc.strerror or exc}")

    def _write_text(self, path: Path, text: str) -> None:
        if not self._cache_ok:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".identity.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except OSError as exc:
            self._cache_ok = False
            self._warn(f"symbols: cannot write the symbol cache {self.cache_dir}: {exc.strerror or exc}")

    def _where(self) -> str:
        parts = [str(d) for d in self.local_dirs]
        if self.symbol_path:
            parts.append(f"symbol path {self.symbol_path}")
        else:
            parts.append("no symbol path set: offline")
        return "; ".join(parts) if parts else "nowhere to look"

    def _not_found_detail(self, name: str, key: str, found: Found) -> str:
        if found.status == MISMATCH:
            return f"only mismatched copies of {name}: {found.detail}"
        return f"{name}/{key} {found.detail} ({self._where()})"
