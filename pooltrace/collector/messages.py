"""What users read when Windows says no: session.toml's [messages] filled in, and error codes named."""

from __future__ import annotations

from pathlib import Path

from pooltrace.collector.config import constants


def message(key: str, **kw) -> str:
    return constants()["messages"][key].format(**kw)


def win32(name: str) -> int:
    return constants()["win32_errors"][name]


def nt(name: str) -> int:
    return constants()["ntstatus"][name]


def running_message(kind: str) -> str:
    if kind == "private":
        return message("running_private")
    return message("running_kernel", alternative=message("running_kernel_alternative"))


def start_error(status: int, kind: str, output: Path) -> str:
    """The one line for a failed StartTrace."""
    code = constants().win32_name(status)
    if status == win32("ERROR_ACCESS_DENIED"):
        return message("admin")
    if status == win32("ERROR_ALREADY_EXISTS"):
        return running_message(kind)
    if status == win32("ERROR_NO_SYSTEM_RESOURCES"):
        return message("no_slot", alternative=message("no_slot_alternative") if kind == "private" else "")
    if status == win32("ERROR_INVALID_PARAMETER"):
        return message("bad_settings", code=code)
    if status == win32("ERROR_BAD_LENGTH"):
        return message("internal", code=code)
    if status in (win32("ERROR_PATH_NOT_FOUND"), win32("ERROR_FILE_NOT_FOUND"), win32("ERROR_BAD_PATHNAME")):
        return message("cannot_create", output=output, code=code)
    if status == win32("ERROR_DISK_FULL"):
        return message("disk_full", output=output, code=code)
    return message("generic", operation="starting the trace session (StartTrace)", code=code)
