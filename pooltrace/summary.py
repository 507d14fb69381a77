"""The default report's figures, precomputed by `pair` (`summary.npz` in the dataset): lifetime totals, the
outstanding allocations reduced per stack (count, bytes, bytes per tag, first row) and the growth counts of
those stacks (a stack without outstanding allocations is in no group: its counts are never summed), all over
the default window (the whole trace). A report by stack, function or module over the whole
trace without tag, pool or pid filters reads them instead of decoding every allocation row; the groups, the
growth and the totals come out of the same code either way (analysis.build_report), so the output is the same
byte for byte.

The summary is derived data, used only when it can be trusted, otherwise the report reads the rows:
- it is bound to the allocations.parquet it was computed from: that file's size and CRC-32 (a file changed
  in any byte, replaced or re-paired by an older version, is not the summary's);
- it is checked when read (datasetcheck's spirit): the array names, types and shapes; a SHA-256 of its
  content; its row and stack counts against the dataset's; keys, rows and tags in range; totals that agree
  with each other. A damaged one is said (``warn``) and not used.
Datasets without it (older versions, run stores) are reported from their rows as before.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pooltrace.analysis import AIFO, PerKey, Window
from pooltrace.datasetopen import NULL_NS, Dataset
from pooltrace.growth import POINTS, GrowthCounts

NAME = "summary.npz"
VERSION = 2  # 2: growth counts of the outstanding stacks only
_I64, _U32, _F64, _U8 = np.dtype("<i8"), np.dtype("<u4"), np.dtype("<f8"), np.dtype("u1")
# every array of the file and its dtype (all one-dimensional)
ARRAYS = {
    "version": _I64, "allocations": _I64,  # [size, CRC-32, rows] of allocations.parquet
    "stacks": _I64, "window": _I64, "points": _I64,
    "lifetime_counts": _I64, "lifetime_bytes": _F64,
    "keys": _I64, "counts": _I64, "nbytes": _I64, "first_row": _I64, "pid": _U32, "alloc_ns": _I64,
    "pair_key": _I64, "pair_tag": _I64, "pair_bytes": _I64, "tag_text": _U8, "tag_ends": _I64,
    "up_w": _F64, "up_c": _I64, "down_w": _F64, "down_c": _I64,
}
_PER_KEY = ("keys", "counts", "nbytes", "first_row", "pid", "alloc_ns")
_PAIRS = ("pair_key", "pair_tag", "pair_bytes")


@dataclass
class Summary:
    window: Window  # start and the effective end (analysis.effective_end) it was computed for
    lifetime_counts: np.ndarray  # rows per lifetime class + 1 (analysis._Scan.counts)
    lifetime_bytes: np.ndarray
    per_key: PerKey  # the outstanding rows per stack
    growth: GrowthCounts  # per key of per_key, in its order

    def growth_keys(self, group_of_stack: np.ndarray) -> np.ndarray:
        """analysis._group_of_key's lookup (per stack id, no stack last) as one per key of `growth`."""
        keys = self.per_key.keys
        return group_of_stack[np.where(keys >= 0, keys, len(group_of_stack) - 1)]


class Damaged(Exception):
    """The summary file cannot be trusted (its message says why)."""


def allocations_identity(path: Path) -> tuple[int, int]:
    """(size, CRC-32) of a file."""
    with open(path, "rb", buffering=0) as f:
        return crc_read(f)


def crc_read(f, size: int = 0, crc: int = 0) -> tuple[int, int]:
    """`size` and `crc` (CRC-32) carried on over what is left to read of the open file `f`, read in pieces
    into one buffer (not mapped: its pages would count in the process's memory)."""
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    while n := f.readinto(buf):
        crc = zlib.crc32(view[:n], crc)
        size += n
    return size, crc


def _digest(arrays: dict[str, np.ndarray]) -> bytes:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.data)
    return h.digest()


def write_summary(ds_dir: Path) -> bool:
    """Compute and write `ds_dir`/summary.npz from the dataset written there (False, and no file, when
    the trace has no duration: the default window then follows the rows). `pair` computes the same arrays
    while it writes the rows (RowScan) and comes here only when it could not."""
    from pooltrace.analysis import Filters, _scan, parse_window, per_key
    from pooltrace.datasetopen import load_dataset

    ds = load_dataset(ds_dir)
    duration = ds.trace.get("duration_ns")
    if duration is None:
        return False
    with ThreadPoolExecutor(1, thread_name_prefix="pooltrace-crc") as pool:  # read while the rows are scanned
        identity = pool.submit(allocations_identity, ds_dir / "allocations.parquet")
        scan = _scan(ds, parse_window(None, duration), "stack", Filters())
        pk = per_key(scan.sel, scan.out, "stack", ds.tags)
        g = scan.growth
        rows = np.where(pk.keys >= 0, pk.keys, g.keys - 1)  # the growth keys of the outstanding stacks (-1: last)
        bins = [x.reshape(g.keys + 1, -1)[rows] for x in (g.up_w, g.up_c, g.down_w, g.down_c)]
        size, crc = identity.result()
    save(ds_dir, _arrays((size, crc, ds.n), len(ds.stacks), (g.start_ns, g.end_ns), scan.counts, scan.nbytes, pk,
                         bins))
    return True


