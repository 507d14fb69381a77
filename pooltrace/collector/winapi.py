"""The one module that talks to Windows: advapi32 (StartTraceW, ControlTraceW, QueryAllTracesW,
TraceSetInformation, the token privilege calls), ntdll (NtSetSystemInformation, NtQuerySystemInformation),
kernel32 and shell32.

Windows-only; imported lazily by ``pooltrace record``/``stop``/``doctor`` after the platform check, never on
import of pooltrace. Thin on purpose: every method passes bytes built elsewhere (:mod:`.structs`) and
returns the raw Win32 error or NTSTATUS; all decisions live above it (contract: :mod:`.boundary`), tested
on any OS against a recording fake of this class.

StartTraceW, ControlTraceW, TRACEHANDLE and EVENT_TRACE_PROPERTIES come from pywintrace (module ``etw``)
when it is installed; it has no TraceSetInformation, group masks or filters, so those are declared here,
on a private advapi32 instance whose function objects do not clash with pywintrace's.
"""

from __future__ import annotations

import ctypes as ct
import shutil
import sys
from collections.abc import Callable
from ctypes import wintypes as wt
from typing import BinaryIO

if sys.platform != "win32":  # pragma: no cover - guarded by the CLI; keeps a stray import from half-working
    raise ImportError("pooltrace.collector.winapi works on Windows only")

from pooltrace.collector.structs import PROPERTIES_SIZE, token_privileges  # noqa: E402

TOKEN_ADJUST_PRIVILEGES, TOKEN_QUERY = 0x0020, 0x0008
_HANDLER_ROUTINE = ct.WINFUNCTYPE(wt.BOOL, wt.DWORD)


def _pywintrace():
    """pywintrace's declarations, when the package is installed and imports cleanly."""
    try:
        from etw import evntrace  # pywintrace
    except Exception:  # not installed, or broken: use our own declarations
        return None
    if ct.sizeof(evntrace.EVENT_TRACE_PROPERTIES) != PROPERTIES_SIZE:
        return None
    return evntrace


def _declare(func, argtypes, restype):
    func.argtypes, func.restype = argtypes, restype
    return func


