"""Parallel decoding: chunks of buffers decoded in worker processes, columns handed back in shared memory.

Each worker opens the trace itself and runs chunks.decode_buffers on the chunks it is given. The numpy
columns of a decoded chunk (pool, stacks, stack keys, the digested stack fragments) are copied into one
shared-memory block; only a small manifest (names, dtypes, offsets) and the rare events (a few Arrow
rows) travel through the pipe, so nothing is pickled per record. The reader takes the results in
chunk order, so its batches, statistics and warnings are the same for any number of workers. Each worker
has its own pipe (Workers): the reader sends chunk k to worker k % jobs and reads the answers in turn
itself, with no helper thread (a process pool's manager and feeder threads competed with the reader for
the GIL and the cores).

The blocks are made once by the reader and reused (Blocks): each process maps a block once, so its pages
are allocated and faulted in once, not for every chunk. The reader's arrays are views of the block (no
copy); it goes back to the free list when the last of them is freed. When no block is free (the reader
still holds columns of earlier chunks) or a chunk's columns do not fit, the worker makes a block for that
chunk alone, which the reader unlinks at once and unmaps with the arrays.

At most two chunks per worker are decoded ahead of the reader: memory stays bounded when the reader
(stack attachment, pairing, writing) is slower than the decoders.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory

import numpy as np

from pooltrace.errors import PooltraceError
from pooltrace.etl.buffers import BufferIndex, BufferSource, FileBytes
from pooltrace.etl.chunks import DecodedChunk, decode_buffers
from pooltrace.etl.columns import Columns
from pooltrace.etl.fragments import Digest
from pooltrace.etl.workerstart import caller_script_hidden, context

AHEAD = 2  # chunks in flight per worker
DECODE_WHILE_STARTING = True  # the reader decodes the first chunks itself while the workers start
SPARE_BLOCKS = 2  # reusable blocks beyond one per chunk in flight: the reader may still hold a chunk or two

_worker: dict = {}


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


def _work(buffers: list[int], digest_stacks: bool, block: str | None = None):
    """Decode a chunk and write its columns into the reader's block `block` (mapped once per worker), or,
    with None or when they do not fit, into a block made for this chunk. Returns (block name, whether it is
    the reader's, manifest, rare tables, table shapes, counts)."""
    dc = decode_buffers(_worker["source"], _worker["index"], buffers, _worker["user_limit"], digest_stacks)
    manifest, total, arrays = [], 0, []
    for place, arr in _arrays(dc):
        arr = np.ascontiguousarray(arr)
        manifest.append((place, arr.dtype.str, arr.shape, total))
        arrays.append(arr)
        total += (arr.nbytes + 7) & ~7
    mapped = _worker.setdefault("blocks", {})
    shm = None
    if block is not None:
        shm = mapped.get(block)
        if shm is None:
            shm = mapped[block] = shared_memory.SharedMemory(name=block)
        if shm.size < total:
            shm = None
    reused = shm is not None
    if shm is None:
        shm = shared_memory.SharedMemory(create=True, size=max(total, 8))
    try:
        for (_p, _d, _s, off), arr in zip(manifest, arrays, strict=True):
            shm.buf[off:off + arr.nbytes] = arr.reshape(-1).view(np.uint8)
        name = shm.name
    finally:
        if not reused:
            shm.close()
    # everything but the numpy columns (rare-event Arrow tables, counts, warnings) goes by pickle
    rest = {n: t for n, t in dc.tables.items() if not isinstance(t, Columns)}
    shapes = {n: (list(t.cols), list(t.valid), list(t.lists)) for n, t in dc.tables.items() if isinstance(t, Columns)}
    return name, reused, manifest, rest, shapes, dc.counts


class Blocks:
    """The reader's reusable shared-memory blocks: `count` blocks of `size` bytes, each free or lent to the
    arrays of one decoded chunk. A block is free again when the last array made from it is freed. Where
    SharedMemory cannot hand its mapping over (_detach), there are none: every chunk gets its own block."""

    def __init__(self, count: int, size: int):
        self.size = size
        self.blocks: dict[str, tuple[shared_memory.SharedMemory, mmap.mmap]] = {}
        self.free: deque[str] = deque()
        for _ in range(count):
            shm = shared_memory.SharedMemory(create=True, size=size)
            mapping = _detach(shm)
            if mapping is None:
                shm.close()
                shm.unlink()
                break
            self.blocks[shm.name] = (shm, mapping)
            self.free.append(shm.name)

    def lend(self) -> str | None:
        """A free block's name, taken off the free list; None when every block is lent."""
        return self.free.popleft() if self.free else None

    def view(self, name: str, total: int) -> np.ndarray:
        """The first `total` bytes of a lent block as one array; the block is free again once that array and
        every view made from it are freed."""
        whole = np.frombuffer(self.blocks[name][1], dtype=np.uint8, count=total)
        weakref.finalize(whole, self.free.append, name)
        return whole

    def give_back(self, name: str) -> None:
        """A lent block that the worker did not use (the chunk's columns did not fit)."""
        self.free.append(name)

    def close(self) -> None:
        """Unlink every block and unmap those no array uses any more (the others are unmapped with their
        last array)."""
        for shm, mapping in self.blocks.values():
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()
            shm.close()  # its file descriptor; the mapping is ours
            with contextlib.suppress(BufferError):  # arrays still use it: unmapped when they are freed
                mapping.close()
        self.blocks.clear()
        self.free.clear()


def _take(result, blocks: Blocks | None = None) -> DecodedChunk:
    """Rebuild a decoded chunk from a worker's shared-memory block, without copying: the arrays are views
    of a reader's block (free again when they are all freed), or of a block made for this chunk, whose name
    is removed at once and whose mapping lives as long as they do. Where that mapping cannot be handed to
    the arrays (SharedMemory without its usual attributes), they are copied out."""
    name, reused, manifest, rest, shapes, counts = result
    total = max((off + (int(np.prod(shape)) if shape else 1) * np.dtype(dtype).itemsize
                 for _p, dtype, shape, off in manifest), default=0)
    if reused:
        got = _views(blocks.view(name, total), manifest, copy=False)
    else:
        shm = shared_memory.SharedMemory(name=name)
        try:
            mapping = _detach(shm)
            whole = memoryview(mapping) if mapping is not None else shm.buf
            got = _views(np.frombuffer(whole, dtype=np.uint8, count=total), manifest, copy=mapping is None)
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


def _views(whole: np.ndarray, manifest: list, copy: bool) -> dict:
    got = {}
    for place, dtype, shape, off in manifest:
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) if shape else 1
        arr = whole[off:off + n * dt.itemsize].view(dt).reshape(shape)
        got[place] = arr.copy() if copy else arr
    return got


