"""Frame text of a dataset's stacks as WinDbg and WPA write it (module!function+0xoff when symbolized,
module+0xrva inside a module, 0xaddress outside every module), rendered once per distinct stack, and the
call site of a stack (its first frame outside the pool allocator).
"""

from __future__ import annotations

from itertools import compress

import numpy as np

from pooltrace.datasetopen import Dataset
from pooltrace.etl.columns import span_positions
from pooltrace.modulemap import KERNEL_IMAGES, NONE, ModuleMap, frame_text


class FrameRenderer:
    """Renders stack frames (module!function+0xoff, module+0xrva, 0xaddress) for distinct stacks."""

    def __init__(self, ds: Dataset, symbolizer=None):
        self.ds = ds
        self.map = ModuleMap(ds.modules, ds.trace.get("pointer_size", 8))
        self.sym = symbolizer
        # a disabled symbolizer (--no-symbols) resolves nothing: it is not asked (its status lists "disabled"
        # modules, which no notice shows)
        self._lookup = symbolizer is not None and getattr(symbolizer, "enabled", True)
        self._cache: dict[int, tuple[list[str], list[int]]] = {}
        self.rvas: dict[str, int] = {}  # frame text -> module-relative address (frames inside a module)
        self._lists: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # stacks: valid, offsets, values

    def stack(self, stack_id: int, pid: int = 0, ns: int = 0) -> tuple[list[str], list[int]]:
        """Frame texts and module rows (-1 outside every module), innermost first."""
        hit = self._cache.get(stack_id)
        if hit is not None:
            return hit
        if stack_id < 0 or stack_id >= len(self.ds.stacks):
            return [], []
        addrs = self._addresses(stack_id)
        mod, rva = self.map.locate(addrs, pid, ns)
        syms = None
        if self._lookup and len(addrs):
            ret = np.ones(len(addrs), dtype=bool)
            ret[0] = False  # frame 0 is the instruction pointer; the others are return addresses
            syms = self.sym.lookup(mod, rva, return_address=ret)
        texts = []
        for k, (m, r, a) in enumerate(zip(mod.tolist(), rva.tolist(), addrs.tolist(), strict=True)):
            name = self.map.names[m] if m != NONE else None
            texts.append(frame_text(name, r, a, syms[k] if syms else None))
            if name is not None:
                self.rvas[texts[-1]] = r
        out = (texts, mod.tolist())
        self._cache[stack_id] = out
        return out

    def prepare(self, stack_ids: np.ndarray, pids: np.ndarray, ns: np.ndarray) -> None:
        """Render many stacks at once, in this order (the first of a stack id wins, as with `stack`): one
        vectorized module lookup over all their frames instead of one per stack; the same texts, the same
        symbol resolution order (_symbols) and the same cache as calling `stack` one by one."""
        todo: dict[int, tuple[int, int]] = {}
        n = len(self.ds.stacks)
        for sid, p, t in zip(np.asarray(stack_ids).tolist(), np.asarray(pids).tolist(), np.asarray(ns).tolist(),
                             strict=True):
            if 0 <= sid < n and sid not in self._cache and sid not in todo:
                todo[sid] = (p, t)
        if not todo:
            return
        valid, offsets, values = self._columns()
        sids = np.fromiter(todo, dtype=np.int64, count=len(todo))
        lo = offsets[sids].astype(np.int64)
        lens = np.where(valid[sids], offsets[sids + 1].astype(np.int64) - lo, 0)
        ends = np.cumsum(lens)
        idx = span_positions(lo, lens)
        addrs = values[idx]
        pid_ns = np.array(list(todo.values()), dtype=np.int64).reshape(-1, 2)
        mod, rva = self.map.locate(addrs, np.repeat(pid_ns[:, 0], lens), np.repeat(pid_ns[:, 1], lens))
        mods, rvas, alist = mod.tolist(), rva.tolist(), addrs.tolist()
        names = self.map.names
        spans = list(zip(todo, (ends - lens).tolist(), ends.tolist(), strict=True))
        syms_of = self._symbols(spans, mods, mod, rva) if self._lookup else {}
        per_frame = [None] * len(mods)  # each frame's symbol (or None)
        for sid, a, b in spans:
            syms = syms_of.get(sid)
            if syms:
                per_frame[a:b] = syms
        in_module = [m != NONE for m in mods]
        texts = list(map(frame_text, [names[m] if m != NONE else None for m in mods], rvas, alist, per_frame))
        self.rvas.update(zip(compress(texts, in_module), compress(rvas, in_module), strict=True))  # frame order
        for sid, a, b in spans:
            self._cache[sid] = (texts[a:b], mods[a:b])

    def _symbols(self, spans: list[tuple[int, int, int]], mods: list[int], mod: np.ndarray,
                 rva: np.ndarray) -> dict[int, list]:
        """Symbol lookups of the stacks `spans` (stack id, first and end frame), per stack id. A stack with a
        module not asked about before is looked up alone, in order (modules are resolved, and warned about,
        in the order `stack` would ask); the others, whose lookups change nothing, in one call at the end."""
        out: dict[int, list] = {}
        asked: set[int] = set()
        later: list[tuple[int, int, int]] = []
        for sid, a, b in spans:
            if b <= a:
                continue
            rows = set(mods[a:b])
            if rows <= asked:
                later.append((sid, a, b))
                continue
            asked |= rows
            ret = np.ones(b - a, dtype=bool)
            ret[0] = False  # frame 0 is the instruction pointer; the others are return addresses
            out[sid] = self.sym.lookup(mod[a:b], rva[a:b], return_address=ret)
        if later:
            lo = np.array([a for _, a, _ in later], dtype=np.int64)
            lens = np.array([b - a for _, a, b in later], dtype=np.int64)
            ends = np.cumsum(lens)
            idx = span_positions(lo, lens)
            ret = np.ones(len(idx), dtype=bool)
            ret[ends - lens] = False
            found = self.sym.lookup(mod[idx], rva[idx], return_address=ret)
            for (sid, _, _), a, b in zip(later, (ends - lens).tolist(), ends.tolist(), strict=True):
                out[sid] = found[a:b]
        return out

    def _columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validity, offsets and values of the stacks column as numpy, made once."""
        if self._lists is None:
            arr = self.ds.stacks
            n, bits = len(arr), arr.buffers()[0]
            valid = np.ones(n, dtype=bool) if bits is None or not arr.null_count else np.unpackbits(
                np.frombuffer(bits, dtype=np.uint8), count=n + arr.offset, bitorder="little")[arr.offset:].view(bool)
            self._lists = (valid, arr.offsets.to_numpy(),
                           arr.values.to_numpy(zero_copy_only=False).astype(np.uint64, copy=False))
        return self._lists

    def _addresses(self, stack_id: int) -> np.ndarray:
        """Frames of a stack, from numpy views of the stacks column made once (not an Arrow scalar each)."""
        valid, offsets, values = self._columns()
        if not valid[stack_id]:
            return np.zeros(0, dtype=np.uint64)
        return values[offsets[stack_id]:offsets[stack_id + 1]]

    def call_site(self, stack_id: int, pid: int = 0, ns: int = 0) -> tuple[str, str]:
        """(function key, module name) of the allocating call site: the first frame outside the kernel
        image. With symbols the key is ``module!function``, without it the call site ``module+0xrva``."""
        texts, mods = self.stack(stack_id, pid, ns)
        for t, m in zip(texts, mods, strict=True):
            name = self.map.names[m] if m != NONE else None
            if name is not None and name.lower() in KERNEL_IMAGES:
                continue
            key = t.split("+0x", 1)[0] if "!" in t else t
            return key, (name or "?")
        if texts:  # every frame is in the kernel image: the allocator's caller is the call site
            k = 1 if len(texts) > 1 else 0
            return (texts[k].split("+0x", 1)[0] if "!" in texts[k] else texts[k]), (
                self.map.names[mods[k]] if mods[k] != NONE else "?")
        return "<no stack>", "<no stack>"

