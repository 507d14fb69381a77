"""How many decode processes a trace gets, and starting the process they are forked from — without numpy or
pyarrow, so that `pooltrace pair` can start that process before it loads the pairing code itself.

The decode workers (etl.parallel) are forked from a server process that imports the decoders once (about
0.2 s: numpy, pyarrow, the decoders). `pair` starts it first thing (start_for), so that the server's imports
run on a second core while the command's own imports (another 0.2 s) run on the first; the workers can then
start as soon as the buffer index is read. Where the forkserver start method does not exist (Windows,
macOS's spawn-only builds), workers are spawned and there is nothing to start early.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import types
from pathlib import Path

# smaller traces are decoded in one process: worker start-up (~0.5 s) > the decode moved (~0.4 s per 100 MB)
PARALLEL_MIN_BYTES = 128 << 20
DECODERS = "pooltrace.etl.chunks"  # what the server imports once for every worker


def default_jobs() -> int:
    """The processors this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on every OS
        return max(1, os.cpu_count() or 1)


def decode_jobs(jobs: int | None, trace_bytes: int) -> int:
    """Decode processes for a trace: `jobs`, at most the processors this process may use (the default;
    more would only take memory: a worker and its shared-memory blocks are tens of MB each), but one for
    traces under PARALLEL_MIN_BYTES, where starting workers costs more than it saves."""
    if trace_bytes < PARALLEL_MIN_BYTES:
        return 1
    cores = default_jobs()
    return max(1, cores if jobs is None else min(jobs, cores))


def trace_bytes(path: str | os.PathLike) -> int:
    """The trace's size; 0 when it cannot be read (the reader says why)."""
    try:
        return os.stat(path).st_size
    except (OSError, ValueError):
        return 0


def context():
    """The multiprocessing context of the decode workers: forked from a clean server with the decoders
    imported once where the OS has forkserver, else spawned."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([DECODERS])
        return ctx
    return mp.get_context("spawn")


@contextlib.contextmanager
def caller_script_hidden():
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


def start_early() -> None:
    """Start the process the decode workers are forked from now (it imports the decoders, ~0.2 s of a
    second core), so that it loads while the caller does something else. Only the forkserver start method has
    such a process; with spawn this does nothing. Starting it again does nothing."""
    ctx = context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        with caller_script_hidden():
            forkserver.ensure_running()


def start_for(trace: str | os.PathLike, jobs: int | None) -> int:
    """start_early() when `trace` will be decoded by more than one process; returns decode_jobs for it."""
    n = decode_jobs(jobs, trace_bytes(Path(trace)))
    if n > 1:
        start_early()
    return n
