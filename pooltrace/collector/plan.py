"""Plan a recording: check the platform, validate the request and derive every StartTrace setting from the
providers/ definitions (etw-collector.md §1, §2, §3.2). No Windows call is made here except the platform
facts read through the boundary."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pooltrace.collector.boundary import WindowsApi
from pooltrace.collector.config import constants
from pooltrace.collector.messages import message
from pooltrace.collector.structs import build_properties
from pooltrace.collector.tagfilter import TagPattern, parse_patterns
from pooltrace.errors import PooltraceError

PARTIAL_SUFFIX = ".partial"  # the trace is written as OUT.etl.partial and renamed to OUT.etl at the end
MB = 1 << 20


@dataclass(frozen=True)
class RecordRequest:
    output: Path
    tags: Sequence[str] = ()
    free_stacks: bool = False
    kernel_logger: bool = False
    circular: bool = False
    max_size_mb: int | None = None  # None: the default cap (session.toml [disk] default_max_size_mb)
    duration_s: float | None = None
    command: Sequence[str] = ()
    buffer_size_kb: int | None = None
    buffers: int | None = None
    force: bool = False  # overwrite OUT.etl, and stop a leftover pooltrace session first
    session_name: str | None = None  # another private session name (pooltrace doctor)
    session_guid: uuid.UUID | None = None


@dataclass(frozen=True)
class SessionPlan:
    """Everything StartTrace and the configuration calls need, derived from providers/."""

    kind: str  # "private" (a private system logger) or "kernel" (NT Kernel Logger)
    version: tuple[int, int, int]
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

    def start_properties(self, log_file: str) -> bytearray:
        c = constants()
        return build_properties(
            guid=self.guid, logger_name=self.name, log_file=log_file,
            wnode_flags=c["wnode_flags"]["TRACED_GUID"], client_context=c["logger"]["client_context"],
            buffer_size_kb=self.buffer_size_kb, minimum_buffers=self.minimum_buffers,
            maximum_buffers=self.maximum_buffers, maximum_file_size_mb=self.maximum_file_size_mb,
            log_file_mode=self.log_file_mode, flush_timer_s=self.flush_timer_s, enable_flags=self.enable_flags)

    def control_properties(self) -> bytearray:
        return control_properties(self.guid)


def control_properties(guid: uuid.UUID | None = None) -> bytearray:
    """A properties buffer for ControlTrace: Wnode.Guid names the session (as the SDK asks for STOP and
    QUERY); Windows fills in the statistics and both names."""
    return build_properties(guid=guid)


def check_platform(api: WindowsApi) -> tuple[int, int, int]:
    """Windows 8.1 or later, x64, 64-bit Python; the Windows version otherwise a one-line error."""
    logger = constants()["logger"]
    version = tuple(api.windows_version())
    if version[:2] < tuple(logger["min_version"]):
        raise PooltraceError(message("old_windows", version=".".join(map(str, version))))
    if not api.is_64bit_windows():
        raise PooltraceError(message("not_x64", what="32-bit Windows"))
    if api.pointer_size() != logger["pointer_size"]:
        raise PooltraceError(message("not_x64", what="32-bit Python"))
    return version


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + PARTIAL_SUFFIX)


def make_plan(request: RecordRequest, version: tuple[int, int, int], cpus: int | None = None) -> SessionPlan:
    c = constants()
    logger, mode, buffers, disk = c["logger"], c["logging_mode"], c["buffers"], c["disk"]
    tags = parse_patterns(request.tags)
    if request.circular and not request.max_size_mb:
        raise PooltraceError("--circular needs --max-size MB (the size the file wraps at)")
    if request.output is not None:
        partial = str(partial_path(Path(os.path.abspath(request.output))))
        if len(partial) > logger["max_log_file_chars"]:
            raise PooltraceError(message("path_too_long", output=request.output, n=len(partial),
                                         limit=logger["max_log_file_chars"]))
    file_mode = mode["FILE_MODE_CIRCULAR"] if request.circular else mode["FILE_MODE_SEQUENTIAL"]
    if request.kernel_logger:
        kind, name, guid = "kernel", logger["kernel_name"], c.kernel_guid
    else:
        kind = "private"
        name = request.session_name or logger["private_name"]
        guid = request.session_guid or c.private_guid
        file_mode |= mode["SYSTEM_LOGGER_MODE"]
    minimum = max(buffers["minimum_buffers"], buffers["minimum_buffers_per_cpu"] * (cpus or os.cpu_count() or 1))
    maximum = max(request.buffers or buffers["maximum_buffers"], minimum + 20)
    hooks = c.stack_hooks(request.free_stacks)
    hook_ids = tuple(c.kernel.hooks[h] for h in hooks)
    provider = c.kernel.guids[c["events"]["stack_provider"]]
    return SessionPlan(
        kind=kind, version=tuple(version), name=name, guid=guid, log_file_mode=file_mode,
        maximum_file_size_mb=request.max_size_mb or disk["default_max_size_mb"],
        buffer_size_kb=request.buffer_size_kb or buffers["buffer_size_kb"], minimum_buffers=minimum,
        maximum_buffers=maximum, flush_timer_s=buffers["flush_timer_s"], enable_flags=c.enable_flags,
        group_masks=c.group_masks, stack_hooks=hooks, stack_hook_ids=hook_ids,
        stack_events=tuple((provider, h & 0xFF) for h in hook_ids), tags=tags)
