"""Errors pooltrace reports to users as one line (exit code 2), never as a traceback."""


class PooltraceError(Exception):
    """A user-facing error: bad input, unreadable file, bad usage. The CLI prints it and exits 2."""


class TraceError(PooltraceError):
    """The file is not a readable .etl trace (empty, foreign, truncated before any data, corrupt header)."""


class OutputError(PooltraceError):
    """An output cannot be written where the user asked (missing directory, no permission, not ours)."""


class DamagedDataset(PooltraceError):
    """A dataset file that cannot be trusted (tampered, truncated, unreadable); `path` names it. A cache
    beside a trace that fails this way is rebuilt from the trace (cachetrust.rebuild_damaged_caches)."""

    def __init__(self, message: str, path):
        super().__init__(message)
        self.path = path
