"""Writing what the user asked for without losing what they had.

Every output file pooltrace writes goes through :func:`atomic_write` or :func:`atomic_open`: the content is
written to a temporary file in the target's directory and renamed over the target only when complete, so an
interrupted or failed run leaves the old file (or nothing), never half a file. :func:`refuse_inputs` stops an
output path that resolves to one of the command's inputs, and :func:`check_dataset_dir` allows replacing a
directory only when it is empty or a pooltrace dataset. Failures are PooltraceError with one line (exit 2).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from pooltrace.errors import OutputError, PooltraceError

DATASET_FILES = ("allocations.parquet", "stacks.parquet", "modules.parquet", "summary.npz", "trace.json")
TMP_PREFIX = ".pooltrace-tmp-"  # short: a long trace name must not make the temporary name too long
NOT_OURS = "not a pooltrace dataset; choose a new or empty directory"


def os_reason(exc: OSError) -> str:
    """The OS's one-line reason (``Permission denied``), without Python's repr."""
    return exc.strerror or str(exc) or type(exc).__name__


def _resolved(path: Path) -> Path:
    try:
        return Path(os.path.abspath(path)).resolve()
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13): the path as given
        return Path(os.path.abspath(path))


def _same_or_inside(path: Path, other: Path) -> bool:
    """`path` is `other`, or lies inside the directory `other` (both resolved)."""
    return path == other or other in path.parents


def refuse_inputs(output: Path, inputs: Iterable[Path], option: str = "-o") -> None:
    """Exit 2 when `output` is one of `inputs`, or lies inside an input dataset directory or the cache
    directory an .etl input is paired into."""
    out = _resolved(output)
    for inp in inputs:
        inp = Path(inp)
        candidates = [inp]
        if inp.suffix.lower() == ".etl":
            candidates.append(inp.with_name(inp.stem + ".pooltrace"))
        for c in candidates:
            try:
                hit = _same_or_inside(out, _resolved(c)) or (out.exists() and c.exists() and out.samefile(c))
            except OSError:
                hit = False
            if hit:
                raise PooltraceError(f"{option} {output}: that is an input of this command ({inp}); "
                                     "choose another output file")


def _parent_ok(path: Path) -> Path:
    parent = _resolved(path).parent
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot write: the directory {parent} does not exist")
    return parent


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO]:
    """A file object whose content replaces `path` only when the block completes without an exception.
    Text mode writes UTF-8 with ``\\n`` line ends."""
    path = Path(path)
    if path.is_dir():
        raise PooltraceError(f"{path}: is a directory; give a file name")
    parent = _parent_ok(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:80]}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {os_reason(exc)}") from None
    ok = False
    try:
        kw = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **kw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _keep_mode(path, tmp)
        os.replace(tmp, path)
        ok = True
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {os_reason(exc)}") from None
    finally:
        if not ok:
            with suppress(OSError):
                os.unlink(tmp)


def _keep_mode(path: Path, tmp: str) -> None:
    """A replaced file keeps its permissions; a new one gets the usual umask-based mode (mkstemp uses 0600)."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` atomically."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)


# ---- dataset directories ----------------------------------------------------------------------------

def is_our_dataset(path: Path) -> bool:
    """`path` holds a trace.json that pooltrace wrote (a JSON object with `pooltrace_version`)."""
    try:
        meta = json.loads((path / "trace.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and "pooltrace_version" in meta


def check_dataset_dir(out_dir: Path, inputs: Iterable[Path] = ()) -> None:
    """Exit 2 unless `out_dir` is new, an empty directory, or a pooltrace dataset (whose dataset files
    may be replaced); never when an input lies inside it."""
    out_dir = Path(out_dir)
    target = _resolved(out_dir)
    for inp in inputs:
        if _same_or_inside(_resolved(inp), target):
            raise PooltraceError(f"{out_dir}: holds the input {inp}; choose a new or empty directory")
    if not os.path.lexists(out_dir):
        return
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory; {NOT_OURS}")
    try:
        entries = [e.name for e in os.scandir(out_dir)]
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot read the directory: {os_reason(exc)}") from None
    entries = [e for e in entries if not e.startswith(TMP_PREFIX)]
    if not entries or is_our_dataset(out_dir) or set(entries) <= set(DATASET_FILES):
        return
    raise OutputError(f"{out_dir}: {NOT_OURS}")


def check_parent(out_dir: Path) -> None:
    """Exit 2 when the directory that should hold `out_dir` does not exist (a typo is not created)."""
    parent = _resolved(out_dir).parent
    if not parent.is_dir():
        raise OutputError(f"{out_dir}: cannot create the dataset directory: {parent} does not exist")


def install_dataset(tmp: Path, out_dir: Path) -> None:
    """Move the dataset files written in `tmp` into `out_dir` (created if new), one atomic rename each;
    trace.json goes last, so a dataset is never announced before its tables. Other files in `out_dir` are
    left alone; the directory itself is never removed or renamed (it may be the current directory)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / "trace.json"
    if stale.exists():
        stale.unlink()  # the old tables are replaced next: without this, trace.json would describe them
    names = [n for n in DATASET_FILES if n != "trace.json" and (tmp / n).exists()] + ["trace.json"]
    for name in names:
        os.replace(tmp / name, out_dir / name)
    for name in DATASET_FILES:
        if name not in names and (out_dir / name).exists():
            (out_dir / name).unlink()
