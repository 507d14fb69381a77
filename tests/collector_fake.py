"""A recording fake of the Windows boundary (pooltrace.collector.winapi.WinApi) for the collector tests.

It records every call with the exact bytes passed, answers like Windows does (real Win32 error codes and
NTSTATUS values, statistics written back at the documented EVENT_TRACE_PROPERTIES offsets), creates the
log file named inside the properties buffer, and can be told to fail or raise at any call.
Offsets and codes are written out here independently of pooltrace's own tables, so the tests compare two
sources rather than one with itself.
"""

from __future__ import annotations

import io
import struct
import threading
import uuid
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from pooltrace.etl.writer import TraceWriter


@cache
def empty_trace() -> bytes:
    """A valid .etl with a header and nothing else (what a session that saw no event writes)."""
    return TraceWriter().to_bytes()

# winerror.h
ERROR_SUCCESS = 0
ERROR_FILE_NOT_FOUND = 2
ERROR_PATH_NOT_FOUND = 3
ERROR_ACCESS_DENIED = 5
ERROR_BAD_LENGTH = 24
ERROR_NOT_SUPPORTED = 50
ERROR_INVALID_PARAMETER = 87
ERROR_ALREADY_EXISTS = 183
ERROR_MORE_DATA = 234
ERROR_NOT_ALL_ASSIGNED = 1300
ERROR_NO_SYSTEM_RESOURCES = 1450
ERROR_INCORRECT_SIZE = 1462
ERROR_WMI_INSTANCE_NOT_FOUND = 4201
# ntstatus.h
STATUS_SUCCESS = 0
STATUS_INFO_LENGTH_MISMATCH = 0xC0000004
STATUS_INVALID_PARAMETER = 0xC000000D
STATUS_ACCESS_DENIED = 0xC0000022
STATUS_BUFFER_TOO_SMALL = 0xC0000023
STATUS_NOT_SUPPORTED = 0xC00000BB
STATUS_WMI_INSTANCE_NOT_FOUND = 0xC0000296

# ControlTrace codes
QUERY, STOP, UPDATE, FLUSH = 0, 1, 2, 3
KERNEL_LOGGER = "NT Kernel Logger"
SYSTEM_LOGGER_MODE = 0x02000000
SPTI, POOLTAG_INFO, MODULE_INFO = 0x1F, 22, 11
POOL_GUID = uuid.UUID("0268a8b6-74fd-4302-9dd0-6e8f1795c0cf")
MATCH_ALL = 0x2A  # the tag slot after StartTrace: '*' (EtwpCheckForPoolTagFilterExtension)
# EVENT_TRACE_PROPERTIES x64 (etw-collector.md §1.2)
OFF = {"EventsLost": 0x58, "BuffersWritten": 0x5C, "LogBuffersLost": 0x60, "RealTimeBuffersLost": 0x64,
       "LogFileMode": 0x40, "EnableFlags": 0x48, "Guid": 0x18}
LOG_FILE_NAME_OFFSET, LOGGER_NAME_OFFSET = 0x70, 0x74


@dataclass
class Call:
    name: str
    args: dict

    def __getitem__(self, key):
        return self.args[key]


@dataclass
class PoolTag:
    tag: bytes
    paged_allocs: int = 0
    paged_frees: int = 0
    paged_used: int = 0
    nonpaged_allocs: int = 0
    nonpaged_frees: int = 0
    nonpaged_used: int = 0


@dataclass
class Session:
    """A logger as the kernel keeps it: its group masks, stack-walk hook ids and pool-tag filter slot."""

    name: str
    handle: int
    log_file: str
    mode: int
    props: bytes
    masks: list[int] = field(default_factory=lambda: [0] * 8)
    hooks: set[int] = field(default_factory=set)
    tags: list[int] = field(default_factory=lambda: [MATCH_ALL])

    @property
    def system_logger(self) -> bool:
        return bool(self.mode & SYSTEM_LOGGER_MODE) or self.name == KERNEL_LOGGER


