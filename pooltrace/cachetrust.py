"""Which caches beside traces (`<trace>.pooltrace/`) this process reused, and the one retry when a reused
cache proves damaged after it was opened.

A cache is checked when opened (datasetcheck.verify_dataset), but its columns are read only when a command
uses them, so damage inside a column's data shows late. The cache is pooltrace's own: it is rebuilt from its
trace, never trusted and never reported as the user's error. A dataset the user named, or a cache built by
the very run that failed, keeps the one-line error ("re-run `pooltrace pair`"). Light: no numpy, no pyarrow.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pooltrace.errors import DamagedDataset

T = TypeVar("T")

_reused: set[Path] = set()  # caches open_input reused
_distrusted: set[Path] = set()  # caches found damaged after they were opened: rebuilt when next opened


def _key(cache: Path) -> Path:
    return Path(cache).absolute()


def reused(cache: Path) -> None:
    """open_input reused this cache instead of pairing its trace."""
    _reused.add(_key(cache))


def trusted(cache: Path) -> bool:
    """The cache may be reused (it has not proved damaged in this process)."""
    return _key(cache) not in _distrusted


def rebuild_damaged_caches(run: Callable[[], T], note: Callable[[str], None] | None = None) -> T:
    """Run `run()`; if it fails on a damaged file of a reused cache, `note` says so and `run()` runs once more
    (open_input then rebuilds that cache from its trace). Any other error goes through unchanged."""
    try:
        return run()
    except DamagedDataset as exc:
        damaged = _key(exc.path)
        cache = next((c for c in _reused if damaged == c or c in damaged.parents), None)
        if cache is None or cache in _distrusted:
            raise
        _distrusted.add(cache)
        _reused.discard(cache)
        if note is not None:
            problem = str(exc).removeprefix(f"{exc.path}: ").removesuffix("; re-run `pooltrace pair`")
            note(f"{exc.path}: {problem}; rebuilding the cache from its trace")
        return run()
