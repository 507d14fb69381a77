"""Kernel event definitions loaded from ``providers/kernel.toml``: GUIDs, hook ids, group masks and
payload layouts, compiled once into offsets and ``struct`` formats for both pointer sizes.

The decoder and the collector both read these; nothing else in pooltrace hard-codes a hook id or a GUID.
"""

from __future__ import annotations

import struct
import tomllib
import uuid
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

FIXED_TYPES = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "i32": "i", "guid": "16s"}
VARIABLE_TYPES = {"utf16z", "ansiz", "sid", "rest"}


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    offset: int | None  # None once a variable-size field came before it
    size: int | None


@dataclass(frozen=True)
class Layout:
    """A payload layout compiled for one pointer size."""

    name: str
    pointer_size: int
    fields: tuple[Field, ...]
    fixed_format: str  # struct format of the fixed-size prefix
    fixed_size: int
    fixed_names: tuple[str, ...]
    frames: bool  # a trailing array of pointer-sized frames follows the fixed part

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


def _compile(name: str, spec: dict, pointer_size: int) -> Layout:
    """Offsets of a layout's fields: packed (an event payload), or with C alignment when the spec says
    ``aligned = true`` (a structure such as SYSTEM_POOLTAG: each field at a multiple of its size, the
    size rounded up to the largest one)."""
    ptr_code = "Q" if pointer_size == 8 else "I"
    aligned = bool(spec.get("aligned"))
    fmt = "<"
    offset: int | None = 0
    fields = []
    names = []
    widest = 1
    for fname, ftype in spec["fields"]:
        if ftype == "ptr":
            code, size = ptr_code, pointer_size
        elif ftype in FIXED_TYPES:
            code = FIXED_TYPES[ftype]
            size = struct.calcsize("<" + code)
        elif ftype in VARIABLE_TYPES:
            code, size = None, None
        else:
            raise ValueError(f"providers: layout {name}: unknown type {ftype!r}")
        if aligned and size is not None and offset is not None and offset % size:
            pad = size - offset % size
            fmt += f"{pad}x"
            offset += pad
        widest = max(widest, size or 1)
        fields.append(Field(fname, ftype, offset, size))
        if offset is not None and code is not None:
            fmt += code
            names.append(fname)
            offset += size
        else:
            offset = None
    if aligned and offset is not None and offset % widest:
        fmt += f"{widest - offset % widest}x"
    fixed_size = struct.calcsize(fmt)
    return Layout(name, pointer_size, tuple(fields), fmt, fixed_size, tuple(names), "frames" in spec)


@dataclass(frozen=True, eq=False)
class Definitions:
    guids: dict[str, uuid.UUID]
    hooks: dict[str, int]
    ktc_opcodes: dict[str, int]
    group_masks: dict[str, int]
    enable_flags: dict[str, int]
    stacks: dict[str, list[str]]
    layout_specs: dict[str, dict]

    @cache  # noqa: B019 - one Definitions object lives for the whole process
    def layout(self, name: str, pointer_size: int) -> Layout:
        return _compile(name, self.layout_specs[name], pointer_size)

    def layout_hooks(self, name: str) -> list[int]:
        return [self.hooks[h] for h in self.layout_specs[name].get("hooks", [])]

    def hook_name(self, hook: int) -> str:
        for k, v in self.hooks.items():
            if v == hook:
                return k
        return f"0x{hook:04x}"

    @staticmethod
    def mask_index_bit(value: int) -> tuple[int, int]:
        """Split a PERF_* group constant into (GroupMask index, bit)."""
        return value >> 29, value & 0x1FFFFFFF


def provider_text(name: str) -> str:
    """Text of a file in providers/: installed as the package ``pooltrace.providers``, or read from the
    source checkout (where ``providers/`` sits beside the ``pooltrace`` package)."""
    try:
        return resources.files("pooltrace.providers").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        return (Path(__file__).resolve().parent.parent / "providers" / name).read_text(encoding="utf-8")


@cache
def definitions() -> Definitions:
    text = provider_text("kernel.toml")
    data = tomllib.loads(text)
    return Definitions(
        guids={k: uuid.UUID(v) for k, v in data["guids"].items()},
        hooks=dict(data["hooks"]),
        ktc_opcodes=dict(data["ktc_opcodes"]),
        group_masks=dict(data["group_masks"]),
        enable_flags=dict(data["enable_flags"]),
        stacks=dict(data["stacks"]),
        layout_specs=dict(data["layouts"]),
    )