@dataclass
class FakeWindows:
    version: tuple[int, int, int] = (10, 0, 22631)
    ptr: int = 8
    wide: bool = True
    admin: bool = True
    free: int = 1 << 40
    pool_tags: list[PoolTag] = field(default_factory=list)
    modules: list[tuple[int, int, str]] = field(default_factory=list)  # (base, size, NT path)
    files: dict[str, Path] = field(default_factory=dict)  # Windows path (lowercase) -> local file
    trace_bytes: bytes = field(default_factory=lambda: empty_trace())  # what the "kernel" writes to the log file
    windows_dir: str = "C:\\Windows"
    devices: dict[str, str] = field(default_factory=lambda: {"C:": "\\Device\\HarddiskVolume3"})
    events_lost: int = 0
    buffers_written: int = 7
    log_buffers_lost: int = 0
    acp: int = 1252  # GetACP: the ANSI code page FullPathName is in
    # Windows 11 24H2: SystemModuleInformation shows ImageBase 0 unless SeDebugPrivilege is enabled
    hide_bases_without_debug: bool = False
    debug_privilege_held: bool = True
    # the silent failures: the call succeeds, the kernel state does not change
    ignore_stack_guids: bool = False  # TraceSetInformation(TraceStackTracingInfo) drops the PoolGuid entries
    ignore_native_stacks: bool = False  # ... and so does the class-6 native call
    ignore_tag_filter: bool = False  # class 10 succeeds, the slot stays '*'
    ignore_pool_bit: bool = False  # the group mask is set without PERF_POOL

    def __post_init__(self):
        self.calls: list[Call] = []
        self.sessions: dict[str, Session] = {}
        self.fail: dict[tuple, object] = {}  # (name, discriminator) -> code, or exception to raise
        self.on_call = None  # callable(Call) run after recording each call
        self.console_handler = None
        self.lock = threading.Lock()
        self.next_handle = 0x23
        self.debug_enabled = False

    # -- helpers
    def _record(self, function: str, /, **args) -> Call:
        call = Call(function, args)
        with self.lock:
            self.calls.append(call)
        if self.on_call:
            self.on_call(call)
        return call

    def _override(self, *keys):
        for key in keys:
            if key in self.fail:
                value = self.fail[key]
                if isinstance(value, BaseException) or (isinstance(value, type) and issubclass(value, BaseException)):
                    raise value
                return value
        return None

    def names(self) -> list[str]:
        """The call sequence as 'Function' or 'Function:discriminator'."""
        out = []
        for c in self.calls:
            if c.name == "ControlTraceW":
                out.append(f"ControlTraceW:{['QUERY', 'STOP', 'UPDATE', 'FLUSH'][c['code']]}")
            elif c.name in ("TraceSetInformation",):
                out.append(f"TraceSetInformation:{c['info_class']}")
            elif c.name in ("NtSetSystemInformation", "NtQuerySystemInformation"):
                sub = f".{struct.unpack_from('<I', c['data'])[0]}" if c["info_class"] == SPTI else ""
                out.append(f"{c.name}:{c['info_class']}{sub}")
            else:
                out.append(c.name)
        return out

    def running(self, name: str, handle: int = 0x99, log_file: str = "C:\\other.etl", mode: int = 0) -> Session:
        self.sessions[name] = session = Session(name, handle, log_file, mode, b"")
        return session

    def session_by_handle(self, handle: int) -> Session | None:
        return next((s for s in self.sessions.values() if s.handle == handle), None)

    def _write_stats(self, props: bytearray, session: Session | None) -> None:
        struct.pack_into("<I", props, OFF["EventsLost"], self.events_lost)
        struct.pack_into("<I", props, OFF["BuffersWritten"], self.buffers_written)
        struct.pack_into("<I", props, OFF["LogBuffersLost"], self.log_buffers_lost)
        struct.pack_into("<I", props, OFF["RealTimeBuffersLost"], 0)
        if session is not None:
            struct.pack_into("<I", props, OFF["LogFileMode"], session.mode)
            for at, text in ((LOG_FILE_NAME_OFFSET, session.log_file), (LOGGER_NAME_OFFSET, session.name)):
                off = struct.unpack_from("<I", props, at)[0]
                raw = text.encode("utf-16-le") + b"\0\0"
                if off and off + len(raw) <= len(props):
                    props[off:off + len(raw)] = raw

    # -- machine facts
    def windows_version(self):
        self._record("GetVersion")
        return self.version

    def pointer_size(self):
        return self.ptr

    def is_64bit_windows(self):
        return self.wide

    def is_admin(self):
        self._record("IsUserAnAdmin")
        return self.admin

    def free_bytes(self, directory):
        self._record("GetDiskFreeSpaceEx", directory=directory)
        return self.free

    def ansi_code_page(self):
        return self.acp

    def enable_privilege(self, name):
        self._record("AdjustTokenPrivileges", name=name)
        over = self._override(("AdjustTokenPrivileges",))
        if over is not None:
            return over
        if not self.debug_privilege_held:
            return ERROR_NOT_ALL_ASSIGNED  # AdjustTokenPrivileges "succeeds" and GetLastError says this
        self.debug_enabled = True
        return ERROR_SUCCESS

    def system_root(self):
        return self.windows_dir

    def dos_devices(self):
        return dict(self.devices)

    def open_binary(self, path):
        local = self.files.get(path.lower())
        if local is None:
            raise FileNotFoundError(2, "The system cannot find the file specified", path)
        return io.BytesIO(local.read_bytes())

    # -- ETW
    def start_trace(self, name, properties):
        call = self._record("StartTraceW", name=name, props=bytes(properties))
        code = self._override(("StartTraceW",))
        if code:
            return code, 0
        if len(properties) < 0x78 or struct.unpack_from("<I", properties, 0)[0] != len(properties):
            return ERROR_BAD_LENGTH, 0
        if name in self.sessions:
            return ERROR_ALREADY_EXISTS, 0
        file_off = struct.unpack_from("<I", properties, LOG_FILE_NAME_OFFSET)[0]
        end = file_off
        while properties[end:end + 2] != b"\0\0":
            end += 2
        log_file = bytes(properties[file_off:end]).decode("utf-16-le")
        mode = struct.unpack_from("<I", properties, OFF["LogFileMode"])[0]
        if name == KERNEL_LOGGER:
            handle = 0xFFFF
        else:
            handle, self.next_handle = self.next_handle, self.next_handle + 1
        Path(log_file).write_bytes(self.trace_bytes)
        session = Session(name, handle, log_file, mode, bytes(properties))
        session.masks[0] = struct.unpack_from("<I", properties, OFF["EnableFlags"])[0]
        self.sessions[name] = session
        call.args["handle"] = handle
        return ERROR_SUCCESS, handle

    def control_trace(self, handle, name, properties, code):
        self._record("ControlTraceW", handle=handle, name=name, code=code, props=bytes(properties),
                     guid=uuid.UUID(bytes_le=bytes(properties[OFF["Guid"]:OFF["Guid"] + 16])))
        over = self._override(("ControlTraceW", code), ("ControlTraceW", None))
        if over is not None:
            return over
        session = self.sessions.get(name)
        if session is None or (handle and handle != session.handle):
            return ERROR_WMI_INSTANCE_NOT_FOUND
        self._write_stats(properties, session)
        if code == STOP:
            del self.sessions[name]
        return ERROR_SUCCESS

    def query_all_traces(self, buffers):
        self._record("QueryAllTracesW", count=len(buffers))
        over = self._override(("QueryAllTracesW",))
        if over is not None:
            return over, 0
        sessions = list(self.sessions.values())
        for buf, session in zip(buffers, sessions, strict=False):
            self._write_stats(buf, session)
        return (ERROR_MORE_DATA if len(sessions) > len(buffers) else ERROR_SUCCESS), len(sessions)

    def trace_set_information(self, handle, info_class, data):
        self._record("TraceSetInformation", handle=handle, info_class=info_class, data=bytes(data))
        over = self._override(("TraceSetInformation", info_class))
        if over is not None:
            return over
        session = self.session_by_handle(handle)
        if session is None:
            return ERROR_INVALID_PARAMETER
        if info_class == 3:
            if len(data) % 24:
                return ERROR_INCORRECT_SIZE
            if not self.ignore_stack_guids:
                for i in range(0, len(data), 24):
                    if uuid.UUID(bytes_le=bytes(data[i:i + 16])) == POOL_GUID:
                        session.hooks.add(0x0E00 | data[i + 16])
            return ERROR_SUCCESS
        if info_class == 4:
            if len(data) % 4 or len(data) > 32 or not session.system_logger:
                return ERROR_INVALID_PARAMETER
            self._or_masks(session, struct.unpack(f"<{len(data) // 4}I", data))
            return ERROR_SUCCESS
        return ERROR_INVALID_PARAMETER

    def _or_masks(self, session: Session, masks) -> None:
        for i, m in enumerate(masks):
            if i == 1 and self.ignore_pool_bit:
                m &= ~0x40
            session.masks[i] |= m

    def nt_set_system_information(self, info_class, data):
        sub = struct.unpack_from("<I", data)[0] if info_class == SPTI and len(data) >= 4 else None
        self._record("NtSetSystemInformation", info_class=info_class, data=bytes(data))
        over = self._override(("NtSetSystemInformation", sub))
        if over is not None:
            return over
        if info_class != SPTI or len(data) < 4:
            return STATUS_INVALID_PARAMETER
        if sub == 1 and len(data) != 48:
            return STATUS_INFO_LENGTH_MISMATCH
        if sub in (6, 10):
            if len(data) < 16:
                return STATUS_INFO_LENGTH_MISMATCH
            if (len(data) - 16) % 4:
                return STATUS_INVALID_PARAMETER
        if sub not in (1, 6, 10):
            return STATUS_INVALID_PARAMETER
        session = self.session_by_handle(struct.unpack_from("<Q", data, 8)[0])
        if session is None:
            return STATUS_WMI_INSTANCE_NOT_FOUND
        values = struct.unpack_from(f"<{(len(data) - 16) // 4}I", data, 16)
        if sub == 1:
            if not session.system_logger:
                return STATUS_INVALID_PARAMETER
            self._or_masks(session, values)
        elif sub == 6:
            if not self.ignore_native_stacks:
                session.hooks = set(values)
        else:
            if len(values) > 4 or not session.system_logger:
                return STATUS_INVALID_PARAMETER
            if not self.ignore_tag_filter:
                match_all = not values or any(v & 0xFF == MATCH_ALL or v == 0x3F3F3F3F for v in values)
                session.tags = [MATCH_ALL] if match_all else list(values)
        return STATUS_SUCCESS

    def nt_query_system_information(self, info_class, buffer):
        sub = struct.unpack_from("<I", buffer)[0] if info_class == SPTI and len(buffer) >= 4 else None
        self._record("NtQuerySystemInformation", info_class=info_class, data=bytes(buffer[:16]), size=len(buffer))
        over = self._override(("NtQuerySystemInformation", info_class, sub), ("NtQuerySystemInformation", info_class))
        if over is not None:
            return over, 0
        if info_class == POOLTAG_INFO:
            out = self.pool_tag_bytes()
        elif info_class == MODULE_INFO:
            out = self.module_bytes()
        elif info_class == SPTI and sub in (1, 6, 10):
            # EtwQueryPerformanceTraceInformation (decompiled 11-24H2): class 1 exactly 48 bytes; classes 6
            # and 10 at least 16, then 16 + 4n returned and STATUS_BUFFER_TOO_SMALL when n does not fit
            if (sub == 1 and len(buffer) != 48) or len(buffer) < 16:
                return STATUS_INFO_LENGTH_MISMATCH, 48 if sub == 1 else 16
            session = self.session_by_handle(struct.unpack_from("<Q", buffer, 8)[0])
            if session is None:
                return STATUS_WMI_INSTANCE_NOT_FOUND, 0
            if sub in (1, 10) and not session.system_logger:
                return STATUS_INVALID_PARAMETER, 0
            values = session.masks if sub == 1 else sorted(session.hooks) if sub == 6 else session.tags
            out = bytes(buffer[:16]) + struct.pack(f"<{len(values)}I", *values)
            if len(out) > len(buffer):
                return STATUS_BUFFER_TOO_SMALL, len(out)
        else:
            return STATUS_INVALID_PARAMETER, 0
        if len(out) > len(buffer):
            return STATUS_INFO_LENGTH_MISMATCH, len(out)
        buffer[:len(out)] = out
        return STATUS_SUCCESS, len(out)

    def pool_tag_bytes(self) -> bytes:
        # {ULONG Count; pad; SYSTEM_POOLTAG[40 bytes]}
        head, fmt = struct.pack("<I4x", len(self.pool_tags)), "<4sIIxxxxQIIQ"
        return head + b"".join(struct.pack(fmt, t.tag, t.paged_allocs, t.paged_frees, t.paged_used,
                                           t.nonpaged_allocs, t.nonpaged_frees, t.nonpaged_used)
                               for t in self.pool_tags)

    def module_bytes(self) -> bytes:
        # RTL_PROCESS_MODULES, 296-byte entries from offset 8; FullPathName in the ANSI code page
        head, fmt = struct.pack("<I4x", len(self.modules)), "<QQQIIHHHH256s"
        hidden = self.hide_bases_without_debug and not self.debug_enabled
        body = b""
        for i, (base, size, path) in enumerate(self.modules):
            raw = path.encode(f"cp{self.acp}")
            body += struct.pack(fmt, 0, 0, 0 if hidden else base, size, 0x8804000, i, i, 1, raw.rfind(b"\\") + 1,
                                raw)
        return head + body

    # -- console
    def set_console_handler(self, handler):
        self._record("SetConsoleCtrlHandler", installed=handler is not None)
        self.console_handler = handler


