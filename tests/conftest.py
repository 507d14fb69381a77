"""Shared fixtures: the real sample traces in ../shared/etl-samples (never copied into the project)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from pooltrace.etl.reader import EtlReader

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = Path(os.environ.get("POOLTRACE_SAMPLES", ROOT.parent / "shared" / "etl-samples"))


@pytest.fixture(scope="session")
def samples() -> Path:
    if not (SAMPLES / "README.md").exists():
        pytest.skip(f"real sample traces not found at {SAMPLES}")
    return SAMPLES


def read_all(path, **kw) -> tuple[EtlReader, dict[str, pa.Table], list[dict[str, pa.Table]]]:
    """Read a whole trace: the reader (header, stats), every table concatenated, and the batches."""
    reader = EtlReader(path, **kw)
    batches = [b.tables for b in reader.batches()]
    reader.close()
    names = {n for b in batches for n in b}
    tables = {n: pa.concat_tables([b[n] for b in batches if n in b]) for n in names}
    return reader, tables, batches
