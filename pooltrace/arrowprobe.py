"""Keep pyarrow from importing pandas just to find out whether it is installed.

pyarrow probes for pandas the first time it converts anything (``to_numpy``, ``pa.array``) and imports
it then: 0.3-0.5 s and 50 MB for commands that never build a DataFrame. ``skip_pandas_probe()`` lets that
probe see no pandas, without importing it. pyarrow retries the import whenever pandas is really needed
(``to_pandas``, ``Table.from_pandas``), so DataFrames still work afterwards.
"""

from __future__ import annotations

import sys


def skip_pandas_probe() -> None:
    """Answer pyarrow's pandas probe with 'absent' (no-op when pandas is already imported)."""
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    blocker = _NoPandas()
    sys.meta_path.insert(0, blocker)  # `import pandas` fails at once, only for the probe below
    try:
        pa.array([0])  # runs the probe once; pyarrow remembers its answer
    finally:
        sys.meta_path.remove(blocker)


class _NoPandas:
    """An import finder that refuses pandas."""

    def find_spec(self, name: str, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas import skipped for pyarrow's probe")
        return None
