"""The one module that talks to Windows: advapi32 (StartTraceW, ControlTraceW, TraceSetInformation), ntdll
(NtSetSystemInformation, NtQuerySystemInformation), kernel32, shell32 and the registry.

Windows-only; imported lazily by ``pooltrace record``/``stop`` after the platform check, never on import
of pooltrace. Thin on purpose: every method passes bytes built elsewhere (:mod:`.structs`) and returns
the raw Win32 error or NTSTATUS; all decisions live in :mod:`.session`, which is tested on any OS against
a recording fake of this class.

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

import winreg  # noqa: E402 - Windows-only standard module

PROPERTIES_SIZE = 0x78
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
        advapi = ct.WinDLL("advapi32")  # a private loader instance
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
        ntdll = ct.WinDLL("ntdll")
        self._nt_set = _declare(ntdll.NtSetSystemInformation, [ct.c_ulong, ct.c_void_p, ct.c_ulong], ct.c_long)
        self._nt_query = _declare(ntdll.NtQuerySystemInformation,
                                  [ct.c_ulong, ct.c_void_p, ct.c_ulong, ct.POINTER(ct.c_ulong)], ct.c_long)
        k32 = ct.WinDLL("kernel32")
        self._console_ctrl = _declare(k32.SetConsoleCtrlHandler, [_HANDLER_ROUTINE, wt.BOOL], wt.BOOL)
        self._query_dos_device = _declare(k32.QueryDosDeviceW, [wt.LPCWSTR, wt.LPWSTR, wt.DWORD], wt.DWORD)
        self._logical_drives = _declare(k32.GetLogicalDrives, [], wt.DWORD)
        self._windows_dir = _declare(k32.GetSystemWindowsDirectoryW, [wt.LPWSTR, wt.UINT], wt.UINT)
        self._is_wow64 = _declare(k32.IsWow64Process, [wt.HANDLE, ct.POINTER(wt.BOOL)], wt.BOOL)
        self._current_process = _declare(k32.GetCurrentProcess, [], wt.HANDLE)
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

    def registry_dword(self, key: str, value: str) -> int | None:
        try:
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, key, 0,
                                winreg.KEY_READ | winreg.KEY_WOW64_64KEY) as k:
                data, kind = winreg.QueryValueEx(k, value)
        except OSError:
            return None
        return int(data) if kind == winreg.REG_DWORD else None

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
