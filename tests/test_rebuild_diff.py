"""`diff` across a rebuild: two traces of the fixture driver, the shipped build (tests/fixtures/symbols) and
its -O0 rebuild (tests/fixtures/leaky-rebuild, every call site at another offset, another PDB), match every
symbolized group by `module!function`, with the planted statuses; pprof names functions without offsets
and puts the offsets in addresses, one mapping per module."""

from __future__ import annotations

import json
import re
import shutil
import uuid

import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from pooltrace.synthetic import NONPAGED_NX, NT_ALLOC, PAGED, SYSCALL_TAIL, Module, kernel_modules
from pooltrace.synthetic_growth import Site, write_planted
from tests.conftest import ROOT

FX = ROOT / "tests" / "fixtures"
BUILDS = {"base": FX / "symbols", "new": FX / "leaky-rebuild"}
# planted outstanding blocks per call site: (base, new) -> status
PLAN = {"leak": ((300, 300), "same"), "scratch": ((60, 20), "shrunk"), "telemetry": ((40, 90), "grown"),
        "kernel": ((100, 100), "same")}
FUNCS = {"leak": "AllocateLeakyBuffer", "scratch": "AllocateScratchBuffer", "telemetry": "AllocateTelemetry"}


def calls(layout: dict) -> dict[str, tuple[int, int]]:
    """Per allocating function: (return rva of its ExAllocatePoolWithTag call, return rva of DispatchIoctl's
    call to it), read from the build's layout (llvm-objdump), not from pooltrace."""
    img = layout["images"]["leaky.sys"]
    funcs = sorted(img["functions"], key=lambda f: f["rva"])

    def owner(rva: int) -> str:
        return [f["name"] for f in funcs if f["rva"] <= rva][-1]

    out = {}
    for key, name in FUNCS.items():
        alloc = next(c["return_rva"] for c in img["calls"] if c["function"] == name and "*" in c["insn"])
        caller = next(c["return_rva"] for c in img["calls"] if c["function"] == "DispatchIoctl" and owner(
            int(re.search(r"0x([0-9a-f]+)", c["insn"].split("callq", 1)[1]).group(1), 16) - img["image_base"]) == name)
        out[key] = (alloc, caller)
    return out


def trace(side: str, out_dir):
    layout = json.loads((BUILDS[side] / "layout.json").read_text())
    img = layout["images"]["leaky.sys"]
    mods = kernel_modules(0 if side == "base" else 0x3400000)  # another boot, too
    leaky = mods["leaky"]
    mods["leaky"] = Module(leaky.name, leaky.base, img["size_of_image"], leaky.path, "leaky.pdb",
                           uuid.UUID(img["guid"]), img["age"], img["timedatestamp"])
    sites = {}
    c = calls(layout)
    k = 0 if side == "base" else 1
    for key, ((nb, nn), _) in PLAN.items():
        n = (nb, nn)[k]
        frames = ([NT_ALLOC, ("leaky", c[key][0]), ("leaky", c[key][1]), ("nt", 0x1142)] if key in c else
                  [NT_ALLOC, ("nt", 0x1287), ("nt", 0x12A5), ("nt", 0x12E4)]) + SYSCALL_TAIL
        sites[key] = Site("Leak" if key != "kernel" else "MmSt", NONPAGED_NX if key != "kernel" else PAGED, 0x40,
                          frames, [1000 * i for i in range(n)], [None] * n)
    w, truth = write_planted(sites, mods, duration_s=2.0)
    out_dir.mkdir()
    path = out_dir / f"{side}.etl"
    w.save(path)
    for pdb in (BUILDS[side] / "leaky.pdb", FX / "symbols" / "ntkrnlmp.pdb"):
        shutil.copy(pdb, out_dir / pdb.name)  # beside the trace: found by identity, like a user's own build
    return path, c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("rebuild")
    (base, cb), (new, cn) = trace("base", d / "base"), trace("new", d / "new")
    assert all(cb[k] != cn[k] for k in FUNCS)  # every call site moved
    return base, new, cn


