"""Provoke pool tag ``File`` from user mode: create, write and close files in a directory for a while.

Each CreateFile makes the I/O manager allocate a file object (pool tag ``File``) and the last CloseHandle
frees it. ``pooltrace doctor`` runs this as the command of its test recording; the Windows workflow runs it
under ``pooltrace record --tag File``::

    python -m pooltrace.collector.provoke DIRECTORY SECONDS
"""

from __future__ import annotations

import contextlib
import os
import sys
import time


def provoke(directory: str, seconds: float, files: int = 64) -> int:
    """Returns how many files were created and closed; removes them afterwards."""
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        with open(os.path.join(directory, f"pooltrace-provoke-{n % files}.tmp"), "wb") as f:
            f.write(b"x")
        n += 1
    for i in range(min(n, files)):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(directory, f"pooltrace-provoke-{i}.tmp"))
    return n


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m pooltrace.collector.provoke DIRECTORY SECONDS")
    provoke(sys.argv[1], float(sys.argv[2]))
