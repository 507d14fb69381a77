"""One ``pooltrace record`` run, above the Windows boundary: plan, start, configure and verify, wait, and
always stop — also on Ctrl+C, errors and console close — then rename the trace and write the sidecar.

The jobs live in their own modules: :mod:`.plan`, :mod:`.start`, :mod:`.configure`, :mod:`.snapshot`,
:mod:`.stop`. The call sequence (etw-collector.md §6)::

    ControlTraceW(0, name, QUERY)                      is a session of that name running already?
    NtQuerySystemInformation(SystemPoolTagInformation) tag baseline at start
    AdjustTokenPrivileges(SeDebugPrivilege)            so 24H2 shows module bases
    NtQuerySystemInformation(SystemModuleInformation)  loaded drivers at start
    StartTraceW(name, props)                           EnableFlags PROCESS|THREAD|IMAGE_LOAD, size cap
    NtSetSystemInformation(0x1F, class 10, tags)       pool-tag filter (only with --tag), before POOL is on
    TraceSetInformation(h, 3, CLASSIC_EVENT_ID[])      stacks for PoolAlloc... (fallback: class 6 hook ids)
    TraceSetInformation(h, 4, PERFINFO_GROUPMASK)      POOL on; triggers the rundown (fallback: class 1)
    NtQuerySystemInformation(0x1F, classes 10, 6, 1)   read back what is in effect; refuse what is not
    ControlTraceW(h, name, QUERY) every tick           live statistics
    ControlTraceW(h, name, FLUSH), (h, name, STOP)     always
    NtQuerySystemInformation(...) x2                   tag baseline and drivers at stop
    (the finished trace's ImageLoad events)            identities of drivers loaded during the trace
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pooltrace import __version__
from pooltrace.collector.boundary import WindowsApi
from pooltrace.collector.config import constants
from pooltrace.collector.configure import KernelState, configure
from pooltrace.collector.messages import win32
from pooltrace.collector.plan import RecordRequest, SessionPlan, check_platform, make_plan, partial_path
from pooltrace.collector.snapshot import Snapshots, utc_now
from pooltrace.collector.start import preflight, start
from pooltrace.collector.stop import Session, defer_sigint
from pooltrace.collector.structs import SessionStats
from pooltrace.errors import PooltraceError
from pooltrace.sidecar import sidecar_path, write_sidecar


@dataclass(frozen=True)
class LiveStatus:
    elapsed_s: float
    file_bytes: int
    events_lost: int | None
    buffers_lost: int | None
    duration_s: float | None = None
    command: str | None = None


def _clock_text(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def size_text(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def status_line(s: LiveStatus) -> str:
    when = _clock_text(s.elapsed_s) + (f" of {_clock_text(s.duration_s)}" if s.duration_s else "")
    lost = "?" if s.events_lost is None else f"{s.events_lost:,}"
    blost = "?" if s.buffers_lost is None else f"{s.buffers_lost:,}"
    tail = f"  running {s.command}" if s.command else ""
    return (f"recording {when}  file {size_text(s.file_bytes)}  events lost {lost}  buffers lost {blost}"
            f"{tail}  (Ctrl+C stops)")


class RecorderUi(Protocol):
    def tick(self, status: LiveStatus) -> None: ...
    def warning(self, text: str) -> None: ...


class _QuietUi:
    def tick(self, status: LiveStatus) -> None:
        pass

    def warning(self, text: str) -> None:
        pass


@dataclass
class RecordResult:
    output: Path
    sidecar: Path | None
    plan: SessionPlan
    seconds: float
    stopped_by: str  # ctrl-c, ctrl-break, duration, command, console-close, stopped-elsewhere, error
    stats: SessionStats | None
    file_bytes: int
    command_exit_code: int | None
    command_running_pid: int | None
    modules: int
    module_errors: int
    kernel_state: KernelState | None = None
    warnings: list[str] = field(default_factory=list)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class Recorder:
    """One ``pooltrace record`` run. ``run()`` returns when the recording ended and the output is final."""

    def __init__(self, api: WindowsApi, request: RecordRequest, ui: RecorderUi | None = None, *,
                 tick_s: float = 0.5, clock: Callable[[], float] = time.monotonic):
        self.api, self.request, self.ui = api, request, ui or _QuietUi()
        self.tick_s, self.clock = tick_s, clock
        self.warnings: list[str] = []
        self.session: Session | None = None
        self.child: subprocess.Popen | None = None
        self.recording = False
        self.stop_requested = threading.Event()
        self.stop_reason = "ctrl-c"
        self.finish_lock = threading.Lock()
        self.result: RecordResult | None = None
        self.kernel_state: KernelState | None = None
        # absolute: the file is created by the kernel's logger, not relative to our working directory
        self.output = Path(os.path.abspath(request.output))
        self.partial = partial_path(self.output)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.ui.warning(text)

    # -- running
    def console_event(self, event: int) -> bool:
        """SetConsoleCtrlHandler callback (runs on its own thread). Ctrl+C is left to Python
        (KeyboardInterrupt); Ctrl+Break stops the recording; closing the console finishes everything here,
        because Windows ends the process when the handler returns. (Logoff and shutdown never reach a
        console program: the session outlives it and `pooltrace stop` ends it.)"""
        ev = constants()["console"]
        if event == ev["CTRL_C"]:
            return False
        if event == ev["CTRL_BREAK"]:
            self.stop_reason = "ctrl-break"
            self.stop_requested.set()
            return True
        self.stop_reason = "console-close"
        self.stop_requested.set()
        if self.recording:
            self.finish("console-close")
        elif self.session is not None:
            self.session.stop()
            _unlink(self.partial)
        return True

    def _spawn(self) -> subprocess.Popen | None:
        if not self.request.command:
            return None
        try:
            return subprocess.Popen(list(self.request.command))
        except OSError as exc:
            raise PooltraceError(f"cannot run {self.request.command[0]}: {exc.strerror or exc}") from exc

    def _file_bytes(self) -> int:
        for p in (self.partial, self.output):
            try:
                return p.stat().st_size
            except OSError:
                continue
        return 0

    def _wait(self) -> str:
        req = self.request
        deadline = self.t0 + req.duration_s if req.duration_s else None
        command = " ".join(req.command) if req.command else None
        gone = win32("ERROR_WMI_INSTANCE_NOT_FOUND")
        while True:
            if self.stop_requested.is_set():
                return self.stop_reason
            now = self.clock()
            if deadline is not None and now >= deadline:
                return "duration"
            if self.child is not None and self.child.poll() is not None:
                return "command"
            status, stats = self.session.query()
            if status == gone:
                return "stopped-elsewhere"
            self.ui.tick(LiveStatus(now - self.t0, self._file_bytes(), stats.events_lost if stats else None,
                                    stats.log_buffers_lost + stats.real_time_buffers_lost if stats else None,
                                    req.duration_s, command))
            time.sleep(max(0.0, min(self.tick_s, deadline - now)) if deadline is not None else self.tick_s)

    def run(self) -> RecordResult:
        api, req = self.api, self.request
        plan = make_plan(req, check_platform(api))
        self.plan = plan
        preflight(api, plan, req, self.output, self.warn)
        _unlink(self.partial)
        self.started_utc = utc_now()
        self.snaps = Snapshots(api, plan.tags, self.warn)
        self.baseline_start = self.snaps.pool_tags("start")
        self.snaps.loaded_modules("start")
        try:
            self.session, held = start(api, plan, self.partial, self.output)
        except PooltraceError:
            _unlink(self.partial)
            raise
        failure: BaseException | None = None
        try:
            try:
                if held:
                    raise KeyboardInterrupt
                api.set_console_handler(self.console_event)
                self.kernel_state = configure(api, plan, self.session.handle, self.warn)
                self.t0 = self.clock()
                self.child = self._spawn()
                self.recording = True
                stopped_by = self._wait()
            except KeyboardInterrupt:
                if not self.recording:
                    self._abort()
                    raise
                stopped_by = "ctrl-c"
            except BaseException as exc:
                if not self.recording:
                    self._abort()
                    raise
                failure, stopped_by = exc, "error"
            result = self.finish(stopped_by)
        finally:
            self.session.stop()  # idempotent: a no-op after finish or abort, the last line of defence otherwise
            with contextlib.suppress(Exception):
                api.set_console_handler(None)
        if failure is not None:
            raise failure
        return result

    def _abort(self) -> None:
        """Setup failed after StartTrace: stop the session and drop the partial file."""
        _, warning = self.session.stop()
        if warning:
            self.warn(warning)
        _unlink(self.partial)

    def finish(self, stopped_by: str) -> RecordResult:
        """Stop, rename OUT.etl.partial to OUT.etl, write the sidecar. Idempotent and thread-safe."""
        with self.finish_lock, defer_sigint():
            if self.result is not None:
                return self.result
            stats, warning = self.session.stop()
            seconds = self.clock() - self.t0
            if warning:
                self.warn(warning)
            out = self.output
            _unlink(sidecar_path(out))  # never leave an older recording's sidecar beside this trace
            trace: Path | None = out
            if self.partial.exists():
                os.replace(self.partial, out)
            else:
                trace = None
                self.warn(f"Windows wrote no trace file ({self.partial} is missing)")
            exit_code, running = self._child_outcome(stopped_by)
            baseline_stop = self.snaps.pool_tags("stop")
            self.snaps.loaded_modules("stop")
            rows, errors = self.snaps.identities(trace)
            sidecar = self._sidecar(stopped_by, seconds, stats, exit_code, rows, errors, baseline_stop)
            sidecar_file: Path | None = sidecar_path(out)
            try:
                write_sidecar(out, sidecar)
            except OSError as exc:
                sidecar_file = None
                self.warn(f"could not write {sidecar_path(out)}: {exc.strerror or exc}")
            if stats and (stats.events_lost or stats.log_buffers_lost or stats.real_time_buffers_lost):
                self.warn(f"{stats.events_lost:,} events and {stats.log_buffers_lost + stats.real_time_buffers_lost:,} "
                          "buffers were lost: filter with --tag, or give more buffers (--buffer-size, --buffers)")
            self.result = RecordResult(
                output=out, sidecar=sidecar_file, plan=self.plan, seconds=seconds, stopped_by=stopped_by, stats=stats,
                file_bytes=self._file_bytes(), command_exit_code=exit_code, command_running_pid=running,
                modules=sum(1 for r in rows if r["pdb_guid"]), module_errors=len(errors),
                kernel_state=self.kernel_state, warnings=self.warnings)
            return self.result

    def _child_outcome(self, stopped_by: str) -> tuple[int | None, int | None]:
        if self.child is None:
            return None, None
        if stopped_by == "ctrl-c":  # the command got the same Ctrl+C; give it a moment to exit
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.child.wait(timeout=2)
        code = self.child.poll()
        return (code, None) if code is not None else (None, self.child.pid)

    def _sidecar(self, stopped_by, seconds, stats, exit_code, rows, errors, baseline_stop) -> dict:
        plan, req, snaps = self.plan, self.request, self.snaps
        return {
            "format": "pooltrace-sidecar",
            "version": 1,
            "trace": self.output.name,
            "created_by": f"pooltrace {__version__}",
            "recording": {
                "windows": ".".join(map(str, plan.version)), "pointer_size": 8,
                "logger": plan.name, "logger_kind": plan.kind, "log_file_mode": plan.log_file_mode,
                "max_file_mb": plan.maximum_file_size_mb, "circular": bool(req.circular),
                "buffer_size_kb": plan.buffer_size_kb,
                "minimum_buffers": plan.minimum_buffers, "maximum_buffers": plan.maximum_buffers,
                "stacks": list(plan.stack_hooks), "tag_filter": [t.text for t in plan.tags],
                "kernel_state": self.kernel_state.as_dict() if self.kernel_state else None,
                "debug_privilege": snaps.debug_privilege,
                "module_bases": "hidden" if snaps.bases_hidden else "real",
                "started_utc": self.started_utc, "stopped_utc": utc_now(), "seconds": round(seconds, 3),
                "stopped_by": stopped_by, "command": list(req.command) or None, "command_exit_code": exit_code,
                "events_lost": stats.events_lost if stats else None,
                "buffers_lost": stats.log_buffers_lost if stats else None,
                "realtime_buffers_lost": stats.real_time_buffers_lost if stats else None,
                "buffers_written": stats.buffers_written if stats else None,
            },
            "modules": rows,
            "module_errors": errors,
            "pool_tags": {"filter": [t.text for t in plan.tags], "start": self.baseline_start, "stop": baseline_stop},
        }


def record(api: WindowsApi, request: RecordRequest, ui: RecorderUi | None = None, **kw) -> RecordResult:
    return Recorder(api, request, ui, **kw).run()
