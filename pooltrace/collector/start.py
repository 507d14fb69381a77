"""Start a session: the checks before StartTrace (rights, output, disk, a session of that name left
running), then StartTrace itself, so that a started session always has an owner that will stop it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pooltrace.collector.boundary import WindowsApi
from pooltrace.collector.config import constants
from pooltrace.collector.messages import message, running_message, start_error, win32
from pooltrace.collector.plan import MB, RecordRequest, SessionPlan
from pooltrace.collector.stop import Session, defer_sigint, stop_one
from pooltrace.errors import PooltraceError


def preflight(api: WindowsApi, plan: SessionPlan, request: RecordRequest, output: Path,
              warn: Callable[[str], None]) -> None:
    """Refuse, in one line, what would fail or do harm; with --force stop a leftover pooltrace session."""
    c = constants()
    if not api.is_admin():
        raise PooltraceError(message("admin"))
    if output.exists() and not request.force:
        raise PooltraceError(f"{output} exists: choose another name or pass --force")
    if not output.parent.is_dir():
        raise PooltraceError(f"directory {output.parent} does not exist")
    disk = c["disk"]
    need_mb = request.max_size_mb + disk["circular_margin_mb"] if request.circular else disk["min_free_mb"]
    free = api.free_bytes(str(output.parent))
    if free < need_mb * MB:
        raise PooltraceError(f"only {free // MB:,} MB free in {output.parent}; recording needs at least "
                             f"{need_mb:,} MB: free some space, write elsewhere with -o, "
                             "or use --circular --max-size MB")
    if free < plan.maximum_file_size_mb * MB:
        warn(f"{free // MB:,} MB free in {output.parent}, less than the {plan.maximum_file_size_mb:,} MB size cap: "
             "the disk may fill first (lower it with --max-size)")
    status = api.control_trace(0, plan.name, plan.control_properties(), c["control"]["QUERY"])
    if status == win32("ERROR_ACCESS_DENIED"):
        raise PooltraceError(message("admin"))
    if status == 0:
        if plan.kind != "private" or not request.force:
            raise PooltraceError(running_message(plan.kind))
        old = stop_one(api, plan.name)  # a leftover of ours: --force stops it
        kept = old.renamed_to or old.trace
        warn(f"stopped a leftover {plan.name} session" + (f"; its trace: {kept}" if kept else ""))


def start(api: WindowsApi, plan: SessionPlan, log_file: Path, output: Path) -> tuple[Session, list[int]]:
    """StartTrace with Ctrl+C held, so the handle always reaches its Session. Returns the session and the
    Ctrl+C signals held back meanwhile (the caller stops the session and stops when there are any)."""
    with defer_sigint() as held:
        status, handle = api.start_trace(plan.name, plan.start_properties(str(log_file)))
        session = Session(api, plan, handle) if not status else None
    if session is None:
        raise PooltraceError(start_error(status, plan.kind, output))
    return session, held
