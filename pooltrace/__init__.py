"""pooltrace: find Windows kernel pool leaks down to the call stack, from .etl traces, on any OS."""

__version__ = "0.1.0"
