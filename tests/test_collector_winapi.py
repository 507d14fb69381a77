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


def _addr(ptr) -> int:
    if isinstance(ptr, ct.c_void_p):
        return ptr.value
    if isinstance(ptr, ct._Pointer):
        return ct.cast(ptr, ct.c_void_p).value
    return ct.addressof(ptr)


def _write(ptr, offset, data):
    ct.memmove(_addr(ptr) + offset, data, len(data))


class EVENT_TRACE_PROPERTIES(ct.Structure):  # what pywintrace declares: 0x78 bytes on x64
    _fields_ = [("Wnode", ct.c_uint8 * 0x30), ("Fields", ct.c_uint32 * 14), ("LoggerThreadId", ct.c_uint64),
                ("LogFileNameOffset", ct.c_uint32), ("LoggerNameOffset", ct.c_uint32)]


def fake_pywintrace(start, control, props_type=EVENT_TRACE_PROPERTIES):
    """A stand-in for pywintrace's ``etw`` package: only the declarations the boundary takes from it."""
    etw = types.ModuleType("etw")
    evntrace = types.ModuleType("etw.evntrace")
    evntrace.EVENT_TRACE_PROPERTIES = props_type
    evntrace.TRACEHANDLE = ct.c_uint64
    evntrace.StartTraceW, evntrace.ControlTraceW = Func(start), Func(control)
    etw.evntrace = evntrace
    return etw, evntrace


@pytest.fixture(params=["ctypes", "pywintrace", "pywintrace-mismatched"])
def winapi(request, monkeypatch):
    handlers = []
    state = {"last_error": 0, "adjusted": []}

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

    def query_all(array, count, logger_count_ref):
        for i in range(2):  # two sessions: write their EventsLost
            _write(ct.c_void_p(array[i]), 0x58, struct.pack("<I", 100 + i))
        logger_count_ref._obj.value = 2
        return 0

    def open_token(process, access, token_ref):
        token_ref._obj.value = 0x44
        state["access"] = access
        return 1

    def lookup(system, name, luid_ref):
        luid_ref._obj.value = 20 if name == "SeDebugPrivilege" else 0
        return 1 if name == "SeDebugPrivilege" else 0

    def adjust(token, disable_all, new_state, length, prev, ret):
        state["adjusted"].append(ct.string_at(_addr(new_state), 16))
        state["last_error"] = 1300 if state.get("not_held") else 0
        return 1

    def query_dos_device(drive, buf, size):
        buf.value = {"C:": "\\Device\\HarddiskVolume3", "E:": "\\Device\\CdRom0"}[drive]
        return len(buf.value) + 2

    dlls = {
        "advapi32": Dll(StartTraceW=start, ControlTraceW=control, TraceSetInformation=lambda h, c, p, n: 87,
                        QueryAllTracesW=query_all, OpenProcessToken=open_token, LookupPrivilegeValueW=lookup,
                        AdjustTokenPrivileges=adjust),
        "ntdll": Dll(NtSetSystemInformation=lambda c, p, n: -0x3FFFFFF3, NtQuerySystemInformation=nt_query),
        "kernel32": Dll(SetConsoleCtrlHandler=lambda cb, add: handlers.append((cb, add)) or 1,
                        QueryDosDeviceW=query_dos_device, GetLogicalDrives=lambda: 0b10100,
                        GetSystemWindowsDirectoryW=lambda buf, n: setattr(buf, "value", "D:\\Win") or 6,
                        IsWow64Process=lambda h, ref: 1, GetCurrentProcess=lambda: -1,
                        CloseHandle=lambda h: state.setdefault("closed", []).append(h.value) or 1, GetACP=lambda: 1251),
        "shell32": Dll(IsUserAnAdmin=lambda: 1),
    }
    monkeypatch.setattr(sys, "platform", "win32")
    pw = None
    if request.param == "ctypes":
        monkeypatch.setitem(sys.modules, "etw", None)  # pywintrace absent: our own declarations
    else:
        mismatched = request.param == "pywintrace-mismatched"
        etw, pw = fake_pywintrace(start, control, ct.c_uint8 * 0x70 if mismatched else EVENT_TRACE_PROPERTIES)
        monkeypatch.setitem(sys.modules, "etw", etw)
        monkeypatch.setitem(sys.modules, "etw.evntrace", pw)
        if mismatched:
            pw = None  # a declaration of the wrong size is not used
    monkeypatch.setattr(ct, "WinDLL", lambda name, **kw: dlls[name], raising=False)
    monkeypatch.setattr(ct, "WINFUNCTYPE", ct.CFUNCTYPE, raising=False)
    monkeypatch.setattr(ct, "get_last_error", lambda: state["last_error"], raising=False)
    monkeypatch.setattr(ct, "set_last_error", lambda v: state.__setitem__("last_error", v), raising=False)
    monkeypatch.delitem(sys.modules, "pooltrace.collector.winapi", raising=False)
    module = importlib.import_module("pooltrace.collector.winapi")
    dlls["state"], dlls["pywintrace"] = state, pw
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
    used = dlls["pywintrace"] or dlls["advapi32"]  # pywintrace's declarations when it is there and fits
    other = dlls["advapi32"] if dlls["pywintrace"] else None
    h, name, _, code = used.ControlTraceW.calls[0]
    assert h.value == 0x23 and name == "pooltrace" and code == 1
    assert len(used.StartTraceW.calls) == 1 and (other is None or not other.StartTraceW.calls)


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
    assert api.dos_devices() == {"C:": "\\Device\\HarddiskVolume3", "E:": "\\Device\\CdRom0"}  # mask 0b10100
    assert api.system_root() == "D:\\Win" and api.ansi_code_page() == 1251


def test_query_all_traces_fills_every_buffer_it_passes(winapi):
    api, dlls, _ = winapi
    buffers = [bytearray(0x78 + 16) for _ in range(3)]
    assert api.query_all_traces(buffers) == (0, 2)
    assert [struct.unpack_from("<I", b, 0x58)[0] for b in buffers] == [100, 101, 0]
    _, count, _ = dlls["advapi32"].QueryAllTracesW.calls[0]
    assert count == 3


def test_enable_privilege_passes_a_token_privileges_block_and_reports_not_all_assigned(winapi):
    api, dlls, _ = winapi
    state = dlls["state"]
    assert api.enable_privilege("SeDebugPrivilege") == 0
    assert state["adjusted"][0] == struct.pack("<IIiI", 1, 20, 0, 2)  # one LUID, SE_PRIVILEGE_ENABLED
    assert state["access"] == 0x28 and state["closed"] == [0x44]  # TOKEN_ADJUST_PRIVILEGES | TOKEN_QUERY
    state["not_held"] = True
    assert api.enable_privilege("SeDebugPrivilege") == 1300  # TRUE returned, GetLastError says not all assigned
    state["last_error"] = 1313
    assert api.enable_privilege("SeNoSuchPrivilege") == 1313 and len(state["closed"]) == 3
