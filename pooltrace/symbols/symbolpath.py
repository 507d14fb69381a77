"""``_NT_SYMBOL_PATH`` syntax (as WinDbg, dbghelp and symsrv read it) and pooltrace's default directories.

Elements are separated by ``;`` and searched left to right:

- ``C:\\symbols`` / ``/srv/symbols``: a plain directory: ``dir/name``, ``dir/<ext>/name``,
  ``dir/symbols/<ext>/name``; also looked up as a store (``dir/name/KEY/name``), which symsrv does when the
  directory has a ``pingme.txt`` (pooltrace always does: the key makes the match exact).
- ``srv*S1*S2*...*Sn`` (= ``symsrv*symsrv.dll*S1*...``): symbol stores, each a local directory or an
  ``http(s)://`` URL, searched left to right; a file found in store k is copied into the local stores
  left of it (downstream caches). An empty store (``srv**https://...``) is the default downstream store; a
  chain with no local store at all (``srv*https://...``) gets the default downstream store in front.
- ``cache*dir``: a downstream cache for every element to its right (searched first, receives copies);
  ``cache*`` alone is the default downstream store.

Only ``;`` and ``*`` split (never ``:``, so ``srv*C:\\sym*https://...`` works); the keywords are
case-insensitive; POSIX paths work the same way. Network access happens only for URLs in the path.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Store:
    location: str  # a local directory or an http(s) URL

    @property
    def is_url(self) -> bool:
        return self.location.lower().startswith(("http://", "https://"))


@dataclass
class Entry:
    """One element of the symbol path."""

    kind: str  # "dir" (a plain directory) or "srv" (a chain of stores)
    path: str = ""  # for "dir"
    stores: list[Store] = field(default_factory=list)  # for "srv": caches first, then the chain's stores

    def describe(self) -> str:
        return self.path if self.kind == "dir" else "srv*" + "*".join(s.location for s in self.stores)


class SymbolPathError(ValueError):
    pass


def default_cache_dir() -> Path:
    """pooltrace's cache root: ``POOLTRACE_CACHE``, else ``%LOCALAPPDATA%\\pooltrace\\cache`` on Windows,
    ``~/Library/Caches/pooltrace`` on macOS, ``$XDG_CACHE_HOME/pooltrace`` or ``~/.cache/pooltrace``."""
    env = os.environ.get("POOLTRACE_CACHE")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "pooltrace" / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "pooltrace"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pooltrace"


def parse_symbol_path(text: str | None, default_store: str | os.PathLike) -> list[Entry]:
    """Entries of a symbol path, in search order. Raises SymbolPathError for a malformed element."""
    entries: list[Entry] = []
    caches: list[Store] = []
    default = Store(str(default_store))
    for raw in (text or "").split(";"):
        element = raw.strip()
        if not element:
            continue
        parts = [p.strip() for p in element.split("*")]
        head = parts[0].lower()
        if head == "cache" and len(parts) >= 1:
            if len(parts) > 2:
                raise SymbolPathError(f"symbol path element {element!r}: cache* takes one directory")
            where = parts[1] if len(parts) == 2 else ""
            store = Store(where) if where else default
            if store.is_url:
                raise SymbolPathError(f"symbol path element {element!r}: a cache must be a local directory")
            if store not in caches:
                caches.append(store)
            continue
        if head in ("srv", "symsrv"):
            chain = parts[1:] if head == "srv" else parts[2:]
            if head == "symsrv" and len(parts) < 3:
                raise SymbolPathError(f"symbol path element {element!r}: symsrv*DLL*STORE...")
            stores = [Store(p) if p else default for p in chain] or [default]
            if all(s.is_url for s in stores) and not caches:
                stores.insert(0, default)
            entries.append(Entry("srv", stores=_dedup(caches + stores)))
            continue
        if len(parts) > 1:
            raise SymbolPathError(f"symbol path element {element!r}: unknown keyword {parts[0]!r} "
                                  "(expected srv*, symsrv*, cache* or a directory)")
        if Store(element).is_url:  # a bare URL: a store, with a downstream cache
            entries.append(Entry("srv", stores=_dedup((caches or [default]) + [Store(element)])))
            continue
        if caches:  # a cache also serves plain directories to its right (e.g. a slow UNC share)
            entries.append(Entry("srv", stores=list(caches)))
        entries.append(Entry("dir", path=os.path.expanduser(element)))
    return entries


def _dedup(stores: list[Store]) -> list[Store]:
    out: list[Store] = []
    for s in stores:
        if s not in out:
            out.append(s)
    return out


def uses_network(entries: list[Entry]) -> bool:
    return any(s.is_url for e in entries for s in e.stores)