def diff(*args):
    r = CliRunner().invoke(cli, ["diff", *map(str, args)])
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("by", ["function", "stack"])
def test_every_symbolized_group_matches_across_the_rebuild(runs, by):
    base, new, _ = runs
    data = json.loads(diff(base, new, "--by", by, "--format", "json"))
    got = {}
    for g in data["groups"]:
        site = next((k for k, f in FUNCS.items() if any(f"!{f}" in x for x in g["frames"])), "kernel")
        got[site] = (g["status"], g["base_count"], g["new_count"])
    assert got == {k: (status, n[0], n[1]) for k, (n, status) in PLAN.items()}
    shown = {f for g in data["groups"] for f in g["frames"]}
    if by == "stack":  # NEW's frames are shown, offsets included
        off = runs[2]["leak"][0] - 0x1000  # AllocateLeakyBuffer starts at 0x1000 in both builds
        assert f"leaky.sys!AllocateLeakyBuffer+0x{off:x}" in shown


def test_without_symbols_a_rebuild_does_not_match(runs):
    base, new, _ = runs
    data = json.loads(diff(base, new, "--by", "function", "--format", "json", "--no-symbols"))
    leaky = [g["status"] for g in data["groups"] if g["frames"][0].startswith("leaky.sys")]
    assert sorted(leaky) == ["gone"] * 3 + ["new"] * 3


def test_pprof_functions_without_offsets_addresses_and_one_mapping_per_module(runs, tmp_path):
    pytest.importorskip("google.protobuf")
    from tests.pprof_proto import read_profile

    base, new, cn = runs
    out = tmp_path / "new.pb.gz"
    r = CliRunner().invoke(cli, ["report", str(new), "--format", "pprof", "-o", str(out)])
    assert r.exit_code == 0, r.output
    p = read_profile(out.read_bytes())
    s = list(p.string_table)
    names = {f.id: s[f.name] for f in p.function}
    assert not any("+0x" in n and "!" in n for n in names.values())
    assert {"leaky.sys!AllocateLeakyBuffer", "leaky.sys!DispatchIoctl", "ntoskrnl.exe!ExAllocatePoolWithTag"} <= set(
        names.values())
    maps = {m.id: s[m.filename] for m in p.mapping}
    assert sorted(maps.values()) == ["leaky.sys", "ntoskrnl.exe"] and all(m.has_functions for m in p.mapping)
    at = {(names[loc.line[0].function_id], loc.address): maps[loc.mapping_id] for loc in p.location}
    assert at[("leaky.sys!AllocateLeakyBuffer", cn["leak"][0])] == "leaky.sys"  # the offset in the module
    assert at[("leaky.sys!DispatchIoctl", cn["telemetry"][1])] == "leaky.sys"
    # one function per name, several locations (DispatchIoctl calls three sites)
    assert len([k for k in at if k[0] == "leaky.sys!DispatchIoctl"]) == 3
    # the differential profile: NEW minus BASE, per function across the builds
    out = tmp_path / "d.pb.gz"
    r = CliRunner().invoke(cli, ["diff", str(base), str(new), "--by", "stack", "--format", "pprof", "-o", str(out)])
    assert r.exit_code == 0, r.output
    d = read_profile(out.read_bytes())
    s = list(d.string_table)
    names = {f.id: s[f.name] for f in d.function}
    locs = {loc.id: names[loc.line[0].function_id] for loc in d.location}
    delta = {}
    for smp in d.sample:
        site = next(k for k, f in FUNCS.items() if f"leaky.sys!{f}" in [locs[i] for i in smp.location_id])
        delta[site] = list(smp.value)
    assert delta == {"scratch": [-40, -40 * 0x40], "telemetry": [50, 50 * 0x40]}