def _detach(shm: shared_memory.SharedMemory):
    """Take the mmap out of a SharedMemory (so that its close() leaves the mapping to the arrays made
    from it, unmapped when they are freed); None when this Python's SharedMemory is not laid out so."""
    mapping, view = getattr(shm, "_mmap", None), getattr(shm, "_buf", None)
    if mapping is None or not isinstance(view, memoryview):
        return None
    view.release()
    shm._buf, shm._mmap = None, None
    return mapping


def decode_in_workers(reader, plan: list[tuple[list[int], int]], jobs: int, digest_stacks: bool
                      ) -> Iterator[DecodedChunk]:
    """Decoded chunks of `plan`, in plan order, decoded by `jobs` worker processes (no more than chunks)."""
    src = reader.source
    jobs = max(1, min(jobs, len(plan)))
    blocks = Blocks(jobs * AHEAD + SPARE_BLOCKS, block_size(reader.chunk_bytes))
    feed = Feed(plan, blocks, digest_stacks, jobs)
    workers = Workers(jobs, (str(reader.path), reader.index, src.max_area, int(reader.user_limit)),
                      background=True, on_first_start=feed.submit)
    try:
        here = (src, reader.index, int(reader.user_limit)) if DECODE_WHILE_STARTING else None
        yield from _run(workers, feed, here)
    finally:
        workers.close()
        blocks.close()


def block_size(chunk_bytes: int) -> int:
    """Bytes of a reusable block: a chunk's columns are smaller than its records (a pool trace's are about
    half); a chunk whose columns do not fit gets a block of its own."""
    return chunk_bytes + (chunk_bytes >> 1)


class WorkerError(PooltraceError):
    """A decode worker stopped without answering (killed, or out of memory): said in one line, exit 2."""


def _serve(conn, initargs: tuple) -> None:
    """A worker's loop: decode the chunks sent on `conn` in the order they come and send each result back,
    or the exception that stopped it; None, a closed pipe or Ctrl-C (which the reader gets too) end it."""
    with contextlib.suppress(KeyboardInterrupt, EOFError, BrokenPipeError):
        try:
            _init(*initargs)
            failed = None
        except Exception as exc:  # said in answer to the first chunk
            failed = exc
        while (task := conn.recv()) is not None:
            try:
                if failed is not None:
                    raise failed
                answer = ("ok", _work(*task))
            except Exception as exc:
                answer = ("error", exc)
            try:
                conn.send(answer)
            except (EOFError, BrokenPipeError):
                raise
            except Exception as exc:  # the exception does not pickle: say what it was
                conn.send(("error", RuntimeError(f"decode worker: {type(exc).__name__}: {exc}")))


