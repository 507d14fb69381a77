"""Shared fixtures: the real sample traces in ../shared/etl-samples (never copied into the project)."""

from __future__ import annotations

import os
import shutil
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


def pair_sample(tmp_path_factory, sample: Path) -> Path:
    """`pooltrace pair SAMPLE -o <tmp>/ds` (asserted to succeed): the dataset directory."""
    from click.testing import CliRunner

    from pooltrace.cli import cli

    out = tmp_path_factory.mktemp("paired") / "ds"
    r = CliRunner().invoke(cli, ["pair", str(sample), "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def shipped(tmp_path_factory) -> Path:
    """A private copy of the shipped traces/ (traces, truth files, sample PDBs): commands that pair an .etl on
    the fly write their `<trace>.pooltrace/` cache beside it, and tests must never write into the source tree."""
    dest = tmp_path_factory.mktemp("shipped") / "traces"
    shutil.copytree(ROOT / "traces", dest, ignore=shutil.ignore_patterns("*.pooltrace", "__pycache__"))
    return dest


@pytest.fixture(scope="session", autouse=True)
def source_tree_untouched():
    """Fails the run if a test left files in traces/ or in the real samples' folder (e.g. a dataset cache
    beside a trace: CI runs as root, so the samples' missing write bits do not stop it)."""
    watched = [ROOT / "traces"] + ([SAMPLES] if SAMPLES.is_dir() else [])
    before = [{p.name for p in d.iterdir()} for d in watched]
    yield
    for d, names in zip(watched, before, strict=True):
        after = {p.name for p in d.iterdir()}
        assert after <= names, f"tests wrote into {d}: {sorted(after - names)}"