GUID = uuid.UUID("6c5a0b8e-9f1d-4e1b-a7c2-3d4e5f607182")


def make_pe(*, plus: bool = True, codeview: bytes | None = None, use_pointer: bool = True, debug: bool = True,
            stamp: int = 0x5F3E1A2B, image_size: int = 0x3000, checksum: int = 0x1234, n_dirs: int = 16) -> bytes:
    """A minimal PE: headers, one section .rdata at RVA 0x1000 / file 0x400 holding the debug directory
    (a Repro entry, then CodeView) and the CodeView record at RVA 0x1100 / file 0x500."""
    if codeview is None:
        codeview = b"RSDS" + GUID.bytes_le + struct.pack("<I", 2) + b"C:\\build\\leaky.pdb\0"
    lfanew = 0x80
    opt_size = (112 if plus else 96) + 8 * n_dirs
    out = bytearray(0x600)
    out[0:2] = b"MZ"
    struct.pack_into("<I", out, 0x3C, lfanew)
    out[lfanew:lfanew + 4] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", out, lfanew + 4, 0x8664 if plus else 0x14C, 1, stamp, 0, 0, opt_size, 0x22)
    opt = lfanew + 24
    struct.pack_into("<H", out, opt, 0x20B if plus else 0x10B)
    struct.pack_into("<I", out, opt + 56, image_size)
    struct.pack_into("<I", out, opt + 64, checksum)
    struct.pack_into("<I", out, opt + (108 if plus else 92), n_dirs)
    dirs = opt + (112 if plus else 96)
    if debug and n_dirs > 6:
        struct.pack_into("<II", out, dirs + 8 * 6, 0x1000, 2 * 28)
    sect = opt + opt_size
    struct.pack_into("<8sIIIIIIHHI", out, sect, b".rdata", 0x200, 0x1000, 0x200, 0x400, 0, 0, 0, 0, 0x40000040)
    struct.pack_into("<IIHHIIII", out, 0x400, 0, stamp, 0, 0, 16, 0, 0, 0)  # IMAGE_DEBUG_TYPE_REPRO, no data
    struct.pack_into("<IIHHIIII", out, 0x400 + 28, 0, stamp, 0, 0, 2, len(codeview), 0x1100,
                     0x500 if use_pointer else 0)
    out[0x500:0x500 + len(codeview)] = codeview
    return bytes(out)