def _arrays(identity: tuple[int, int, int], stacks: int, window: tuple[int, int], counts: np.ndarray,
            nbytes: np.ndarray, pk: PerKey, bins: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The file's arrays (ARRAYS, and the digest of the others): `identity` is allocations.parquet's [size,
    CRC-32, rows], `bins` the growth counts (up_w, up_c, down_w, down_c) of the keys of `pk`, in its order."""
    arrays = {**_naming(identity, stacks), **content(window, counts, nbytes, pk, bins)}
    arrays["digest"] = np.frombuffer(_digest(arrays), dtype=np.uint8)
    return arrays


def _naming(identity: tuple[int, int, int], stacks: int) -> dict[str, np.ndarray]:
    """The arrays that name the dataset's files: the version, allocations.parquet's [size, CRC-32, rows]
    (`identity`) and the number of stacks."""
    return {"version": _array("version", [VERSION]), "allocations": _array("allocations", identity),
            "stacks": _array("stacks", [stacks])}


def content(window: tuple[int, int], counts: np.ndarray, nbytes: np.ndarray, pk: PerKey,
            bins: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays that do not name the dataset's files (all but version, allocations, stacks and digest)."""
    text = [t.encode("utf-8", "surrogatepass") for t in pk.tag_names]
    up_w, up_c, down_w, down_c = bins
    arrays = {
        "window": list(window), "points": [POINTS], "lifetime_counts": counts, "lifetime_bytes": nbytes,
        "keys": pk.keys, "counts": pk.counts, "nbytes": pk.nbytes, "first_row": pk.first_row, "pid": pk.pid,
        "alloc_ns": pk.alloc_ns, "pair_key": pk.pair_key, "pair_tag": pk.pair_tag, "pair_bytes": pk.pair_bytes,
        "tag_text": np.frombuffer(b"".join(text), dtype=np.uint8), "tag_ends": np.cumsum([len(t) for t in text]),
        "up_w": up_w, "up_c": up_c, "down_w": down_w, "down_c": down_c,
    }
    return {name: _array(name, v) for name, v in arrays.items()}


def _array(name: str, v) -> np.ndarray:
    return np.asarray(v, dtype=ARRAYS[name]).reshape(-1)


def save(ds_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write summary.npz (under a temporary name, renamed when complete)."""
    tmp = ds_dir / (NAME + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, ds_dir / NAME)


class Partial:
    """summary.npz written in two steps: the arrays known first (`content`) while the dataset's files are
    still being written, then, once allocations.parquet is complete, the ones that name it and the digest
    (`finish`). The same arrays as `save` writes; the file is renamed into place when complete, and removed
    when not (`abort`)."""

    def __init__(self, ds_dir: Path, arrays: dict[str, np.ndarray]):
        self._dir = ds_dir
        self._tmp = ds_dir / (NAME + ".tmp")
        self._arrays = dict(arrays)
        self._zip = zipfile.ZipFile(self._tmp, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True)
        try:
            self._write(arrays)
        except BaseException:
            self.abort()
            raise

    def _write(self, arrays: dict[str, np.ndarray]) -> None:
        for name, a in arrays.items():  # as np.savez writes them
            with self._zip.open(name + ".npy", "w", force_zip64=True) as fid:
                np.lib.format.write_array(fid, a, allow_pickle=False)

    def finish(self, identity: tuple[int, int, int], stacks: int) -> None:
        arrays = _naming(identity, stacks)
        arrays["digest"] = np.frombuffer(_digest({**self._arrays, **arrays}), dtype=np.uint8)
        try:
            self._write(arrays)
            self._zip.close()
            self._zip = None
            os.replace(self._tmp, self._dir / NAME)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close and remove the file if it is not complete (nothing when it is)."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        if self._tmp.exists():
            self._tmp.unlink()


def read_summary(ds: Dataset) -> tuple[Summary | None, str | None]:
    """The dataset's summary when there is one that belongs to its allocations.parquet and passes every
    check; else None and, when a summary file is there but damaged, why (one line naming the file)."""
    path = ds.path / NAME
    try:
        if not path.is_file():  # absent (an older dataset), or not a regular file (a directory, a pipe)
            return None, None if not os.path.lexists(path) else f"{path}: not a regular file"
        return _read(ds, path), None
    except _Stale:
        return None, None
    except Damaged as exc:
        return None, f"{path}: {exc}"
    # unreadable, not an .npz, or a zip header claiming a version or method zipfile does not implement
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        return None, f"{path}: unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"


class _Stale(Exception):
    """A summary of other rows than the dataset's (its allocations.parquet changed since)."""


def _read(ds: Dataset, path: Path) -> Summary:
    with ThreadPoolExecutor(1, thread_name_prefix="pooltrace-crc") as pool:  # read while the summary is checked
        identity = pool.submit(_identity, ds.path / "allocations.parquet")
        return _checked(ds, path, identity)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        return allocations_identity(path)
    except OSError:  # the rows' reader will say why
        return None


def _check_lengths(a: dict[str, np.ndarray], lengths: dict[str, int]) -> None:
    for name, n in lengths.items():
        if len(a[name]) != n:
            raise Damaged(f"array {name!r} has {len(a[name])} values, expected {n}")


def _checked(ds: Dataset, path: Path, identity: Future) -> Summary:
    with np.load(path, allow_pickle=False) as z:
        names = set(z.files)
        want = set(ARRAYS) | {"digest"}
        if names != want:
            raise Damaged(f"arrays {sorted(names ^ want)} missing or unknown")
        a = {name: z[name] for name in want}
    for name, dtype in {**ARRAYS, "digest": _U8}.items():
        if a[name].dtype != dtype or a[name].ndim != 1:
            raise Damaged(f"array {name!r} is {a[name].dtype}{a[name].shape}, expected {dtype} (1-d)")
    digest = a.pop("digest")
    if digest.tobytes() != _digest(a):
        raise Damaged("its content does not match its SHA-256")
    sizes = {"version": 1, "allocations": 3, "stacks": 1, "window": 2, "points": 1, "lifetime_counts": 5,
             "lifetime_bytes": 5}
    _check_lengths(a, sizes)
    if int(a["version"][0]) != VERSION:
        raise _Stale  # written by another version: not this one's to read
    size, crc, rows = a["allocations"].tolist()
    if identity.result() != (size, crc) or rows != ds.n:
        raise _Stale
    stacks = int(a["stacks"][0])
    if stacks != len(ds.stacks):
        raise Damaged(f"{stacks} stacks where stacks.parquet has {len(ds.stacks)}")
    points = int(a["points"][0])
    if points != POINTS:
        raise Damaged(f"{points} growth points, expected {POINTS}")
    k = len(a["keys"])
    p = len(a["pair_key"])
    ends = a["tag_ends"]
    bins = k * (points + 1)
    lengths = {**dict.fromkeys(_PER_KEY, k), **dict.fromkeys(_PAIRS, p), "up_w": 2 * bins, "up_c": 2 * bins,
               "down_w": bins, "down_c": bins}
    _check_lengths(a, lengths)
    keys = a["keys"]
    if k and (keys[0] < -1 or keys[-1] >= stacks or (np.diff(keys) <= 0).any()):
        raise Damaged("its stack ids are not ascending stack ids of the dataset")
    if k and (a["counts"].min() <= 0 or a["nbytes"].min() < 0 or a["first_row"].min() < 0
              or a["first_row"].max() >= rows):
        raise Damaged("counts, bytes or rows out of range")
    if len(ends) and (ends[0] < 0 or (np.diff(ends) < 0).any() or ends[-1] != len(a["tag_text"])):
        raise Damaged("its tag names are not well formed")
    if p and (a["pair_key"].min() < 0 or a["pair_key"].max() >= k or a["pair_tag"].min() < 0
              or a["pair_tag"].max() >= len(ends) or a["pair_bytes"].min() < 0
              or (np.diff(a["pair_key"] * (len(ends) + 1) + a["pair_tag"]) <= 0).any()):
        raise Damaged("its (stack, tag) pairs are out of range or not ascending")
    if not np.array_equal(np.bincount(a["pair_key"], weights=a["pair_bytes"], minlength=k), a["nbytes"]):
        raise Damaged("the bytes per tag do not add up to the bytes per stack")
    counts, nbytes = a["lifetime_counts"], a["lifetime_bytes"]
    if counts.min() < 0 or counts.sum() != rows or int(a["counts"].sum()) != counts[AIFO + 1] \
            or int(a["nbytes"].sum()) != nbytes[AIFO + 1]:
        raise Damaged("its lifetime totals do not agree with its rows and outstanding allocations")
    if min(a["up_c"].min(initial=0), a["down_c"].min(initial=0)) < 0:
        raise Damaged("negative growth counts")
    text = a["tag_text"].tobytes()
    bounds = [0, *ends.tolist()]
    try:
        names = [text[s:e].decode("utf-8", "surrogatepass") for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    except UnicodeDecodeError:
        raise Damaged("its tag names are not UTF-8") from None
    start, end = a["window"].tolist()
    pk = PerKey(keys, a["counts"], a["nbytes"], a["first_row"], keys, a["pid"], a["alloc_ns"], a["pair_key"],
                a["pair_tag"], a["pair_bytes"], names)
    extra = (points + 1) * 2  # the key of rows not counted: nothing
    growth = GrowthCounts.from_arrays(k, start, end, NULL_NS, *(np.concatenate([a[name], np.zeros(
        extra if name.startswith("up") else extra // 2, a[name].dtype)]) for name in ("up_w", "up_c", "down_w",
                                                                                      "down_c")), points)
    return Summary(Window(start, end), counts, nbytes, pk, growth)
