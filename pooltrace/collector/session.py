"""Recording logic above the Windows boundary: plan a session from the providers/ definitions, check the
machine, start the system logger, turn on pool events, stacks and the tag filter, wait, and always stop.

Everything here talks to Windows only through a :class:`WindowsApi` object: on Windows the real one in
:mod:`pooltrace.collector.winapi`, in tests a recording fake. The call sequences (etw-collector.md §6):

Windows 8+ (private system logger, or ``--kernel-logger``)::

    ControlTraceW(0, name, QUERY)                      is a session of that name running already?
    NtQuerySystemInformation(SystemPoolTagInformation) tag baseline at start
    NtQuerySystemInformation(SystemModuleInformation)  loaded drivers at start
    StartTraceW(name, props)                           EnableFlags PROCESS|THREAD|IMAGE_LOAD, file mode
    NtSetSystemInformation(0x1F, class 10, tags)       pool-tag filter (only with --tag), before POOL is on
    TraceSetInformation(h, 3, CLASSIC_EVENT_ID[])      stacks for PoolAlloc... (fallback: class 6 hook ids)
    TraceSetInformation(h, 4, PERFINFO_GROUPMASK)      POOL on; triggers the rundown (fallback: class 1)
    ControlTraceW(h, name, QUERY) every tick           live statistics
    ControlTraceW(h, name, FLUSH), (h, name, STOP)     always, also on Ctrl+C, errors and console close
    NtQuerySystemInformation(...) x2                   tag baseline and drivers at stop

Windows 7 (NT Kernel Logger): one StartTraceW whose EnableFlags point to an extension block holding the
group mask, the stack hook ids and the tags (items 1, 3, 4), then the same wait and stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Protocol

from pooltrace import __version__
from pooltrace.collector.config import constants
from pooltrace.collector.drivers import image_identities
from pooltrace.collector.structs import (
    LoadedModule,
    SessionStats,
    build_properties,
    classic_event_ids,
    flag_extension,
    group_mask,
    parse_group_mask_information,
    parse_module_information,
    parse_pool_tag_information,
    perf_information,
)
from pooltrace.collector.tagfilter import TagPattern, matches_any, parse_patterns
from pooltrace.errors import PooltraceError
from pooltrace.sidecar import sidecar_path, write_sidecar
from pooltrace.tags import format_tag

PARTIAL_SUFFIX = ".partial"  # the trace is written as OUT.etl.partial and renamed to OUT.etl at the end
MB = 1 << 20


class WindowsApi(Protocol):
    """The Windows boundary. Win32 calls return the Win32 error code (0 = success), native calls the
    NTSTATUS as an unsigned 32-bit value. Buffers passed as ``bytearray`` are in/out."""

    def windows_version(self) -> tuple[int, int, int]: ...
    def pointer_size(self) -> int: ...
    def is_64bit_windows(self) -> bool: ...
    def is_admin(self) -> bool: ...
    def registry_dword(self, key: str, value: str) -> int | None: ...
    def free_bytes(self, directory: str) -> int: ...
    def start_trace(self, name: str, properties: bytearray) -> tuple[int, int]: ...
    def control_trace(self, handle: int, name: str, properties: bytearray, code: int) -> int: ...
    def trace_set_information(self, handle: int, info_class: int, data: bytes) -> int: ...
    def nt_set_system_information(self, info_class: int, data: bytes) -> int: ...
    def nt_query_system_information(self, info_class: int, buffer: bytearray) -> tuple[int, int]: ...
    def system_root(self) -> str: ...
    def dos_devices(self) -> dict[str, str]: ...
    def open_binary(self, path: str) -> BinaryIO: ...
    def set_console_handler(self, handler: Callable[[int], bool] | None) -> None: ...


@dataclass(frozen=True)
class RecordRequest:
    output: Path
    tags: Sequence[str] = ()
    free_stacks: bool = False
    kernel_logger: bool = False
    circular: bool = False
    max_size_mb: int | None = None
    duration_s: float | None = None
    command: Sequence[str] = ()
    buffer_size_kb: int | None = None
    buffers: int | None = None
    force: bool = False
    allow_incomplete_stacks: bool = False


@dataclass(frozen=True)
class SessionPlan:
    """Everything StartTrace and the configuration calls need, derived from providers/."""

    kind: str  # "private" (Windows 8+ private system logger) or "kernel" (NT Kernel Logger)
    configure: str  # "calls" (settings after StartTrace, Windows 8+) or "extension" (in StartTrace, Windows 7)
    version: tuple[int, int, int]
    pointer_size: int
    name: str
    guid: uuid.UUID
    log_file_mode: int
    maximum_file_size_mb: int
    buffer_size_kb: int
    minimum_buffers: int
    maximum_buffers: int
    flush_timer_s: int
    enable_flags: int
    group_masks: tuple[int, ...]
    stack_hooks: tuple[str, ...]
    stack_hook_ids: tuple[int, ...]
    stack_events: tuple[tuple[uuid.UUID, int], ...]
    tags: tuple[TagPattern, ...]

    @property
    def tag_values(self) -> list[int]:
        return [t.value for t in self.tags]

    def extension(self) -> bytes:
        ext = constants()["flag_extension"]
        return flag_extension([(ext["ENABLE_FLAGS"], self.group_masks),
                               (ext["STACKWALK_FILTER"], self.stack_hook_ids),
                               (ext["POOLTAG_FILTER"], self.tag_values)])

    def start_properties(self, log_file: str) -> bytearray:
        c = constants()
        return build_properties(
            pointer_size=self.pointer_size, guid=self.guid, logger_name=self.name, log_file=log_file,
            wnode_flags=c["wnode_flags"]["TRACED_GUID"], client_context=c["logger"]["client_context"],
            buffer_size_kb=self.buffer_size_kb, minimum_buffers=self.minimum_buffers,
            maximum_buffers=self.maximum_buffers, maximum_file_size_mb=self.maximum_file_size_mb,
            log_file_mode=self.log_file_mode, flush_timer_s=self.flush_timer_s, enable_flags=self.enable_flags,
            extension=self.extension() if self.configure == "extension" else b"")


def control_properties(pointer_size: int) -> bytearray:
    """An empty properties buffer for ControlTrace: Windows fills in statistics and both names."""
    return build_properties(pointer_size=pointer_size)


def make_plan(request: RecordRequest, version: tuple[int, int, int], pointer_size: int,
              cpus: int | None = None) -> SessionPlan:
    c = constants()
    logger, mode, buffers = c["logger"], c["logging_mode"], c["buffers"]
    tags = parse_patterns(request.tags)
    if tuple(version[:2]) < tuple(logger["min_version"]):
        raise PooltraceError(c["messages"]["old_windows"])
    private_ok = tuple(version[:2]) >= tuple(logger["private_logger_version"])
    if request.circular and not request.max_size_mb:
        raise PooltraceError("--circular needs --max-size MB (the size the file wraps at)")
    file_mode = mode["FILE_MODE_CIRCULAR"] if request.circular else mode["FILE_MODE_SEQUENTIAL"]
    if private_ok and not request.kernel_logger:
        kind, name, guid = "private", logger["private_name"], c.private_guid
        file_mode |= mode["SYSTEM_LOGGER_MODE"]
    else:
        kind, name, guid = "kernel", logger["kernel_name"], c.kernel_guid
    minimum = max(buffers["minimum_buffers"], buffers["minimum_buffers_per_cpu"] * (cpus or os.cpu_count() or 1))
    maximum = max(request.buffers or buffers["maximum_buffers"], minimum + 20)
    hooks = c.stack_hooks(request.free_stacks)
    hook_ids = tuple(c.kernel.hooks[h] for h in hooks)
    provider = c.kernel.guids[c["events"]["stack_provider"]]
    return SessionPlan(
        kind=kind, configure="calls" if private_ok else "extension", version=tuple(version), pointer_size=pointer_size,
        name=name, guid=guid, log_file_mode=file_mode, maximum_file_size_mb=request.max_size_mb or 0,
        buffer_size_kb=request.buffer_size_kb or buffers["buffer_size_kb"], minimum_buffers=minimum,
        maximum_buffers=maximum, flush_timer_s=buffers["flush_timer_s"], enable_flags=c.enable_flags,
        group_masks=c.group_masks, stack_hooks=hooks, stack_hook_ids=hook_ids,
        stack_events=tuple((provider, h & 0xFF) for h in hook_ids), tags=tags)


# --- messages -----------------------------------------------------------------------------------------
def message(key: str, **kw) -> str:
    return constants()["messages"][key].format(**kw)


def _win32(name: str) -> int:
    return constants()["win32_errors"][name]


def _nt(name: str) -> int:
    return constants()["ntstatus"][name]


def start_error(status: int, plan: SessionPlan, output: Path) -> str:
    c = constants()
    code = c.win32_name(status)
    win8 = plan.configure == "calls"
    if status == _win32("ERROR_ACCESS_DENIED"):
        return message("admin")
    if status == _win32("ERROR_ALREADY_EXISTS"):
        return running_message(plan.kind, win8)
    if status == _win32("ERROR_NO_SYSTEM_RESOURCES"):
        return message("no_slot", alternative=message("no_slot_alternative") if plan.kind == "private" else "")
    if status == _win32("ERROR_INVALID_PARAMETER"):
        return message("bad_settings", code=code)
    if status == _win32("ERROR_BAD_LENGTH"):
        return message("internal", code=code)
    if status in (_win32("ERROR_PATH_NOT_FOUND"), _win32("ERROR_FILE_NOT_FOUND"), _win32("ERROR_BAD_PATHNAME")):
        return message("cannot_create", output=output, code=code)
    if status == _win32("ERROR_DISK_FULL"):
        return message("disk_full", output=output, code=code)
    return message("generic", operation="starting the trace session (StartTrace)", code=code)


def running_message(kind: str, win8: bool) -> str:
    if kind == "private":
        return message("running_private")
    return message("running_kernel", alternative=message("running_kernel_alternative") if win8 else "")


# --- live status ------------------------------------------------------------------------------------------
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


# --- the session --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _defer_sigint():
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


class _Session:
    """A started session; stop() is idempotent and thread-safe (the console handler may call it)."""

    def __init__(self, api: WindowsApi, plan: SessionPlan, handle: int):
        self.api, self.plan, self.handle = api, plan, handle
        self.lock = threading.Lock()
        self.result: tuple[SessionStats | None, str | None] | None = None

    def query(self) -> tuple[int, SessionStats | None]:
        props = control_properties(self.plan.pointer_size)
        status = self.api.control_trace(self.handle, self.plan.name, props, constants()["control"]["QUERY"])
        return status, SessionStats.parse(props, self.plan.pointer_size) if status == 0 else None

    def stop(self) -> tuple[SessionStats | None, str | None]:
        with self.lock:
            if self.result is not None:
                return self.result
            control = constants()["control"]
            with _defer_sigint():
                self.api.control_trace(self.handle, self.plan.name, control_properties(self.plan.pointer_size),
                                       control["FLUSH"])
                props = control_properties(self.plan.pointer_size)
                status = self.api.control_trace(self.handle, self.plan.name, props, control["STOP"])
            if status == 0:
                self.result = (SessionStats.parse(props, self.plan.pointer_size), None)
            elif status == _win32("ERROR_WMI_INSTANCE_NOT_FOUND"):
                self.result = (None, f"the {self.plan.name} session had already been stopped (by `pooltrace stop`?)")
            else:
                flag = " --kernel-logger" if self.plan.kind == "kernel" else ""
                self.result = (None, f"stopping the {self.plan.name} session failed: {constants().win32_name(status)}; "
                                     f"end it with `pooltrace stop{flag}`")
            return self.result


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
    warnings: list[str] = field(default_factory=list)


def _utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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
        self.session: _Session | None = None
        self.child: subprocess.Popen | None = None
        self.recording = False
        self.stop_requested = threading.Event()
        self.stop_reason = "ctrl-c"
        self.finish_lock = threading.Lock()
        self.result: RecordResult | None = None
        # absolute: the file is created by the kernel's logger, not relative to our working directory
        self.output = Path(os.path.abspath(request.output))
        self.partial = self.output.with_name(self.output.name + PARTIAL_SUFFIX)

    # -- helpers
    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.ui.warning(text)

    def _query(self, info_class: int, initial: int = 64 * 1024, limit: int = 64 * MB) -> tuple[int, bytearray]:
        mismatch = (_nt("STATUS_INFO_LENGTH_MISMATCH"), _nt("STATUS_BUFFER_TOO_SMALL"))
        buf = bytearray(initial)
        while True:
            status, needed = self.api.nt_query_system_information(info_class, buf)
            if status not in mismatch or len(buf) >= limit:
                return status, buf
            buf = bytearray(min(limit, max(needed + 4096, 2 * len(buf))))

    def pool_tags(self, plan: SessionPlan, when: str) -> dict | None:
        c = constants()
        status, buf = self._query(c["system_info_class"]["SystemPoolTagInformation"])
        try:
            if status:
                raise ValueError(c.ntstatus_name(status))
            entries = parse_pool_tag_information(buf, plan.pointer_size)
        except ValueError as exc:
            self.warn(f"could not read the kernel's pool tag counters at {when} ({exc}): reports will not know "
                      "how much was outstanding before the trace")
            return None
        rows = [{"tag": format_tag(e.tag), "value": e.tag, "paged_allocs": e.paged_allocs,
                 "paged_frees": e.paged_frees, "paged_bytes": e.paged_used, "nonpaged_allocs": e.nonpaged_allocs,
                 "nonpaged_frees": e.nonpaged_frees, "nonpaged_bytes": e.nonpaged_used}
                for e in entries if matches_any(e.tag, plan.tags)]
        return {"utc": _utc(), "entries": sorted(rows, key=lambda r: r["tag"])}

    def loaded_modules(self, plan: SessionPlan, when: str) -> list[LoadedModule]:
        c = constants()
        status, buf = self._query(c["system_info_class"]["SystemModuleInformation"])
        try:
            if status:
                raise ValueError(c.ntstatus_name(status))
            return parse_module_information(buf, plan.pointer_size)
        except ValueError as exc:
            self.warn(f"could not list the loaded drivers at {when} ({exc}): their PDB identities will be missing")
            return []

    # -- checks
    def preflight(self, plan: SessionPlan) -> None:
        c, api, req = constants(), self.api, self.request
        wide = api.is_64bit_windows()
        if wide and plan.pointer_size == 4:
            raise PooltraceError(message("wow64"))
        if not api.is_admin():
            raise PooltraceError(message("admin"))
        if wide and not req.allow_incomplete_stacks:
            reg = c["registry"]
            if api.registry_dword(reg["memory_management_key"], reg["paging_executive_value"]) != 1:
                raise PooltraceError(message("paging_executive"))
        out = self.output
        if out.exists() and not req.force:
            raise PooltraceError(f"{out} exists: choose another name or pass --force")
        if not out.parent.is_dir():
            raise PooltraceError(f"directory {out.parent} does not exist")
        disk = c["disk"]
        need_mb = req.max_size_mb + disk["circular_margin_mb"] if req.max_size_mb else disk["min_free_mb"]
        free = api.free_bytes(str(out.parent))
        if free < need_mb * MB:
            raise PooltraceError(f"only {free // MB:,} MB free in {out.parent}; recording needs at least "
                                 f"{need_mb:,} MB: free some space, write elsewhere with -o, "
                                 "or use --circular --max-size MB")
        props = control_properties(plan.pointer_size)
        status = api.control_trace(0, plan.name, props, c["control"]["QUERY"])
        if status == 0:
            raise PooltraceError(running_message(plan.kind, plan.configure == "calls"))
        if status == _win32("ERROR_ACCESS_DENIED"):
            raise PooltraceError(message("admin"))

    # -- configuration after StartTrace (Windows 8+)
    def configure(self, plan: SessionPlan, handle: int) -> None:
        if plan.configure != "calls":
            return  # Windows 7: everything went into StartTrace's extension block
        c, api = constants(), self.api
        spti = c["system_info_class"]["SystemPerformanceTraceInformation"]
        perf, tic = c["event_trace_info_class"], c["trace_info_class"]
        denied = _win32("ERROR_ACCESS_DENIED")
        if plan.tags:  # before POOL is on: no burst of unfiltered events (§6)
            status = api.nt_set_system_information(spti, perf_information(perf["PoolTagFilter"], handle,
                                                                          plan.tag_values))
            if status:
                raise PooltraceError(message("tag_filter", code=c.ntstatus_name(status)))
        # Stacks. sechost may silently ignore a GUID it does not know (§3.2 caveat, unverified for PoolGuid);
        # on an error code fall back to the native call with hook ids.
        status = api.trace_set_information(handle, tic["TraceStackTracingInfo"], classic_event_ids(plan.stack_events))
        if status == denied:
            raise PooltraceError(message("admin"))
        if status:
            native = api.nt_set_system_information(spti, perf_information(perf["StackTracing"], handle,
                                                                          plan.stack_hook_ids))
            if native:
                raise PooltraceError(message("stacks", code=c.win32_name(status), native=c.ntstatus_name(native)))
        # Group mask last: it starts the pool events and the process/thread/image rundown.
        status = api.trace_set_information(handle, tic["TraceSystemTraceEnableFlagsInfo"], group_mask(plan.group_masks))
        if status == denied:
            raise PooltraceError(message("admin"))
        if status:
            native = self._native_group_mask(plan, handle)
            if native:
                raise PooltraceError(message("group_mask", code=c.win32_name(status), native=c.ntstatus_name(native)))

    def _native_group_mask(self, plan: SessionPlan, handle: int) -> int:
        """Query the logger's masks, OR ours in, set them (EVENT_TRACE_GROUPMASK_INFORMATION, 48 bytes)."""
        c = constants()
        spti = c["system_info_class"]["SystemPerformanceTraceInformation"]
        cls = c["event_trace_info_class"]["GroupMask"]
        buf = bytearray(perf_information(cls, handle, [0] * 8))
        status, _ = self.api.nt_query_system_information(spti, buf)
        current = parse_group_mask_information(buf) if status == 0 else (0,) * 8
        masks = [a | b for a, b in zip(current, plan.group_masks, strict=True)]
        return self.api.nt_set_system_information(spti, perf_information(cls, handle, masks))

    # -- running
    def console_event(self, event: int) -> bool:
        """SetConsoleCtrlHandler callback (runs on its own thread). Ctrl+C is left to Python
        (KeyboardInterrupt); Ctrl+Break stops the recording; closing the console, logoff and shutdown
        finish everything here, because Windows ends the process when the handler returns."""
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
        gone = _win32("ERROR_WMI_INSTANCE_NOT_FOUND")
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
        plan = make_plan(req, api.windows_version(), api.pointer_size())
        self.plan = plan
        self.preflight(plan)
        _unlink(self.partial)
        self.started_utc = _utc()
        self.baseline_start = self.pool_tags(plan, "start")
        self.modules_start = self.loaded_modules(plan, "start")
        with _defer_sigint() as held:  # a started session always gets an owner that will stop it
            status, handle = api.start_trace(plan.name, plan.start_properties(str(self.partial)))
            if not status:
                self.session = _Session(api, plan, handle)
        if status:
            _unlink(self.partial)
            raise PooltraceError(start_error(status, plan, self.output))
        failure: BaseException | None = None
        try:
            try:
                if held:
                    raise KeyboardInterrupt
                api.set_console_handler(self.console_event)
                self.configure(plan, handle)
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
        with self.finish_lock, _defer_sigint():
            if self.result is not None:
                return self.result
            stats, warning = self.session.stop()
            seconds = self.clock() - self.t0
            if warning:
                self.warn(warning)
            out = self.output
            _unlink(sidecar_path(out))  # never leave an older recording's sidecar beside this trace
            if self.partial.exists():
                os.replace(self.partial, out)
            else:
                self.warn(f"Windows wrote no trace file ({self.partial} is missing)")
            exit_code, running = self._child_outcome(stopped_by)
            plan = self.plan
            baseline_stop = self.pool_tags(plan, "stop")
            modules = self.modules_start + self.loaded_modules(plan, "stop")
            rows, errors = image_identities(modules, self.api.system_root(), self.api.dos_devices(),
                                            self.api.open_binary)
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
                output=out, sidecar=sidecar_file, plan=plan, seconds=seconds, stopped_by=stopped_by, stats=stats,
                file_bytes=self._file_bytes(), command_exit_code=exit_code, command_running_pid=running,
                modules=sum(1 for r in rows if r["pdb_guid"]), module_errors=len(errors), warnings=self.warnings)
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
        plan, req = self.plan, self.request
        return {
            "format": "pooltrace-sidecar",
            "version": 1,
            "trace": self.output.name,
            "created_by": f"pooltrace {__version__}",
            "recording": {
                "windows": ".".join(map(str, plan.version)), "pointer_size": plan.pointer_size,
                "logger": plan.name, "logger_kind": plan.kind, "log_file_mode": plan.log_file_mode,
                "max_file_mb": plan.maximum_file_size_mb or None, "buffer_size_kb": plan.buffer_size_kb,
                "minimum_buffers": plan.minimum_buffers, "maximum_buffers": plan.maximum_buffers,
                "stacks": list(plan.stack_hooks), "tag_filter": [t.text for t in plan.tags],
                "started_utc": self.started_utc, "stopped_utc": _utc(), "seconds": round(seconds, 3),
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


# --- pooltrace stop --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StopResult:
    name: str
    stats: SessionStats
    trace: str | None  # the file the session wrote
    renamed_to: str | None  # OUT.etl when the session wrote OUT.etl.partial and it was renamed


def stop_session(api: WindowsApi, kernel_logger: bool = False) -> StopResult:
    """End a session left behind by a crashed recorder (or, with kernel_logger, the NT Kernel Logger)."""
    c = constants()
    ptr = api.pointer_size()
    name = c["logger"]["kernel_name"] if kernel_logger else c["logger"]["private_name"]
    props = control_properties(ptr)
    status = api.control_trace(0, name, props, c["control"]["STOP"])
    if status == _win32("ERROR_WMI_INSTANCE_NOT_FOUND"):
        raise PooltraceError(message("not_found", name=name))
    if status == _win32("ERROR_ACCESS_DENIED"):
        raise PooltraceError(message("admin"))
    if status:
        raise PooltraceError(message("generic", operation=f"stopping {name} (ControlTrace)",
                                     code=c.win32_name(status)))
    stats = SessionStats.parse(props, ptr)
    trace = stats.log_file or None
    if trace and trace.startswith("\\??\\"):
        trace = trace[4:]
    renamed = None
    if trace and trace.endswith(PARTIAL_SUFFIX):
        final = trace[:-len(PARTIAL_SUFFIX)]
        if os.path.exists(trace) and not os.path.exists(final):
            try:
                os.replace(trace, final)
                renamed = final
            except OSError:
                renamed = None
    return StopResult(name, stats, trace, renamed)
