"""Session constants from ``providers/session.toml``, with the kernel definitions they refer to resolved
through ``providers/kernel.toml`` (the same definitions the decoder uses)."""

from __future__ import annotations

import tomllib
import uuid
from dataclasses import dataclass
from functools import cache

from pooltrace.definitions import Definitions, definitions, provider_text


@dataclass(frozen=True, eq=False)
class SessionConstants:
    raw: dict
    kernel: Definitions

    def __getitem__(self, section: str) -> dict:
        return self.raw[section]

    @property
    def private_guid(self) -> uuid.UUID:
        return uuid.UUID(self.raw["logger"]["private_guid"])

    @property
    def doctor_guid(self) -> uuid.UUID:
        return uuid.UUID(self.raw["logger"]["doctor_guid"])

    @property
    def kernel_guid(self) -> uuid.UUID:
        return self.kernel.guids["SystemTraceControl"]

    @property
    def enable_flags(self) -> int:
        """Classic EnableFlags: process, thread and image load events."""
        value = 0
        for name in self.raw["events"]["enable_flags"]:
            value |= self.kernel.enable_flags[name]
        return value

    @property
    def group_masks(self) -> tuple[int, ...]:
        """The 8-ULONG PERFINFO_GROUPMASK; GroupMask[0] is the classic EnableFlags."""
        masks = [0] * 8
        for name in self.raw["events"]["group_masks"]:
            index, bit = Definitions.mask_index_bit(self.kernel.group_masks[name])
            masks[index] |= bit
        return tuple(masks)

    def stack_hooks(self, free_stacks: bool) -> tuple[str, ...]:
        """Hook names that get a stack walk: allocations always, frees on request."""
        names = list(self.kernel.stacks["alloc"])
        if free_stacks:
            names += self.kernel.stacks["free"]
        return tuple(names)

    def win32_name(self, code: int) -> str:
        for name, value in self.raw["win32_errors"].items():
            if value == code:
                return f"{name} ({code})"
        return f"Windows error {code}"

    def ntstatus_name(self, status: int) -> str:
        status &= 0xFFFFFFFF
        for name, value in self.raw["ntstatus"].items():
            if value == status:
                return f"{name} (0x{status:08X})"
        return f"NTSTATUS 0x{status:08X}"


@cache
def constants() -> SessionConstants:
    return SessionConstants(tomllib.loads(provider_text("session.toml")), definitions())
