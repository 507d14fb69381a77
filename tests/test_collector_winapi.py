"""The Windows boundary module's own marshalling, exercised off Windows by loading it against stub DLLs:
in/out buffers copied back, handles returned, NTSTATUS made unsigned, the console handler wrapped and
unregistered, registry and drive lookups. (What the real DLLs do is not testable here.)"""

from __future__ import annotations

import ctypes as ct
import importlib
import struct
import sys
import types

import pytest


class Func:
    def __init__(self, impl):
        self.impl, self.calls = impl, []

    def __call__(self, *args):
        self.calls.append(args)
        return self.impl(*args)


class Dll:
    def __init__(self, **funcs):
        self.__dict__.update({k: Func(v) for k, v in funcs.items()})


def _write(ptr, offset, data):
    ct.memmove((ptr.value if isinstance(ptr, ct.c_void_p) else ct.addressof(ptr)) + offset, data, len(data))


@pytest.fixture
def winapi(monkeypatch):
    handlers = []

    def start(handle_ref, name, props):
        handle_ref._obj.value = 0x23
        _write(props, 0x58, struct.pack("<I", 5))  # EventsLost
        return 0

    def control(handle, name, props, code):
        _write(props, 0x58, struct.pack("<I", 9))
        return 4201 if name == "missing" else 0

    def nt_query(cls, buf, size, needed_ref):
        needed_ref._obj.value = 4096
        if size < 4096:
            return -0x3FFFFFFC  # STATUS_INFO_LENGTH_MISMATCH as a signed NTSTATUS
        _write(buf, 0, b"\x01\x02\x03\x04")
        return 0

    def query_dos_device(drive, buf, size):
        buf.value = {"C:": "\\Device\\HarddiskVolume3", "E:": "\\Device\\CdRom0"}[drive]
        return len(buf.value) + 2

    dlls = {
        "advapi32": Dll(StartTraceW=start, ControlTraceW=control, TraceSetInformation=lambda h, c, p, n: 87),
        "ntdll": Dll(NtSetSystemInformation=lambda c, p, n: -0x3FFFFFF3, NtQuerySystemInformation=nt_query),
        "kernel32": Dll(SetConsoleCtrlHandler=lambda cb, add: handlers.append((cb, add)) or 1,
                        QueryDosDeviceW=query_dos_device, GetLogicalDrives=lambda: 0b10100,
                        GetSystemWindowsDirectoryW=lambda buf, n: setattr(buf, "value", "D:\\Win") or 6,
                        IsWow64Process=lambda h, ref: 1, GetCurrentProcess=lambda: -1),
        "shell32": Dll(IsUserAnAdmin=lambda: 1),
    }
    winreg = types.SimpleNamespace(HKEY_LOCAL_MACHINE=1, KEY_READ=0x20019, KEY_WOW64_64KEY=0x100, REG_DWORD=4,
                                   REG_SZ=1)

    class Key:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    values = {"DisablePagingExecutive": (1, 4), "Text": ("x", 1)}

    def query_value(key, name):
        if name not in values:
            raise FileNotFoundError(2, "not found")
        return values[name]

    winreg.OpenKey = lambda *a: Key()
    winreg.QueryValueEx = query_value
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "winreg", winreg)
    monkeypatch.setitem(sys.modules, "etw", None)  # pywintrace absent: our own declarations
    monkeypatch.setattr(ct, "WinDLL", lambda name: dlls[name], raising=False)
    monkeypatch.setattr(ct, "WINFUNCTYPE", ct.CFUNCTYPE, raising=False)
    monkeypatch.delitem(sys.modules, "pooltrace.collector.winapi", raising=False)
    module = importlib.import_module("pooltrace.collector.winapi")
    yield module.WinApi(), dlls, handlers
    sys.modules.pop("pooltrace.collector.winapi", None)


def test_start_and_control_copy_the_properties_back(winapi):
    api, dlls, _ = winapi
    props = bytearray(0x78 + 10)
    status, handle = api.start_trace("pooltrace", props)
    assert (status, handle) == (0, 0x23) and struct.unpack_from("<I", props, 0x58)[0] == 5
    assert len(props) == 0x78 + 10
    assert api.control_trace(0x23, "pooltrace", props, 1) == 0 and struct.unpack_from("<I", props, 0x58)[0] == 9
    assert api.control_trace(0, "missing", props, 0) == 4201
    h, name, _, code = dlls["advapi32"].ControlTraceW.calls[0]
    assert h.value == 0x23 and name == "pooltrace" and code == 1


def test_trace_set_information_and_native_calls(winapi):
    api, dlls, _ = winapi
    assert api.trace_set_information(0x23, 4, b"\x07" + bytes(31)) == 87
    handle, cls, arr, n = dlls["advapi32"].TraceSetInformation.calls[0]
    assert (handle, cls, n) == (0x23, 4, 32) and bytes(arr)[:32] == b"\x07" + bytes(31)
    assert api.nt_set_system_information(0x1F, bytes(20)) == 0xC000000D
    small = bytearray(16)
    assert api.nt_query_system_information(22, small) == (0xC0000004, 4096)
    big = bytearray(4096)
    assert api.nt_query_system_information(22, big) == (0, 4096) and big[:4] == b"\x01\x02\x03\x04"


def test_console_handler_is_wrapped_and_removed(winapi):
    api, _, handlers = winapi
    seen = []
    api.set_console_handler(lambda ev: seen.append(ev) or ev == 2)
    callback, added = handlers[-1]
    assert added is True
    assert callback(2) == 1 and callback(0) == 0 and seen == [2, 0]
    api.set_console_handler(lambda ev: 1 / 0)  # replaces the first; exceptions never cross
    assert handlers[-2] == (callback, False)
    assert handlers[-1][0](2) == 0
    api.set_console_handler(None)
    assert handlers[-1][1] is False and len(handlers) == 4


def test_machine_facts(winapi):
    api, _, _ = winapi
    assert api.is_admin() is True and api.pointer_size() == ct.sizeof(ct.c_void_p)
    assert api.registry_dword("SYSTEM\\x", "DisablePagingExecutive") == 1
    assert api.registry_dword("SYSTEM\\x", "Text") is None and api.registry_dword("SYSTEM\\x", "Nope") is None
    assert api.dos_devices() == {"C:": "\\Device\\HarddiskVolume3", "E:": "\\Device\\CdRom0"}  # mask 0b10100
    assert api.system_root() == "D:\\Win"
