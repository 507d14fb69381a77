"""JSON read from files pooltrace did not just write (a recorder's sidecar, a dataset's trace.json), checked
against declared rules: the type and range of each known field. Unknown fields are kept (newer writers add
fields); NaN/Infinity and numbers too large for a float never pass; nesting is bounded by the parser.

``load_json`` reads a file into Python values, ``check`` returns a cleaned copy plus what it dropped.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

from pooltrace.errors import PooltraceError

MAX_JSON_BYTES = 64 << 20


def load_json(path: str | os.PathLike, what: str) -> object:
    """The parsed content of a JSON file; PooltraceError (one line naming the file) when it is not a regular
    file, too large, not UTF-8, not JSON or nested too deeply. Non-finite numbers become NON_FINITE."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise PooltraceError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PooltraceError(f"{path} is not a regular file")
    if st.st_size > MAX_JSON_BYTES:
        raise PooltraceError(f"{path} is {st.st_size:,} bytes, too large for a {what}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PooltraceError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PooltraceError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_non_finite, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise PooltraceError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise PooltraceError(f"{path} is not a {what} (JSON nested too deeply)") from None


class _NonFinite:
    """NaN/Infinity in the JSON text: never a valid value."""

    def __repr__(self) -> str:
        return "non-finite number"


NON_FINITE = _NonFinite()


def _non_finite(_text: str) -> _NonFinite:
    return NON_FINITE


def _finite_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else NON_FINITE


class Field:
    """One value's rule: `kind` (str, bool, int, number, hex, guid, filename, list, object), an integer range,
    nullable, required (an object lacking it is dropped), the rule of a list's items, of an object's known
    members, or of every value of an object whose keys are data (`values`)."""

    def __init__(self, kind: str, *, lo: int = 0, hi: int = (1 << 64) - 1, null: bool = False,
                 required: bool = False, item: Field | None = None, members: dict[str, Field] | None = None,
                 values: Field | None = None):
        self.kind, self.lo, self.hi, self.null, self.required = kind, lo, hi, null, required
        self.item, self.members, self.values = item, members, values


U32, U64 = (1 << 32) - 1, (1 << 64) - 1
_GUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")
_HEX = re.compile(r"^(0[xX])?[0-9a-fA-F]{1,16}$")


def opt(kind: str, **kw) -> Field:
    """A field that may be null."""
    return Field(kind, null=True, **kw)


DROP = object()


def _plain(value):
    """Unknown content kept as it is, with non-finite numbers made null (trace.json stays valid JSON)."""
    if value is NON_FINITE:
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _why(value, f: Field) -> str | None:
    """Why `value` breaks rule `f` (None: it does not), for scalar kinds."""
    k = f.kind
    if k == "str":
        return None if isinstance(value, str) else "not a string"
    if k == "bool":
        return None if isinstance(value, bool) else "not true or false"
    if k == "filename":
        return None if isinstance(value, str) and value and not re.search(r"[\\/:\x00]", value) \
            else "not a plain file name"
    if k == "guid":
        return None if isinstance(value, str) and _GUID.match(value) else "not a GUID"
    if k == "hex":
        if isinstance(value, str):
            return None if _HEX.match(value.strip()) else "not a hex address"
        k = "int"
    if k == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
        return None if ok else "not a finite non-negative number"
    if k == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            return "not an integer"
        return None if f.lo <= value <= f.hi else f"out of range {f.lo}..{f.hi}"
    return None


def check(value, f: Field, where: str, problems: list[str]):
    """`value` cleaned by rule `f`, or DROP; what was dropped is added to `problems`."""
    if value is None and f.null:
        return None
    if f.kind == "object":
        if not isinstance(value, dict):
            problems.append(f"{where or 'the file'} (not an object)")
            return DROP
        out = {}
        for key, v in value.items():
            rule = (f.members or {}).get(key, f.values)
            if rule is None:
                out[key] = _plain(v)
                continue
            c = check(v, rule, f"{where}.{key}" if where else key, problems)
            if c is DROP:
                if rule.required:
                    return DROP
                continue
            out[key] = c
        for key, rule in (f.members or {}).items():
            if rule.required and key not in out:
                problems.append(f"{where or 'the file'} (no {key!r})")
                return DROP
        return out
    if f.kind == "list":
        if not isinstance(value, list):
            problems.append(f"{where} (not a list)")
            return DROP
        if f.item is None:
            return _plain(value)
        out = []
        for i, v in enumerate(value):
            c = check(v, f.item, f"{where}[{i}]", problems)
            if c is not DROP:
                out.append(c)
        return out
    why = "null" if value is None else _why(value, f)
    if why:
        problems.append(f"{where} ({why})")
        return DROP
    return value


def validate(value, rule: Field) -> tuple[object, list[str]]:
    """(`value` cleaned by `rule` or DROP, the problems found); content nested deeper than Python can
    walk is dropped whole."""
    problems: list[str] = []
    try:
        return check(value, rule, "", problems), problems
    except RecursionError:
        return DROP, ["the file (nested too deeply)"]
