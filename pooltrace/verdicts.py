"""The one wording of the verdict for a trace that cannot show pool leaks (no kernel events, no pool
events), shared by `info` (read from the trace) and every report (read from trace.json), so that every
command says the same sentence about the same trace."""

from __future__ import annotations

RECORD_HINT = "record with `pooltrace record`"


def no_pool_verdict(pool_events: int, kernel_events: int | None = None, logger: str | None = None,
                    pool_tracing_enabled: bool | None = None, damaged: bool = False) -> str | None:
    """The verdict when the trace has no pool events, else None. `kernel_events` None (a dataset written
    before it was stored) skips the user-mode wording."""
    if kernel_events == 0 and damaged:  # a truncated kernel trace is no user-mode trace
        return ("no kernel events could be read: the file is truncated or damaged (see the warnings); pool leaks "
                "need the whole trace")
    if kernel_events == 0:
        return (f"no kernel events: this is a user-mode trace (logger {logger!r}); pool leaks need a kernel "
                f"trace with pool events: {RECORD_HINT}")
    if pool_events == 0:
        why = " (the POOL group was not enabled)" if pool_tracing_enabled is False else ""
        return f"no pool events{why}: this trace cannot show pool leaks; {RECORD_HINT}"
    return None


def gate_refusal(empty: list[str], sep: str = ", ") -> str:
    """Why a growth gate fails when the runs named in `empty` have no pool events (diff, trend)."""
    return f"{sep.join(empty)} {'has' if len(empty) == 1 else 'have'} no pool events: the gate cannot pass on nothing"
