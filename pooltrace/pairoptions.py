"""Defaults of `pair`'s options, importable without numpy or pyarrow: the command line reads them before it
loads the pairing code (pooltrace.dataset)."""

DEFAULT_WINDOW_S = 2.0  # seconds of trace time a late stack part (user-mode half) may follow its event
