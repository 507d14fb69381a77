"""The symbol fixtures (tests/fixtures/symbols, built by build.sh with clang + lld) and the sample traces that
use them: every frame of the samples in the fixture images resolves to the function and offset LLVM's tools
read from the PDBs; cross-checks against llvm-pdbutil and llvm-symbolizer where installed; a rebuild where
clang and lld are installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pooltrace.dataset import pair_trace
from pooltrace.modulemap import ModuleMap, frame_text
from pooltrace.symbols import Symbolizer
from pooltrace.symbols.pdbtable import read_pdb
from pooltrace.synthetic import _sites, kernel_modules
from tests.conftest import ROOT
from tests.test_symbols import FX, LAYOUT, expected

TRACES = ROOT / "traces"
IMAGES = {"nt": "ntoskrnl.exe", "leaky": "leaky.sys"}


def test_sample_store_holds_the_fixtures():
    store = TRACES / "symbols"
    for name, img in LAYOUT["images"].items():
        pdb = img["pdb_name"]
        assert (store / pdb / img["pdb_key"] / pdb).read_bytes() == (FX / pdb).read_bytes()
        assert (store / name / img["image_key"] / name).read_bytes() == (FX / name).read_bytes()


def test_synthetic_modules_are_the_fixture_images():
    mods = kernel_modules()
    for key, name in IMAGES.items():
        m, img = mods[key], LAYOUT["images"][name]
        assert (m.name, m.size, m.timedatestamp) == (name, img["size_of_image"], img["timedatestamp"])
        assert (m.pdb, str(m.guid), m.age) == (img["pdb_name"], img["guid"], img["age"])


def test_synthetic_frames_are_return_addresses_after_calls():
    returns = {name: {c["return_rva"]: c for c in img["calls"]} for name, img in LAYOUT["images"].items()}
    for site, spec in _sites().items():
        for mod, rva in spec["frames"]:
            if mod in IMAGES:
                assert rva in returns[IMAGES[mod]], (site, mod, hex(rva))
    sites = _sites()
    callers = {s: [returns["leaky.sys"][rva]["function"] for m, rva in sites[s]["frames"] if m == "leaky"]
               for s in ("leak", "leak_ok", "new_leak")}
    assert callers == {"leak": ["AllocateLeakyBuffer", "DispatchIoctl"],
                       "leak_ok": ["AllocateScratchBuffer", "DispatchIoctl"],
                       "new_leak": ["AllocateTelemetry", "DispatchIoctl"]}
    assert returns["ntoskrnl.exe"][sites["leak"]["frames"][0][1]]["function"] == "ExAllocatePoolWithTag"


@pytest.mark.parametrize("name", ["sample-leak", "sample-leak-fixed"])
def test_every_fixture_frame_of_the_samples_resolves(tmp_path, name):
    """Acceptance: with no flags (the trace's directory holds symbols/), every frame in the fixture images
    resolves to the right function and offset; the merged sample through its PDB identities, the unmerged one
    through the images' TimeDateStamp/SizeOfImage."""
    ds = tmp_path / "ds"
    pair_trace(TRACES / f"{name}.etl", ds)
    modules = pq.read_table(ds / "modules.parquet")
    mm = ModuleMap(modules)
    frames = np.unique(np.concatenate([np.array(f, dtype=np.uint64)
                                       for f in pq.read_table(ds / "stacks.parquet")["frames"].to_pylist()]))
    mod, rva = mm.locate(frames, 4242)
    sym = Symbolizer(modules, symbol_path="", local_dirs=[TRACES, ds], cache_dir=tmp_path / "cache")
    got = sym.lookup(mod, rva)
    checked = 0
    for m, r, a, s in zip(mod.tolist(), rva.tolist(), frames.tolist(), got, strict=True):
        if m < 0 or mm.names[m] not in LAYOUT["images"]:
            continue
        want = expected(LAYOUT["images"][mm.names[m]], r)
        assert want is not None and s == want, frame_text(mm.names[m], r, a, s)
        checked += 1
    assert checked >= 15
    status = {x["module"]: x for x in sym.status()}
    assert status["leaky.sys"]["status"] == status["ntoskrnl.exe"]["status"] == "found"
    texts = {frame_text(mm.names[m], r, a, s)
             for m, r, a, s in zip(mod.tolist(), rva.tolist(), frames.tolist(), got, strict=True) if m >= 0}
    assert {"leaky.sys!AllocateLeakyBuffer+0x22", "leaky.sys!DispatchIoctl+0x2f",
            "ntoskrnl.exe!ExAllocatePoolWithTag+0x4d", "ntoskrnl.exe!IofCallDriver+0x22"} <= texts
    if name == "sample-leak-fixed":
        assert "leaky.sys!AllocateTelemetry+0x1d" in texts


# -- cross-checks with LLVM's tools -------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("llvm-pdbutil") is None, reason="llvm-pdbutil not installed (apt-get install llvm)")
@pytest.mark.parametrize("pdb", ["leaky.pdb", "ntkrnlmp.pdb"])
def test_tables_agree_with_llvm_pdbutil(pdb):
    dump = subprocess.run(["llvm-pdbutil", "dump", "-summary", "-publics", "-symbols", "-section-headers",
                           str(FX / pdb)], capture_output=True, text=True, check=True, timeout=60).stdout
    base = {int(n): int(va, 16) for n, va in re.findall(r"SECTION HEADER #(\d+)\s+\S+ name\s+[0-9A-F]+ virtual size"
                                                      r"\s+([0-9A-F]+) virtual address", dump)}
    procs = {(m[1], base[int(m[2])] + int(m[3])): int(m[4]) for m in re.finditer(
        r"S_[GL]PROC32 \[size = \d+\] `([^`]+)`\s+parent = \d+, end = \d+, addr = (\d+):(\d+), code size = (\d+)",
        dump)}
    publics = {(m[1], base[int(m[2])] + int(m[3])) for m in re.finditer(
        r"S_PUB32 \[size = \d+\] `([^`]+)`\s+flags = [^,]*function[^,]*, addr = (\d+):(\d+)", dump)}
    ident, table = read_pdb(FX / pdb)
    guid = re.search(r"GUID: \{([0-9A-F-]+)\}", dump).group(1).lower()
    assert str(ident.guid) == guid
    for (name, rva), size in procs.items():  # procs: start, every byte, end
        assert table.lookup_one(rva) == (name, 0)
        assert table.lookup_one(rva + size - 1) == (name, size - 1)
    for name, rva in publics:
        assert table.lookup_one(rva)[0] == name
    assert {n for n, _ in procs} | {n for n, _ in publics} == set(table.names)


@pytest.mark.skipif(shutil.which("llvm-symbolizer") is None, reason="llvm-symbolizer not installed")
@pytest.mark.parametrize("image", ["leaky.sys", "ntoskrnl.exe"])
def test_return_addresses_agree_with_llvm_symbolizer(image, tmp_path):
    img = LAYOUT["images"][image]
    for f in (image, img["pdb_name"]):  # llvm-symbolizer finds the PDB beside the image
        shutil.copy(FX / f, tmp_path / f)
    addrs = [c["return_rva"] - 1 for c in img["calls"]]
    out = subprocess.run(["llvm-symbolizer", f"--obj={tmp_path / image}", "--relative-address", "--no-inlines",
                          *[hex(a) for a in addrs]], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path).stdout.split("\n\n")
    theirs = [block.strip().splitlines()[0] for block in out if block.strip()]
    _, table = read_pdb(FX / img["pdb_name"])
    ours = [table.lookup_one(a)[0] for a in addrs]
    assert ours == theirs


@pytest.mark.skipif(not all(shutil.which(t) for t in ("clang", "lld-link", "llvm-pdbutil", "llvm-readobj",
                                                      "llvm-objdump")),
                    reason="clang, lld and llvm are needed to rebuild the fixtures")
def test_rebuild_matches_the_committed_fixtures():
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run(["sh", str(FX / "build.sh")], env={**os.environ, "OUT": out}, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        fresh = json.loads((Path(out) / "layout.json").read_text())
        version = subprocess.run(["clang", "--version"], capture_output=True, text=True).stdout
        for name, img in fresh["images"].items():
            old = LAYOUT["images"][name]
            assert [f["name"] for f in img["functions"]] == [f["name"] for f in old["functions"]]
            assert (img["pdb_name"], img["age"], img["pdb_info_age"], img["public_only"]) == \
                (old["pdb_name"], old["age"], old["pdb_info_age"], old["public_only"])
        if "version 14." in version:  # the toolchain that built the committed files: byte for byte
            for f in ("leaky.sys", "leaky.pdb", "ntoskrnl.exe", "ntkrnlmp.pdb"):
                assert (Path(out) / f).read_bytes() == (FX / f).read_bytes(), f