class WinApi:
    """The real Windows boundary (see pooltrace.collector.session.WindowsApi for the contract)."""

    def __init__(self) -> None:
        advapi = ct.WinDLL("advapi32", use_last_error=True)  # a private loader instance
        pw = _pywintrace()
        if pw is not None:
            self._start, self._control = pw.StartTraceW, pw.ControlTraceW
            self._props_type = ct.POINTER(pw.EVENT_TRACE_PROPERTIES)
            self._handle_type = pw.TRACEHANDLE
        else:
            self._handle_type = ct.c_uint64
            self._props_type = ct.c_void_p
            self._start = _declare(advapi.StartTraceW, [ct.POINTER(ct.c_uint64), ct.c_wchar_p, ct.c_void_p],
                                   ct.c_ulong)
            self._control = _declare(advapi.ControlTraceW, [ct.c_uint64, ct.c_wchar_p, ct.c_void_p, ct.c_ulong],
                                     ct.c_ulong)
        self._set_info = _declare(advapi.TraceSetInformation, [ct.c_uint64, ct.c_int, ct.c_void_p, ct.c_ulong],
                                  ct.c_ulong)
        self._query_all = _declare(advapi.QueryAllTracesW, [ct.POINTER(ct.c_void_p), ct.c_ulong,
                                                            ct.POINTER(ct.c_ulong)], ct.c_ulong)
        self._open_token = _declare(advapi.OpenProcessToken, [wt.HANDLE, wt.DWORD, ct.POINTER(wt.HANDLE)], wt.BOOL)
        self._lookup_privilege = _declare(advapi.LookupPrivilegeValueW, [wt.LPCWSTR, wt.LPCWSTR,
                                                                        ct.POINTER(ct.c_uint64)], wt.BOOL)
        self._adjust_privileges = _declare(advapi.AdjustTokenPrivileges, [wt.HANDLE, wt.BOOL, ct.c_void_p, wt.DWORD,
                                                                          ct.c_void_p, ct.c_void_p], wt.BOOL)
        ntdll = ct.WinDLL("ntdll")
        self._nt_set = _declare(ntdll.NtSetSystemInformation, [ct.c_ulong, ct.c_void_p, ct.c_ulong], ct.c_long)
        self._nt_query = _declare(ntdll.NtQuerySystemInformation,
                                  [ct.c_ulong, ct.c_void_p, ct.c_ulong, ct.POINTER(ct.c_ulong)], ct.c_long)
        k32 = ct.WinDLL("kernel32", use_last_error=True)
        self._console_ctrl = _declare(k32.SetConsoleCtrlHandler, [_HANDLER_ROUTINE, wt.BOOL], wt.BOOL)
        self._query_dos_device = _declare(k32.QueryDosDeviceW, [wt.LPCWSTR, wt.LPWSTR, wt.DWORD], wt.DWORD)
        self._logical_drives = _declare(k32.GetLogicalDrives, [], wt.DWORD)
        self._windows_dir = _declare(k32.GetSystemWindowsDirectoryW, [wt.LPWSTR, wt.UINT], wt.UINT)
        self._is_wow64 = _declare(k32.IsWow64Process, [wt.HANDLE, ct.POINTER(wt.BOOL)], wt.BOOL)
        self._current_process = _declare(k32.GetCurrentProcess, [], wt.HANDLE)
        self._close_handle = _declare(k32.CloseHandle, [wt.HANDLE], wt.BOOL)
        self._get_acp = _declare(k32.GetACP, [], wt.UINT)
        self._is_admin = _declare(ct.WinDLL("shell32").IsUserAnAdmin, [], wt.BOOL)
        self._console_callback = None

    # -- machine facts
    def windows_version(self) -> tuple[int, int, int]:
        v = sys.getwindowsversion()
        return v.major, v.minor, v.build

    def pointer_size(self) -> int:
        return ct.sizeof(ct.c_void_p)

    def is_64bit_windows(self) -> bool:
        if self.pointer_size() == 8:
            return True
        wow = wt.BOOL(0)
        return bool(self._is_wow64(self._current_process(), ct.byref(wow)) and wow.value)

    def is_admin(self) -> bool:
        return bool(self._is_admin())

    def ansi_code_page(self) -> int:
        return int(self._get_acp())

    def enable_privilege(self, name: str) -> int:
        """Enable a privilege the token holds: 0, ERROR_NOT_ALL_ASSIGNED (1300) when it does not hold it
        (AdjustTokenPrivileges then still returns TRUE), or the Win32 error of the failing call."""
        token = wt.HANDLE()
        if not self._open_token(self._current_process(), TOKEN_ADJUST_PRIVILEGES | TOKEN_QUERY, ct.byref(token)):
            return ct.get_last_error()
        try:
            luid = ct.c_uint64(0)  # LUID {DWORD LowPart; LONG HighPart}: 8 bytes, low part first
            if not self._lookup_privilege(None, name, ct.byref(luid)):
                return ct.get_last_error()
            state = self._aligned(token_privileges(luid.value))
            ct.set_last_error(0)
            if not self._adjust_privileges(token, False, state, 0, None, None):
                return ct.get_last_error()
            return ct.get_last_error()  # 0 or ERROR_NOT_ALL_ASSIGNED
        finally:
            self._close_handle(token)

    def free_bytes(self, directory: str) -> int:
        return shutil.disk_usage(directory).free

    def system_root(self) -> str:
        buf = ct.create_unicode_buffer(1024)
        n = self._windows_dir(buf, len(buf))
        return buf.value if 0 < n < len(buf) else "C:\\Windows"

    def dos_devices(self) -> dict[str, str]:
        out = {}
        mask = self._logical_drives()
        buf = ct.create_unicode_buffer(1024)
        for i in range(26):
            if mask >> i & 1:
                drive = f"{chr(ord('A') + i)}:"
                if self._query_dos_device(drive, buf, len(buf)):
                    out[drive] = buf.value
        return out

    def open_binary(self, path: str) -> BinaryIO:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it

    # -- ETW control
    @staticmethod
    def _aligned(data: bytes | bytearray):
        arr = (ct.c_uint64 * ((len(data) + 7) // 8))()
        ct.memmove(arr, bytes(data), len(data))
        return arr

    def start_trace(self, name: str, properties: bytearray) -> tuple[int, int]:
        arr = self._aligned(properties)
        handle = self._handle_type(0)
        status = self._start(ct.byref(handle), name, ct.cast(arr, self._props_type))
        properties[:] = ct.string_at(arr, len(properties))
        return int(status), int(handle.value)

    def control_trace(self, handle: int, name: str, properties: bytearray, code: int) -> int:
        arr = self._aligned(properties)
        status = self._control(self._handle_type(handle), name, ct.cast(arr, self._props_type), code)
        properties[:] = ct.string_at(arr, len(properties))
        return int(status)

    def query_all_traces(self, buffers: list[bytearray]) -> tuple[int, int]:
        arrays = [self._aligned(b) for b in buffers]
        pointers = (ct.c_void_p * len(arrays))(*[ct.addressof(a) for a in arrays])
        count = ct.c_ulong(0)
        status = self._query_all(pointers, len(arrays), ct.byref(count))
        for buf, arr in zip(buffers, arrays, strict=True):
            buf[:] = ct.string_at(arr, len(buf))
        return int(status), int(count.value)

    def trace_set_information(self, handle: int, info_class: int, data: bytes) -> int:
        arr = self._aligned(data)
        return int(self._set_info(handle, info_class, arr, len(data)))

    def nt_set_system_information(self, info_class: int, data: bytes) -> int:
        arr = self._aligned(data)
        return int(self._nt_set(info_class, arr, len(data))) & 0xFFFFFFFF

    def nt_query_system_information(self, info_class: int, buffer: bytearray) -> tuple[int, int]:
        arr = self._aligned(buffer)
        needed = ct.c_ulong(0)
        status = int(self._nt_query(info_class, arr, len(buffer), ct.byref(needed))) & 0xFFFFFFFF
        buffer[:] = ct.string_at(arr, len(buffer))
        return status, int(needed.value)

    # -- console
    def set_console_handler(self, handler: Callable[[int], bool] | None) -> None:
        if self._console_callback is not None:
            self._console_ctrl(self._console_callback, False)
            self._console_callback = None
        if handler is None:
            return

        def routine(event: int) -> bool:
            try:
                return bool(handler(int(event)))
            except Exception:  # never let an exception cross into the console thread
                return False

        callback = _HANDLER_ROUTINE(routine)
        if self._console_ctrl(callback, True):
            self._console_callback = callback  # keep it alive while registered