class Workers:
    """`jobs` decode processes, each fed by its own pipe: chunk k goes to worker k % jobs, so results are
    read back in plan order by reading the workers in turn. The reading process sends and receives on the
    pipes itself, with no helper thread once the workers have started.

    With `background`, the processes are started by a short-lived thread: starting one waits until the
    workers' server has imported the decoders (about 0.2 s), and meanwhile the reader can decode chunks
    itself (started() says when it can stop). `on_first_start(workers)` is called by that thread as soon as
    the first process has started."""

    def __init__(self, jobs: int, initargs: tuple, background: bool = False,
                 on_first_start: Callable[[Workers], None] | None = None):
        ctx = context()
        pipes = [ctx.Pipe(duplex=True) for _ in range(jobs)]
        self.conns = [mine for mine, _theirs in pipes]
        self.procs: list = []
        self._failed: BaseException | None = None
        self._started = threading.Event()

        def start() -> None:
            try:
                with caller_script_hidden():  # spawn/forkserver would import the caller's script again
                    for _mine, theirs in pipes:
                        proc = ctx.Process(target=_serve, args=(theirs, initargs), daemon=True)
                        proc.start()
                        self.procs.append(proc)
                        if on_first_start is not None and len(self.procs) == 1:
                            # work for every pipe at once (the others' wait there until they run): starting
                            # the next worker takes 10-60 ms, which the first spends decoding
                            on_first_start(self)
            except BaseException as exc:  # raised in the reader by wait_started()
                self._failed = exc
            finally:
                for _mine, theirs in pipes:  # the workers hold their ends now
                    theirs.close()
                self._started.set()

        if background:
            threading.Thread(target=start, name="pooltrace-decode-start", daemon=True).start()
        else:
            start()

    def started(self) -> bool:
        """The worker processes have been started (or starting them failed)."""
        return self._started.is_set()

    def wait_started(self) -> None:
        self._started.wait()
        if self._failed is not None:
            raise self._failed

    def send(self, k: int, task: tuple) -> None:
        self.conns[k % len(self.conns)].send(task)

    def receive(self, k: int, timeout: float | None = None):
        """Worker k % jobs's next result; raises what the worker raised, or WorkerError when it is gone
        (or says nothing for `timeout` seconds)."""
        conn = self.conns[k % len(self.conns)]
        try:
            if timeout is not None and not conn.poll(timeout):
                raise WorkerError("a decode worker did not answer; run again, or with --jobs 1 to decode in "
                                  "this process")
            status, value = conn.recv()
        except (EOFError, OSError):
            raise WorkerError("a decode worker stopped (killed, or out of memory?); run again, or with --jobs 1 "
                              "to decode in this process") from None
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        self._started.wait()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()


class Feed:
    """The chunks of a plan handed out in order, one at a time to the reading process while the workers start
    (here()), then to the workers (submit(): the n-th chunk sent to them to worker n % jobs, at most AHEAD per
    worker in flight). The thread that starts the workers calls submit() as soon as the first one runs, so
    that it does not wait for the reader to finish a chunk of its own; the reader takes over after that."""

    def __init__(self, plan: list[tuple[list[int], int]], blocks: Blocks, digest_stacks: bool, jobs: int):
        self.plan = plan
        self.blocks = blocks
        self.digest_stacks = digest_stacks
        self.limit = jobs * AHEAD
        self.next = 0  # the first chunk of the plan not handed out
        self.sent = 0  # chunks sent to the workers
        self.inflight: deque = deque()  # (number among the chunks sent to the workers, the block lent to it)
        self.to_workers = False  # set by the first submit(): this process decodes no more chunks
        self._lock = threading.Lock()

    def here(self) -> int | None:
        """The next chunk for this process to decode, or None once the workers take them (or none is left)."""
        with self._lock:
            if self.to_workers or self.next == len(self.plan):
                return None
            self.next += 1
            return self.next - 1

    def submit(self, workers: Workers) -> None:
        """Send the next chunks to the workers, up to the limit in flight."""
        with self._lock:
            self.to_workers = True
            while self.next < len(self.plan) and len(self.inflight) < self.limit:
                block = self.blocks.lend()
                workers.send(self.sent, (self.plan[self.next][0], self.digest_stacks, block))
                self.inflight.append((self.sent, block))
                self.sent += 1
                self.next += 1


def _run(workers: Workers, feed: Feed, here: tuple | None = None) -> Iterator[DecodedChunk]:
    """The chunks of `feed`'s plan in order: with `here` (source, index, user limit), the first ones decoded
    in this process until the workers have started, the others by the workers."""
    plan, blocks, inflight = feed.plan, feed.blocks, feed.inflight
    try:
        if here is not None:
            source, index, user_limit = here
            while not workers.started() and (k := feed.here()) is not None:
                yield decode_buffers(source, index, plan[k][0], user_limit, feed.digest_stacks)
        if feed.next == len(plan) and not inflight:
            return
        workers.wait_started()  # raises when starting one failed (the first may have chunks already)
        feed.submit(workers)
        while inflight:
            k, block = inflight.popleft()  # before receiving: an error answer is this chunk's answer too
            result = workers.receive(k)
            if block is not None and not result[1]:
                blocks.give_back(block)  # the worker made a block of its own (the columns did not fit)
            dc = _take(result, blocks)
            feed.submit(workers)
            yield dc
    finally:
        # stopped early (an error, or the consumer stopped, maybe while this process decoded chunks and the
        # start thread had handed others out): take what the workers still send, so that blocks they made
        # for it are removed
        with contextlib.suppress(Exception):
            workers.wait_started()  # the start thread is done with the chunks in flight
        for k, _block in inflight:
            with contextlib.suppress(Exception):
                _take(workers.receive(k, timeout=30), blocks)
