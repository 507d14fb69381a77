"""Stopping sessions: the one this recorder started (:class:`Session`, idempotent, thread-safe), and
``pooltrace stop``'s job — list every running pooltrace session and stop each one, renaming the
``OUT.etl.partial`` it wrote.

A system-logger session outlives the process that started it (killed, logged off, shut down: console
programs never receive CTRL_LOGOFF/CTRL_SHUTDOWN), so a leftover session keeps recording until someone
stops it; the size cap bounds what it can write meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from dataclasses import dataclass

from pooltrace.collector.boundary import WindowsApi
from pooltrace.collector.config import constants
from pooltrace.collector.messages import message, win32
from pooltrace.collector.plan import PARTIAL_SUFFIX, SessionPlan, control_properties
from pooltrace.collector.structs import SessionStats, build_properties
from pooltrace.errors import PooltraceError

MAX_SESSIONS = 64  # "the maximum number of sessions is 64" (QueryAllTraces docs)


@contextlib.contextmanager
def defer_sigint():
    """Hold Ctrl+C (SIGINT) over a critical section, so it cannot leave a running kernel session, an
    unrenamed trace or a started session without its owner behind. Yields a list that receives the
    signals held back. Main thread only (signal handlers live there); elsewhere a no-op."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    try:
        old = signal.signal(signal.SIGINT, lambda signum, _frame: held.append(signum))
    except ValueError:
        yield held
        return
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, old)


class Session:
    """A started session; stop() is idempotent and thread-safe (the console handler may call it)."""

    def __init__(self, api: WindowsApi, plan: SessionPlan, handle: int):
        self.api, self.plan, self.handle = api, plan, handle
        self.lock = threading.Lock()
        self.result: tuple[SessionStats | None, str | None] | None = None

    def query(self) -> tuple[int, SessionStats | None]:
        props = self.plan.control_properties()
        status = self.api.control_trace(self.handle, self.plan.name, props, constants()["control"]["QUERY"])
        return status, SessionStats.parse(props) if status == 0 else None

    def stop(self) -> tuple[SessionStats | None, str | None]:
        with self.lock:
            if self.result is not None:
                return self.result
            control = constants()["control"]
            with defer_sigint():
                self.api.control_trace(self.handle, self.plan.name, self.plan.control_properties(), control["FLUSH"])
                props = self.plan.control_properties()
                status = self.api.control_trace(self.handle, self.plan.name, props, control["STOP"])
            if status == 0:
                self.result = (SessionStats.parse(props), None)
            elif status == win32("ERROR_WMI_INSTANCE_NOT_FOUND"):
                self.result = (None, f"the {self.plan.name} session had already been stopped (by `pooltrace stop`?)")
            else:
                flag = " --kernel-logger" if self.plan.kind == "kernel" else ""
                self.result = (None, f"stopping the {self.plan.name} session failed: {constants().win32_name(status)}; "
                                     f"end it with `pooltrace stop{flag}`")
            return self.result


@dataclass(frozen=True)
class RunningSession:
    name: str
    log_file: str
    log_file_mode: int

    @property
    def system_logger(self) -> bool:
        c = constants()
        return bool(self.log_file_mode & c["logging_mode"]["SYSTEM_LOGGER_MODE"]) or \
            self.name in c["logger"]["reserved_system_logger_names"]

    @property
    def ours(self) -> bool:
        return self.name.lower().startswith(constants()["logger"]["name_prefix"])


def list_sessions(api: WindowsApi) -> list[RunningSession]:
    """Every running trace session (QueryAllTracesW fills up to 64 properties buffers)."""
    buffers = [build_properties() for _ in range(MAX_SESSIONS)]  # only sizes and offsets set (the docs)
    status, count = api.query_all_traces(buffers)
    if status == win32("ERROR_ACCESS_DENIED"):
        raise PooltraceError(message("admin"))
    if status and status != win32("ERROR_MORE_DATA"):  # MORE_DATA: more than 64 sessions, the first 64 filled
        raise PooltraceError(message("generic", operation="listing the trace sessions (QueryAllTraces)",
                                     code=constants().win32_name(status)))
    out = []
    for buf in buffers[:min(count, MAX_SESSIONS)]:
        st = SessionStats.parse(buf)
        out.append(RunningSession(st.logger_name, _win32_path(st.log_file), st.log_file_mode))
    return out


@dataclass(frozen=True)
class StopResult:
    name: str
    stats: SessionStats
    trace: str | None  # the file the session wrote
    renamed_to: str | None  # OUT.etl when the session wrote OUT.etl.partial and it was renamed


def _win32_path(path: str) -> str:
    return path[4:] if path.startswith("\\??\\") else path


def _guid_for(name: str) -> uuid.UUID | None:
    c = constants()
    logger = c["logger"]
    if name == logger["kernel_name"]:
        return c.kernel_guid
    if name == logger["private_name"]:
        return c.private_guid
    if name == logger["doctor_name"]:
        return uuid.UUID(logger["doctor_guid"])
    return None


def stop_one(api: WindowsApi, name: str) -> StopResult:
    """Stop a session by name (ControlTrace STOP with Wnode.Guid set where pooltrace knows it) and rename
    the OUT.etl.partial it wrote to OUT.etl unless that exists."""
    c = constants()
    props = control_properties(_guid_for(name))
    status = api.control_trace(0, name, props, c["control"]["STOP"])
    if status == win32("ERROR_WMI_INSTANCE_NOT_FOUND"):
        raise PooltraceError(message("not_found", name=name))
    if status == win32("ERROR_ACCESS_DENIED"):
        raise PooltraceError(message("admin"))
    if status:
        raise PooltraceError(message("generic", operation=f"stopping {name} (ControlTrace)",
                                     code=c.win32_name(status)))
    stats = SessionStats.parse(props)
    trace = _win32_path(stats.log_file) or None
    renamed = None
    if trace and trace.endswith(PARTIAL_SUFFIX):
        final = trace[:-len(PARTIAL_SUFFIX)]
        if os.path.exists(trace) and not os.path.exists(final):
            with contextlib.suppress(OSError):
                os.replace(trace, final)
                renamed = final
    return StopResult(name, stats, trace, renamed)


def stop_sessions(api: WindowsApi, kernel_logger: bool = False) -> list[StopResult]:
    """``pooltrace stop``: every running session whose name starts with "pooltrace" (and, with
    kernel_logger, the NT Kernel Logger, whoever started it). None running is an error."""
    kernel = constants()["logger"]["kernel_name"]
    names = [s.name for s in list_sessions(api) if s.ours or (kernel_logger and s.name == kernel)]
    if not names:
        raise PooltraceError(message("not_found", name="NT Kernel Logger" if kernel_logger else "pooltrace"))
    return [stop_one(api, n) for n in names]