def doctor_trace(tags: tuple[str, ...] = ("File",), stacks: bool = True, allocations: int = 40) -> tuple[bytes, dict]:
    """What the doctor's test session would write on a healthy machine: image rundown for ntoskrnl and two
    drivers, File allocations (and frees) made by a user-mode thread, each with a stack through the driver
    into ntoskrnl's allocator and back to user mode. Returns the trace and the kernel modules
    (synthetic.kernel_modules) it names."""
    from pooltrace.synthetic import kernel_modules

    mods = kernel_modules()
    nt, ntfs, leaky = mods["nt"], mods["ntfs"], mods["leaky"]
    w = TraceWriter()
    t = w.start_qpc + 100
    for m in (nt, ntfs, leaky):
        w.image(0, t, 0x1403, m.base, m.size, 0, m.path, timedatestamp=m.timedatestamp)
    w.image(0, t + 1, 0x1403, 0x7FF6_0000_0000, 0x20000, 4242, "\\Device\\HarddiskVolume3\\Python\\python.exe")
    for i in range(allocations):
        ts, tag = t + 1000 + 10 * i, tags[i % len(tags)]
        addr = 0xFFFF_A000_0000_0000 + 0x100 * i
        w.pool(i % 2, ts, 0x0E20, 0x200, tag, 0x158, addr, tid=77, pid=4242)
        if stacks:
            w.stack(i % 2, ts, ts, 4242, 77, [nt.base + 0x1010, ntfs.base + 0x2345, nt.base + 0x1400,
                                               0x7FF6_0000_1234])
        if i % 4:
            w.pool(i % 2, ts + 5, 0x0E22, 0x200, tag, 0x158, addr, tid=77, pid=4242)
    return w.to_bytes(), mods
