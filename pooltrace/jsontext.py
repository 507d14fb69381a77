"""Indented JSON text, byte for byte what ``json.dumps(obj, indent=N)`` writes, at C-encoder speed for
the large arrays of a report.

The standard library drops to its pure-Python encoder whenever `indent` is given: a report with
thousands of groups (64-point growth series, frame lists) spends seconds in it. Here arrays of plain
ints or plain strings are joined in one call each; scalars are written exactly as the standard library
writes them (ensure_ascii escaping, float repr, NaN/Infinity, bool and None keys). Like ``json.dumps``
it raises TypeError for a value JSON cannot hold; circular references are not looked for.
"""

from __future__ import annotations

from json.encoder import INFINITY
from json.encoder import encode_basestring_ascii as _string


def dumps(obj, indent: int = 2) -> str:
    """``json.dumps(obj, indent=indent)``, the same text."""
    out: list[str] = []
    _value(obj, out, "\n", " " * indent)
    return "".join(out)


def _float(o: float) -> str:
    if o != o:
        return "NaN"
    if o == INFINITY:
        return "Infinity"
    if o == -INFINITY:
        return "-Infinity"
    return float.__repr__(o)


def _scalar(o) -> str | None:
    """The text of a scalar, in the standard library's order of checks; None for anything else."""
    if isinstance(o, str):
        return _string(o)
    if o is None:
        return "null"
    if o is True:
        return "true"
    if o is False:
        return "false"
    if isinstance(o, int):
        return int.__repr__(o)
    if isinstance(o, float):
        return _float(o)
    return None


def _key(k) -> str:
    """A dict key's text: a string as it is, another scalar as its JSON text (as the standard library)."""
    if isinstance(k, str):
        return k
    text = _scalar(k)
    if text is None:
        raise TypeError(f"keys must be str, int, float, bool or None, not {k.__class__.__name__}")
    return text


def _value(o, out: list[str], nl: str, ind: str) -> None:
    """Append the text of `o`; `nl` is the newline plus the indentation of the line `o` starts on."""
    t = type(o)
    if t is dict:
        _dict(o, out, nl, ind)
    elif t is list or t is tuple:
        _list(o, out, nl, ind)
    else:
        s = _FAST[t](o) if t in _FAST else _scalar(o)
        if s is not None:
            out.append(s)
        elif isinstance(o, list | tuple):
            _list(o, out, nl, ind)
        elif isinstance(o, dict):
            _dict(o, out, nl, ind)
        else:
            raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def _list(o, out: list[str], nl: str, ind: str) -> None:
    if not o:
        out.append("[]")
        return
    inner = nl + ind
    out.append("[" + inner)
    sep = "," + inner
    kinds = set(map(type, o))
    if kinds == _INT:
        out.append(sep.join(map(int.__repr__, o)))
    elif kinds == _STR:
        out.append(sep.join(map(_string, o)))
    else:
        first = True
        for x in o:
            if not first:
                out.append(sep)
            first = False
            _value(x, out, inner, ind)
    out.append(nl + "]")


def _dict(o, out: list[str], nl: str, ind: str) -> None:
    if not o:
        out.append("{}")
        return
    inner = nl + ind
    out.append("{" + inner)
    sep = "," + inner
    first = True
    fast = _FAST
    for k, v in o.items():
        if not first:
            out.append(sep)
        first = False
        key = _string(k if type(k) is str else _key(k)) + ": "
        t = type(v)
        if t in fast:  # a plain scalar: one append, no call of _value
            out.append(key + fast[t](v))
        else:
            out.append(key)
            _value(v, out, inner, ind)
    out.append(nl + "}")


_INT, _STR = {int}, {str}
# exact types whose text needs no further check (bool, None and subclasses go through _scalar's order)
_FAST = {str: _string, int: int.__repr__, float: _float, bool: lambda b: "true" if b else "false",
         type(None): lambda _: "null"}
