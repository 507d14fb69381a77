"""Parallel decoding: chunks of buffers decoded in worker processes, columns handed back in shared memory.

Each worker opens the trace itself and runs chunks.decode_buffers on the chunks it is given. The numpy
columns of a decoded chunk (pool, stacks, stack keys, the digested stack fragments) are copied into one
shared-memory block; only a small manifest (names, dtypes, offsets) and the rare events (a few Arrow
rows) travel through the pipe, so nothing is pickled per record. The reader takes the results in
chunk order, so its batches, statistics and warnings are the same for any number of workers.

At most two chunks per worker are decoded ahead of the reader: memory stays bounded when the reader
(stack attachment, pairing, writing) is slower than the decoders.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import types
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import shared_memory

import numpy as np

from pooltrace.etl.buffers import BufferIndex, BufferSource, FileBytes
from pooltrace.etl.chunks import DecodedChunk, decode_buffers
from pooltrace.etl.columns import Columns
from pooltrace.etl.fragments import Digest

AHEAD = 2  # chunks in flight per worker

_worker: dict = {}


def default_jobs() -> int:
    """The processors this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on every OS
        return max(1, os.cpu_count() or 1)


def _init(path: str, index: BufferIndex, max_area: int, user_limit: int) -> None:
    from pooltrace.arrowprobe import skip_pandas_probe

    skip_pandas_probe()  # the rare-event tables would otherwise import pandas in every worker (~0.4 s each)
    fh = open(path, "rb")  # noqa: SIM115 - lives as long as the worker
    data = FileBytes(fh.fileno(), os.fstat(fh.fileno()).st_size)
    source = BufferSource(data, index)
    source.max_area = max_area
    _worker.update(fh=fh, source=source, index=index, user_limit=user_limit)


def _arrays(dc: DecodedChunk):
    """(place, array) of every numpy column of a decoded chunk; place says where it goes back."""
    for name, t in dc.tables.items():
        if isinstance(t, Columns):
            for k, v in t.cols.items():
                yield (name, "cols", k, 0), v
            for k, v in t.valid.items():
                yield (name, "valid", k, 0), v
            for k, (offsets, values) in t.lists.items():
                yield (name, "lists", k, 0), offsets
                yield (name, "lists", k, 1), values
    if dc.digest is not None:
        for k in ("h1", "h2", "offsets", "values"):
            yield ("", "digest", k, 0), getattr(dc.digest, k)


def _work(buffers: list[int], digest_stacks: bool):
    dc = decode_buffers(_worker["source"], _worker["index"], buffers, _worker["user_limit"], digest_stacks)
    manifest, total, arrays = [], 0, []
    for place, arr in _arrays(dc):
        arr = np.ascontiguousarray(arr)
        manifest.append((place, arr.dtype.str, arr.shape, total))
        arrays.append(arr)
        total += (arr.nbytes + 7) & ~7
    shm = shared_memory.SharedMemory(create=True, size=max(total, 8))
    try:
        for (_p, _d, _s, off), arr in zip(manifest, arrays, strict=True):
            shm.buf[off:off + arr.nbytes] = arr.reshape(-1).view(np.uint8)
        name = shm.name
    finally:
        shm.close()
    # everything but the numpy columns (rare-event Arrow tables, counts, warnings) goes by pickle
    rest = {n: t for n, t in dc.tables.items() if not isinstance(t, Columns)}
    shapes = {n: (list(t.cols), list(t.valid), list(t.lists)) for n, t in dc.tables.items() if isinstance(t, Columns)}
    return name, manifest, rest, shapes, dc.counts


def _take(result) -> DecodedChunk:
    """Rebuild a decoded chunk from a worker's shared-memory block. The block's name is removed at once;
    the arrays are views of its mapping, which lives as long as they do (no copy). Where the mapping
    cannot be handed to the arrays (SharedMemory without its usual attributes), they are copied out."""
    name, manifest, rest, shapes, counts = result
    shm = shared_memory.SharedMemory(name=name)
    try:
        mapping = _detach(shm)
        whole = memoryview(mapping) if mapping is not None else shm.buf
        got = {}
        for place, dtype, shape, off in manifest:
            dt = np.dtype(dtype)
            n = int(np.prod(shape)) if shape else 1
            arr = np.frombuffer(whole, dtype=dt, count=n, offset=off).reshape(shape)
            got[place] = arr if mapping is not None else arr.copy()
    finally:
        shm.close()
        shm.unlink()
    tables: dict = {}
    for tname, (cols, valid, lists) in shapes.items():
        tables[tname] = Columns({k: got[(tname, "cols", k, 0)] for k in cols},
                                {k: got[(tname, "valid", k, 0)] for k in valid},
                                {k: (got[(tname, "lists", k, 0)], got[(tname, "lists", k, 1)]) for k in lists})
    tables.update(rest)
    dig = None
    if ("", "digest", "h1", 0) in got:
        dig = Digest(*(got[("", "digest", k, 0)] for k in ("h1", "h2", "offsets", "values")), inverse=None)
    return DecodedChunk(tables, counts, dig)


def _detach(shm: shared_memory.SharedMemory):
    """Take the mmap out of a SharedMemory (so that its close() leaves the mapping to the arrays made
    from it, unmapped when they are freed); None when this Python's SharedMemory is not laid out so."""
    mapping, view = getattr(shm, "_mmap", None), getattr(shm, "_buf", None)
    if mapping is None or not isinstance(view, memoryview):
        return None
    view.release()
    shm._buf, shm._mmap = None, None
    return mapping


@contextlib.contextmanager
def _caller_script_hidden():
    """Workers run pooltrace code only: while they start, hide the caller's __main__ so that spawn and
    forkserver do not import it again in every worker (a script without a main guard, or
    ``python -m pooltrace``, would run again there)."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def _context():
    methods = mp.get_all_start_methods()
    if "forkserver" in methods:  # workers forked from a clean server with the decoders imported once
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["pooltrace.etl.chunks"])
        return ctx
    return mp.get_context("spawn")


def start_early() -> None:
    """Start the process the decode workers are forked from now (it imports the decoders, ~0.3 s), so that
    it loads while the caller is still reading the trace's buffer index. Only the forkserver start method
    has such a process; with spawn this does nothing."""
    ctx = _context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        with _caller_script_hidden():
            forkserver.ensure_running()


def decode_in_workers(reader, plan: list[tuple[list[int], int]], jobs: int, digest_stacks: bool
                      ) -> Iterator[DecodedChunk]:
    """Decoded chunks of `plan`, in plan order, decoded by `jobs` worker processes."""
    src = reader.source
    with ProcessPoolExecutor(max_workers=jobs, mp_context=_context(), initializer=_init,
                             initargs=(str(reader.path), reader.index, src.max_area, int(reader.user_limit))) as ex:
        todo = iter(plan)
        inflight: deque = deque()

        def submit() -> None:
            for buffers, _wm in todo:
                with _caller_script_hidden():  # the first submissions start the workers
                    inflight.append(ex.submit(_work, buffers, digest_stacks))
                if len(inflight) >= jobs * AHEAD:
                    return

        submit()
        try:
            while inflight:
                result = inflight.popleft().result()
                submit()
                yield _take(result)
        finally:
            for f in inflight:  # stopped early (an error, or the consumer stopped): drop what is queued
                f.cancel()
            for f in inflight:
                if not f.cancelled():
                    with contextlib.suppress(Exception):  # only freeing shared memory here
                        _take(f.result())
