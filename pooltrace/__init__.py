"""pooltrace: find Windows kernel pool leaks down to the call stack, from .etl traces, on any OS.

The Python API (pandas DataFrames; see ``pooltrace.api``) is loaded on first use, so ``import pooltrace``
and the command line stay light:

    >>> import pooltrace
    >>> ds = pooltrace.open("trace.etl")
    >>> ds.outstanding(by="function")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["Owners", "PooltraceError", "TraceDataset", "__version__", "diff", "open", "trend", "whose"]

if TYPE_CHECKING:
    from pooltrace.api import Owners, TraceDataset, diff, open, trend, whose  # noqa: A004


def __getattr__(name: str):
    if name == "PooltraceError":  # what the API raises for bad input; light, no data libraries
        from pooltrace.errors import PooltraceError

        return PooltraceError
    if name in __all__ and name != "__version__":
        from pooltrace import api

        return getattr(api, name)
    raise AttributeError(f"module 'pooltrace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
