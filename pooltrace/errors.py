"""Errors pooltrace reports to users as one line (exit code 2), never as a traceback."""


class PooltraceError(Exception):
    """A user-facing error: bad input, unreadable file, bad usage. The CLI prints it and exits 2."""


class TraceError(PooltraceError):
    """The file is not a readable .etl trace (empty, foreign, truncated before any data, corrupt header)."""


class OutputError(PooltraceError):
    """An output cannot be written where the user asked (missing directory, no permission, not ours)."""
