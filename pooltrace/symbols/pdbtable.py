"""PDB -> a sorted function table, looked up vectorized; the table is cached on disk per PDB identity.

The PDB is read with purepdb (pure Python): procedure records from the module streams (global and
static functions, with their code size), public symbols (all a public-only PDB has) and thunks. Each
function covers ``[start, start + code size)``; a function without a size (a public) ends at the next
function's start and at the end of the executable section holding it, so an address past the last
function of a section is not attributed to it. Nested or overlapping entries resolve to the innermost
one. The result is an interval partition: ``seg_start`` (sorted) with the function index of each
segment (-1 for gaps), so a lookup is one ``searchsorted``.

A PDB is used only when it matches the image: GUID from the PDB info stream, age from the DBI stream
(the info stream's age grows with pdbstr/source indexing; the RSDS record carries the DBI one).
"""

from __future__ import annotations

import bisect
import heapq
import io
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pooltrace.symbols.names import undecorate

CACHE_VERSION = 1


class PdbReadError(ValueError):
    """The file is not a PDB purepdb can read."""


@dataclass(frozen=True)
class PdbIdentity:
    guid: uuid.UUID
    age: int  # the DBI stream's age, what an image's RSDS record carries
    info_age: int

    def matches(self, guid: uuid.UUID, age: int) -> bool:
        return self.guid == guid and self.age == age


class FunctionTable:
    """Functions of one PDB as an interval partition over RVAs."""

    def __init__(self, seg_start: np.ndarray, seg_func: np.ndarray, func_start: np.ndarray, names: list[str],
                 meta: dict | None = None):
        self.seg_start = np.ascontiguousarray(seg_start, dtype=np.uint64)
        self.seg_func = np.ascontiguousarray(seg_func, dtype=np.int64)
        self.func_start = np.ascontiguousarray(func_start, dtype=np.uint64)
        self.names = names
        self.meta = meta or {}
        self._lists: tuple[list[int], list[int], list[int]] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def find(self, rvas: np.ndarray) -> np.ndarray:
        """Function index for each RVA (-1 where none covers it)."""
        rvas = np.asarray(rvas, dtype=np.uint64)
        if not len(self.seg_start):
            return np.full(len(rvas), -1, dtype=np.int64)
        i = np.searchsorted(self.seg_start, rvas, side="right") - 1
        return np.where(i >= 0, self.seg_func[np.maximum(i, 0)], -1)

    def lists(self) -> tuple[list[int], list[int], list[int]]:
        """seg_start, seg_func, func_start as Python lists (built once), for lookups a few at a time."""
        if self._lists is None:
            self._lists = (self.seg_start.tolist(), self.seg_func.tolist(), self.func_start.tolist())
        return self._lists

    def lookup_one(self, rva: int) -> tuple[str, int] | None:
        """(function, offset of `rva` from its start) or None; plain Python, for a few addresses at a time."""
        starts, funcs, fstart = self.lists()
        i = bisect.bisect_right(starts, rva) - 1
        if i < 0:
            return None
        f = funcs[i]
        return None if f < 0 else (self.names[f], rva - fstart[f])

    # -- on-disk cache --------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write atomically (a temporary file renamed into place)."""
        blob = "\0".join(self.names).encode("utf-8", "surrogatepass")
        buf = io.BytesIO()
        np.savez(buf, seg_start=self.seg_start, seg_func=self.seg_func.astype(np.int32),
                 func_start=self.func_start, names=np.frombuffer(blob, dtype=np.uint8),
                 meta=np.frombuffer(json.dumps({**self.meta, "version": CACHE_VERSION}).encode(), dtype=np.uint8))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
            os.replace(tmp, path)
        except BaseException:
            with _suppress_os():
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: Path) -> FunctionTable | None:
        """A cached table, or None when missing, unreadable or from another cache version."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                if meta.get("version") != CACHE_VERSION:
                    return None
                blob = z["names"].tobytes().decode("utf-8", "surrogatepass")
                names = blob.split("\0") if blob else []
                t = cls(z["seg_start"], z["seg_func"], z["func_start"], names, meta)
        except (OSError, ValueError, KeyError, EOFError):
            return None
        if len(t.func_start) != len(names) or len(t.seg_start) != len(t.seg_func):
            return None
        return t


class _suppress_os:
    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        return typ is not None and issubclass(typ, OSError)


def build_partition(entries: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(start, end, function index) intervals -> (segment starts, innermost function per segment, -1 gaps).
    Among intervals covering a point the one starting last wins (then the shorter one)."""
    if not entries:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    entries = sorted(entries)
    bounds = sorted({e[0] for e in entries} | {e[1] for e in entries})
    heap: list[tuple[int, int, int]] = []  # (-start, end, index)
    k = 0
    seg_start: list[int] = []
    seg_func: list[int] = []
    for b in bounds:
        while k < len(entries) and entries[k][0] == b:
            s, e, idx = entries[k]
            heapq.heappush(heap, (-s, e, idx))
            k += 1
        while heap and heap[0][1] <= b:
            heapq.heappop(heap)
        # stale entries below the top may have ended; drop them when they surface
        f = heap[0][2] if heap else -1
        if seg_func and seg_func[-1] == f:
            continue
        seg_start.append(b)
        seg_func.append(f)
    return np.array(seg_start, dtype=np.uint64), np.array(seg_func, dtype=np.int64)


