"""Module map: which image an address belongs to — for a process (user space) or the kernel (kernel
space: images logged with process id 0) — at a point in time, and the address's offset in it (RVA).

Built from the dataset's modules table (image rundown, load and unload events with their times). Kernel
and user images are kept apart; an image is valid from its load (or the trace start, for rundown images)
until its unload. Lookups are vectorized with a sorted-bases search; only addresses whose nearest image
was not valid at that time take a short per-address fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

KERNEL_PIDS = (0,)
# the kernel image's file names (the pool allocator lives there; a call site is the first frame outside it)
KERNEL_IMAGES = {"ntoskrnl.exe", "ntkrnlmp.exe", "ntkrnlpa.exe", "ntkrpamp.exe", "ntkrla57.exe"}
NONE = -1
NEVER = np.iinfo(np.int64).max


@dataclass
class _Space:
    """Images of one address space, sorted by (base, load time)."""

    base: np.ndarray
    end: np.ndarray
    load: np.ndarray
    unload: np.ndarray
    index: np.ndarray  # row in the modules table


def _filled(modules: pa.Table, name: str, null: int) -> np.ndarray:
    """An int64 column of the (small) modules table with `null` for nulls, without pyarrow.compute (whose
    import a report would otherwise pay for this alone)."""
    return np.array([null if v is None else v for v in modules[name].to_pylist()], dtype=np.int64)


class ModuleMap:
    def __init__(self, modules: pa.Table, pointer_size: int = 8):
        self.modules = modules
        self.names = modules["name"].to_pylist() if modules.num_rows else []
        self.kernel_start = np.uint64(0xFFFF800000000000 if pointer_size == 8 else 0x80000000)
        base = modules["base"].to_numpy().astype(np.uint64) if modules.num_rows else np.zeros(0, np.uint64)
        size = modules["size"].to_numpy().astype(np.uint64) if modules.num_rows else np.zeros(0, np.uint64)
        pid = modules["pid"].to_numpy() if modules.num_rows else np.zeros(0, np.uint32)
        load = _filled(modules, "load_ns", np.iinfo(np.int64).min)
        unload = _filled(modules, "unload_ns", NEVER)
        kernel = np.isin(pid, KERNEL_PIDS) | (base >= self.kernel_start)
        self._spaces: dict[int, _Space] = {}
        self._kernel = self._space(np.flatnonzero(kernel), base, size, load, unload)
        for p in sorted(set(pid[~kernel].tolist())):
            self._spaces[p] = self._space(np.flatnonzero(~kernel & (pid == p)), base, size, load, unload)

    @staticmethod
    def _space(rows, base, size, load, unload) -> _Space:
        order = rows[np.lexsort((load[rows], base[rows]))]
        return _Space(base[order], base[order] + size[order], load[order], unload[order], order)

    def locate(self, addr: np.ndarray, pid: np.ndarray | int = 0, ns: np.ndarray | int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Module row (NONE if no image covers the address) and RVA for each address."""
        addr = np.asarray(addr, dtype=np.uint64)
        n = len(addr)
        pid = np.broadcast_to(np.asarray(pid, dtype=np.int64), (n,))
        ns = np.broadcast_to(np.asarray(0 if ns is None else ns, dtype=np.int64), (n,))
        mod = np.full(n, NONE, dtype=np.int64)
        kernel = addr >= self.kernel_start
        self._fill(self._kernel, addr, ns, np.flatnonzero(kernel), mod)
        user = np.flatnonzero(~kernel)
        if len(user):
            for p in sorted(set(pid[user].tolist())):
                space = self._spaces.get(p)
                if space is not None:
                    self._fill(space, addr, ns, user[pid[user] == p], mod)
        rva = np.where(mod >= 0, addr - self._base_of(mod), 0).astype(np.uint64)
        return mod, rva

    def _base_of(self, mod: np.ndarray) -> np.ndarray:
        if not self.modules.num_rows:
            return np.zeros(len(mod), np.uint64)
        base = self.modules["base"].to_numpy().astype(np.uint64)
        return base[np.maximum(mod, 0)]

    @staticmethod
    def _fill(space: _Space, addr, ns, sel, mod) -> None:
        if not len(sel) or not len(space.base):
            return
        a, t = addr[sel], ns[sel]
        k = np.searchsorted(space.base, a, side="right") - 1
        kc = np.maximum(k, 0)
        ok = (k >= 0) & (a < space.end[kc]) & (space.load[kc] <= t) & (t < space.unload[kc])
        mod[sel[ok]] = space.index[kc[ok]]
        for j in np.flatnonzero(~ok & (k >= 0)).tolist():  # reloaded images, overlaps: look further back
            i = int(k[j])
            while i >= 0 and space.base[i] + (1 << 40) > a[j]:
                if space.base[i] <= a[j] < space.end[i] and space.load[i] <= t[j] < space.unload[i]:
                    mod[sel[j]] = space.index[i]
                    break
                i -= 1


def frame_text(name: str | None, rva: int, addr: int, symbol: tuple[str, int] | None = None) -> str:
    """WinDbg/WPA style: ``module!function+0xoff`` with symbols, ``module+0xrva`` without,
    ``0xaddress`` outside every module; lowercase hex; ``+0x0`` is left out."""
    if name is None:
        return f"0x{addr:x}"
    if symbol is not None:
        func, off = symbol
        return f"{name}!{func}+0x{off:x}" if off else f"{name}!{func}"
    return f"{name}+0x{rva:x}"