def _open(path: Path):
    try:
        from purepdb import PDB, MsfError, PdbError
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise PdbReadError("the purepdb package is not installed (pip install purepdb)") from exc
    try:
        return PDB.open(str(path), copy=True)
    except (MsfError, PdbError, ValueError, EOFError, IndexError, OSError) as exc:
        raise PdbReadError(f"not a readable PDB: {exc}") from None


def read_pdb(path: Path, *, want: tuple[uuid.UUID, int] | None = None
             ) -> tuple[PdbIdentity, FunctionTable | None]:
    """The PDB's identity and, when it matches `want` (or `want` is None), its function table."""
    pdb = _open(path)
    try:
        try:
            info = pdb.info()
            ident = PdbIdentity(uuid.UUID(bytes_le=bytes(info.guid)), int(pdb.dbi.age or info.age), int(info.age))
        except Exception as exc:  # purepdb raises its own errors and struct/EOF errors on damaged files
            raise PdbReadError(f"no PDB identity: {exc}") from None
        if want is not None and not ident.matches(*want):
            return ident, None
        try:
            table = _table(pdb)
        except Exception as exc:
            raise PdbReadError(f"unreadable symbols: {exc}") from None
        table.meta.update({"guid": str(ident.guid), "age": ident.age, "source": str(path)})
        return ident, table
    finally:
        pdb.close()


def _table(pdb) -> FunctionTable:
    sections = pdb.sections or pdb.original_sections or pdb.derived_sections
    exec_ranges = sorted((s.virtual_address, s.virtual_address + max(s.virtual_size, 1))
                         for s in sections if s.executable)
    thunk_len: dict[tuple[int, int], int] = {}
    try:
        for t in pdb.thunks():
            if t.length:
                thunk_len[(t.segment, t.offset)] = t.length
    except Exception:  # noqa: BLE001 - thunk sizes only tighten bounds
        thunk_len = {}
    funcs = [f for f in pdb.functions() if f.rva is not None]
    funcs.sort(key=lambda f: (f.rva, f.source != "proc"))
    starts = sorted({f.rva for f in funcs})
    next_start = {s: (starts[i + 1] if i + 1 < len(starts) else None) for i, s in enumerate(starts)}
    names: list[str] = []
    func_start: list[int] = []
    entries: list[tuple[int, int, int]] = []
    public_only = True
    for f in funcs:
        size = f.code_size or thunk_len.get((f.segment, f.offset))
        if f.source == "proc":
            public_only = False
        end = f.rva + size if size else None
        if end is None:
            nxt = next_start[f.rva]
            sect_end = next((e for s, e in exec_ranges if s <= f.rva < e), None)
            if sect_end is None and nxt is None:
                continue  # a public outside every code section with nothing after it: no bound
            end = min(x for x in (nxt, sect_end) if x is not None)
        if end <= f.rva:
            continue
        entries.append((f.rva, end, len(names)))
        names.append(f.name if f.source == "proc" else undecorate(f.name))
        func_start.append(f.rva)
    seg_start, seg_func = build_partition(entries)
    return FunctionTable(seg_start, seg_func, np.array(func_start, dtype=np.uint64), names,
                         {"functions": len(names), "public_only": public_only})
