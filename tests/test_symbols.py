"""Symbols offline: the PE and PDB readers against what LLVM's tools read from the committed fixtures
(layout.json), function tables (statics, public-only bounds, return addresses), the symbol path syntax, local
stores (plain, two-tier, case-insensitive, file.ptr, .pd_), the identity checks, the parsed-table cache, and
untrusted names from the trace."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import cabarchive
import numpy as np
import pyarrow as pa
import pytest

from pooltrace.datasetschema import MODULES_SCHEMA
from pooltrace.errors import PooltraceError
from pooltrace.pe import parse_pe
from pooltrace.symbols import Symbolizer, pdbtable
from pooltrace.symbols import store as store_mod
from pooltrace.symbols.names import image_key, inside, pdb_key, safe_file_name, undecorate
from pooltrace.symbols.pdbtable import FunctionTable, build_partition, read_pdb
from pooltrace.symbols.store import CabError, expand_cab
from pooltrace.symbols.symbolpath import Entry, Store, SymbolPathError, parse_symbol_path
from tests.conftest import ROOT

FX = ROOT / "tests" / "fixtures" / "symbols"
LAYOUT = json.loads((FX / "layout.json").read_text())
LEAKY, NT = LAYOUT["images"]["leaky.sys"], LAYOUT["images"]["ntoskrnl.exe"]
K = 0xFFFFF80412000000


def module_row(img: dict, name: str, base: int, *, identity: bool = True, **over) -> dict:
    row = {"base": base, "size": img["size_of_image"], "name": name, "path": "\\x\\" + name, "pid": 0,
           "timedatestamp": img["timedatestamp"], "checksum": 0,
           "pdb_name": img["pdb_name"] if identity else None, "pdb_guid": img["guid"] if identity else None,
           "pdb_age": img["age"] if identity else None, "load_ns": None, "unload_ns": None}
    row.update(over)
    return row


def modules(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=MODULES_SCHEMA)


def fixture_modules(**kw) -> pa.Table:
    return modules(module_row(NT, "ntoskrnl.exe", K, **kw), module_row(LEAKY, "leaky.sys", K + 0x2000000, **kw))


def pdb_dir(tmp_path: Path, *names: str) -> Path:
    d = tmp_path / "pdbs"
    d.mkdir(exist_ok=True)
    for n in names:
        shutil.copy(FX / n, d / n)
    return d


def sym(tmp_path, mods=None, **kw) -> Symbolizer:
    kw.setdefault("symbol_path", "")
    kw.setdefault("cache_dir", tmp_path / "cache")
    return Symbolizer(fixture_modules() if mods is None else mods, **kw)


def expected(img: dict, rva: int, return_address: bool = True) -> tuple[str, int] | None:
    """The function holding rva (rva-1 for return addresses) by LLVM's reading of the PDB and .pdata."""
    look = rva - 1 if return_address and rva else rva
    sect = next(s for s in img["sections"] if s["name"] == ".text")
    funcs = img["functions"]
    for i, f in enumerate(funcs):
        size = f["size"]
        if size is None:  # public: up to the next function or the end of .text
            nxt = funcs[i + 1]["rva"] if i + 1 < len(funcs) else sect["rva"] + sect["virtual_size"]
            size = min(nxt, sect["rva"] + sect["virtual_size"]) - f["rva"]
        if f["rva"] <= look < f["rva"] + size:
            return f["name"], rva - f["rva"]
    return None


# -- names and keys -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "safe"), [
    ("leaky.pdb", "leaky.pdb"), (r"d:\os\obj\amd64fre\ntkrnlmp.pdb", "ntkrnlmp.pdb"), ("/build/x/y.pdb", "y.pdb"),
    (r"C:\Windows\System32\evil.pdb", "evil.pdb"), (r"..\..\x.pdb", None), ("../../x.pdb", None),
    (r"a\..\x.pdb", None), ("..", None), (".", None), ("", None), ("x\0.pdb", None), ("x\n.pdb", None),
    ("c:x.pdb", None), ("x.pdb:stream", None), ("NUL.pdb", None), ("con", None), ("x.pdb.", None),
    ("x.pdb ", None), ("x" * 300 + ".pdb", None), ("a/b\\", None), (None, None), ("x?.pdb", None),
])
def test_safe_file_name(raw, safe):
    assert safe_file_name(raw) == safe


def test_keys():
    assert pdb_key(uuid.UUID("b783d4ac-c59c-7961-4c4c-44205044422e"), 1) == "B783D4ACC59C79614C4C44205044422E1"
    assert pdb_key("8ac9c1fc-370f-91ac-4c4c-44205044422e", 0x1A) == "8AC9C1FC370F91AC4C4C44205044422E1A"
    assert image_key(0x8A0464A9, 0x5000) == "8A0464A95000" and image_key(0x5BEDC147, 0x1C98000) == "5BEDC1471c98000"
    assert LEAKY["pdb_key"] == pdb_key(LEAKY["guid"], LEAKY["age"])
    assert LEAKY["image_key"] == image_key(LEAKY["timedatestamp"], LEAKY["size_of_image"])


def test_undecorate_simple_names_only():
    assert undecorate("?Track@PoolTracker@Nt@@SAK_KK@Z") == "Nt::PoolTracker::Track"
    assert undecorate("ExAllocatePoolWithTag") == "ExAllocatePoolWithTag"
    assert undecorate("??0PoolTracker@@QEAA@XZ") == "??0PoolTracker@@QEAA@XZ"  # constructors etc.: unchanged
    assert undecorate("?$Tmpl@H@@") == "?$Tmpl@H@@"


def test_inside():
    assert inside("/a/b", "/a/b/c/d") and inside("/a/b", "/a/b")
    assert not inside("/a/b", "/a/bc") and not inside("/a/b", "/a/b/../c")


# -- PE -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["leaky.sys", "ntoskrnl.exe"])
def test_pe_identity_matches_llvm_readobj(name):
    img = LAYOUT["images"][name]
    pe = parse_pe(FX / name)
    assert (pe.timedatestamp, pe.size_of_image, pe.image_base) == (img["timedatestamp"], img["size_of_image"],
                                                                    img["image_base"])
    assert pe.machine == 0x8664 and pe.pe32_plus
    assert str(pe.codeview.guid) == img["guid"] and pe.codeview.age == img["age"]
    assert pe.codeview.pdb_path == img["pdb_name"]
    assert [s.name for s in pe.sections][:2] == [".text", ".rdata"] and pe.sections[0].executable


@pytest.mark.parametrize("data", [b"", b"MZ", b"MZ" + b"\0" * 58 + b"\xff\xff\xff\x7f", b"\x7fELF" + b"\0" * 100])
def test_pe_rejects_garbage(tmp_path, data):
    from pooltrace.pe import PeError, read_identity

    p = tmp_path / "x.sys"
    p.write_bytes(data)
    with pytest.raises((PeError, OSError)):
        parse_pe(p)
    assert read_identity(p) is None


def test_pe_truncated_fixture(tmp_path):
    from pooltrace.pe import read_identity

    data = (FX / "leaky.sys").read_bytes()
    for cut in (0x40, 0x100, 0x180, 0x200, 0x300, 0x600):
        p = tmp_path / f"cut{cut}.sys"
        p.write_bytes(data[:cut])
        read_identity(p)  # never raises


# -- PDB tables ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["leaky.sys", "ntoskrnl.exe"])
def test_pdb_identity_is_the_dbi_age(name):
    img = LAYOUT["images"][name]
    ident, table = read_pdb(FX / img["pdb_name"])
    assert str(ident.guid) == img["guid"] and ident.age == img["age"] and ident.info_age == img["pdb_info_age"]
    assert table.meta["public_only"] == img["public_only"]
    assert sorted(table.names) == sorted(f["name"] for f in img["functions"])


@pytest.mark.parametrize("name", ["leaky.sys", "ntoskrnl.exe"])
def test_every_rva_resolves_like_llvm_reads_the_pdb(name):
    img = LAYOUT["images"][name]
    _, table = read_pdb(FX / img["pdb_name"])
    text = next(s for s in img["sections"] if s["name"] == ".text")
    for rva in range(0x0FF0, text["rva"] + text["virtual_size"] + 0x40):
        for ra in (False, True):
            look = rva - 1 if ra else rva
            got = table.lookup_one(look)
            got = None if got is None else (got[0], rva - (look - got[1]))
            assert got == expected(img, rva, ra), (name, hex(rva), ra)


def test_static_functions_come_from_module_symbols():
    _, table = read_pdb(FX / "leaky.pdb")
    compute = next(f for f in LEAKY["functions"] if f["name"] == "ComputeLeakSize")
    assert compute["source"] == "static proc"  # llvm-pdbutil: S_LPROC32, not in the publics
    assert table.lookup_one(compute["rva"] + 5) == ("ComputeLeakSize", 5)
    dispatch = next(f for f in LEAKY["functions"] if f["name"] == "DispatchIoctl")
    assert table.lookup_one(dispatch["rva"] + 0x2F) == ("DispatchIoctl", 0x2F)
    # past the end of a proc (padding between functions) is no function
    alloc = next(f for f in LEAKY["functions"] if f["name"] == "AllocateLeakyBuffer")
    assert table.lookup_one(alloc["rva"] + alloc["size"]) is None


def test_public_only_bounds_end_at_the_code_section():
    _, table = read_pdb(FX / "ntkrnlmp.pdb")
    text = next(s for s in NT["sections"] if s["name"] == ".text")
    end = text["rva"] + text["virtual_size"]
    assert table.lookup_one(end - 1)[0] == "KiSystemStartup"
    assert table.lookup_one(end) is None and table.lookup_one(0x3000) is None and table.lookup_one(0) is None


def test_partition_innermost_wins_and_gaps():
    seg, func = build_partition([(10, 100, 0), (20, 30, 1), (40, 60, 2), (50, 55, 3), (200, 210, 4)])
    t = FunctionTable(seg, func, np.array([10, 20, 40, 50, 200], np.uint64), ["a", "b", "c", "d", "e"])
    got = [t.lookup_one(x) for x in (9, 10, 25, 30, 45, 52, 56, 60, 99, 100, 205, 210)]
    assert got == [None, ("a", 0), ("b", 5), ("a", 20), ("c", 5), ("d", 2), ("c", 16), ("a", 50), ("a", 89), None,
                   ("e", 5), None]


def test_table_cache_round_trip(tmp_path):
    _, table = read_pdb(FX / "leaky.pdb")
    table.save(tmp_path / "t.npz")
    back = FunctionTable.load(tmp_path / "t.npz")
    assert back.names == table.names and (back.seg_start == table.seg_start).all()
    assert (back.seg_func == table.seg_func).all() and back.meta["guid"] == LEAKY["guid"]
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    assert FunctionTable.load(tmp_path / "bad.npz") is None
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# -- Symbolizer ---------------------------------------------------------------------------------------------
def test_lookup_fixture_frames_with_local_dir(tmp_path):
    d = pdb_dir(tmp_path, "leaky.pdb", "ntkrnlmp.pdb")
    s = sym(tmp_path, local_dirs=[d])
    calls = {(c["function"], c["return_offset"]): c["return_rva"] for c in LEAKY["calls"]}
    rows = np.array([0, 1, 1, 1, -1, 1], dtype=np.int64)
    rvas = np.array([0x108D, calls[("AllocateLeakyBuffer", 0x22)], calls[("DispatchIoctl", 0x2F)], 0x3000, 5,
                     0x1000], dtype=np.uint64)
    got = s.lookup(rows, rvas)
    assert got == [("ExAllocatePoolWithTag", 0x4D), ("AllocateLeakyBuffer", 0x22), ("DispatchIoctl", 0x2F), None,
                   None, None]  # 0x1000 as a return address is the byte before the first function
    assert s.lookup(rows[-1:], rvas[-1:], return_address=False) == [("AllocateLeakyBuffer", 0)]
    per_frame = s.lookup(np.array([1, 1]), np.array([0x1000, 0x1000], np.uint64), np.array([False, True]))
    assert per_frame == [("AllocateLeakyBuffer", 0), None]
    st = {x["module"]: x for x in s.status()}
    assert st["leaky.sys"]["status"] == "found" and st["leaky.sys"]["source"] == str(d / "leaky.pdb")
    assert st["leaky.sys"]["pdb_age"] == 2 and "full symbols" in st["leaky.sys"]["detail"]
    assert st["ntoskrnl.exe"]["status"] == "found" and "public symbols only" in st["ntoskrnl.exe"]["detail"]


def test_lookup_edge_inputs(tmp_path):
    s = sym(tmp_path, local_dirs=[pdb_dir(tmp_path, "leaky.pdb")])
    assert s.lookup(np.zeros(0, np.int64), np.zeros(0, np.uint64)) == []
    assert s.lookup(np.array([7, -1]), np.array([1, 2], np.uint64)) == [None, None]  # row out of range
    with pytest.raises(ValueError):
        s.lookup(np.array([1]), np.array([1, 2], np.uint64))


def test_nothing_is_looked_up_for_modules_never_asked(tmp_path):
    s = sym(tmp_path, local_dirs=[pdb_dir(tmp_path, "leaky.pdb", "ntkrnlmp.pdb")])
    s.lookup(np.array([1]), np.array([0x1022], np.uint64))
    assert [x["module"] for x in s.status()] == ["leaky.sys"]
    assert not (tmp_path / "cache" / "tables" / "ntkrnlmp.pdb").exists()


def test_disabled_touches_no_file(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("file access with --no-symbols")

    monkeypatch.setattr(pdbtable.FunctionTable, "load", boom)
    monkeypatch.setattr(store_mod.Locator, "find", boom)
    s = sym(tmp_path, enabled=False, local_dirs=[pdb_dir(tmp_path, "leaky.pdb")])
    assert s.lookup(np.array([0, 1]), np.array([0x108D, 0x1022], np.uint64)) == [None, None]
    assert {x["status"] for x in s.status()} == {"disabled"}
    assert not (tmp_path / "cache").exists()


def test_second_run_uses_the_cached_table(tmp_path, monkeypatch):
    d = pdb_dir(tmp_path, "leaky.pdb")
    first = sym(tmp_path, local_dirs=[d]).lookup(np.array([1]), np.array([0x1022], np.uint64))

    def no_parse(*a, **k):
        raise AssertionError("re-parsed the PDB")

    monkeypatch.setattr("pooltrace.symbols.read_pdb", no_parse)
    (d / "leaky.pdb").unlink()  # the cached table is keyed by the PDB identity; the file is not needed
    s = sym(tmp_path, local_dirs=[d])
    assert s.lookup(np.array([1]), np.array([0x1022], np.uint64)) == first == [("AllocateLeakyBuffer", 0x22)]
    assert "cached table" in s.status()[0]["detail"]


def test_pooltrace_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("POOLTRACE_CACHE", str(tmp_path / "envcache"))
    s = Symbolizer(fixture_modules(), symbol_path="", local_dirs=[pdb_dir(tmp_path, "leaky.pdb")])
    s.lookup(np.array([1]), np.array([0x1022], np.uint64))
    assert (tmp_path / "envcache" / "tables" / "leaky.pdb" / LEAKY["pdb_key"]).is_dir()


def test_mismatched_pdb_is_refused(tmp_path):
    warnings = []
    d = pdb_dir(tmp_path, "leaky.pdb")
    for age in (1, 3):  # 3 is the info stream's age: matching must use the DBI age
        mods = modules(module_row(LEAKY, "leaky.sys", K, pdb_age=age))
        s = sym(tmp_path, mods, local_dirs=[d], warn=warnings.append)
        assert s.lookup(np.array([0]), np.array([0x1022], np.uint64)) == [None]
        st = s.status()[0]
        assert st["status"] == "mismatch" and st["source"] is None
        assert f"age {age}" in st["detail"] and "age 2" in st["detail"]
    mods = modules(module_row(LEAKY, "leaky.sys", K, pdb_guid=str(uuid.UUID(int=1))))
    s = sym(tmp_path, mods, local_dirs=[d], warn=warnings.append)
    assert s.lookup(np.array([0]), np.array([0x1022], np.uint64)) == [None] and s.status()[0]["status"] == "mismatch"
    assert any("does not match" in w and "not used" in w for w in warnings)


def test_mismatch_then_match_further_on(tmp_path):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    shutil.copy(FX / "ntkrnlmp.pdb", wrong / "leaky.pdb")  # right name, wrong PDB
    right = pdb_dir(tmp_path, "leaky.pdb")
    s = sym(tmp_path, local_dirs=[wrong], symbol_path=str(right))
    assert s.lookup(np.array([1]), np.array([0x1022], np.uint64)) == [("AllocateLeakyBuffer", 0x22)]
    assert s.status()[0]["source"] == str(right / "leaky.pdb")


def test_not_a_pdb_is_skipped(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "leaky.pdb").write_bytes(b"Microsoft C/C++ MSF 7.00\r\n\x1aDS\0\0\0" + b"\xff" * 100)
    warnings = []
    s = sym(tmp_path, local_dirs=[d], warn=warnings.append)
    assert s.lookup(np.array([1]), np.array([0x1022], np.uint64)) == [None]
    assert s.status()[0]["status"] == "not found" and any("not used" in w for w in warnings)


def test_unmerged_trace_identity_from_the_image(tmp_path):
    store = tmp_path / "trace" / "symbols"
    for name, key in (("leaky.sys", LEAKY["image_key"]), ("leaky.pdb", LEAKY["pdb_key"])):
        (store / name / key).mkdir(parents=True)
        shutil.copy(FX / name, store / name / key / name)
    mods = modules(module_row(LEAKY, "leaky.sys", K, identity=False))
    s = sym(tmp_path, mods, local_dirs=[tmp_path / "trace"])
    assert s.lookup(np.array([0]), np.array([0x1022], np.uint64)) == [("AllocateLeakyBuffer", 0x22)]
    st = s.status()[0]
    assert st["status"] == "found" and st["pdb_name"] == "leaky.pdb" and st["pdb_guid"] == LEAKY["guid"]
    assert "identity from the image" in st["detail"]
    # the image's identity is remembered: a second run needs neither the image nor the PDB
    shutil.rmtree(store)
    s = sym(tmp_path, mods, local_dirs=[tmp_path / "trace"])
    assert s.lookup(np.array([0]), np.array([0x1022], np.uint64)) == [("AllocateLeakyBuffer", 0x22)]


def test_whose_json_names_the_symbol_files_used_now_not_where_the_cache_was_built(shipped, tmp_path, monkeypatch):
    """QA: `whose --format json` gave a cached table's `source` as the PDB it was first built from, in the
    checkout that built it (gone or elsewhere). Now the cached table itself, and no path of that checkout."""
    import json

    from click.testing import CliRunner

    from pooltrace.cli import cli

    monkeypatch.setenv("POOLTRACE_CACHE", str(tmp_path / "cache"))
    first, now = tmp_path / "first", tmp_path / "now"
    for d in (first, now):
        shutil.copytree(shipped, d, ignore=shutil.ignore_patterns("*.pooltrace"))

    def symbols(root):
        r = CliRunner().invoke(cli, ["whose", "Leak", str(root / "sample-leak.etl"), "--format", "json", "--no-scan"])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)["trace"]["symbols"]

    built = [s for s in symbols(first) if s["status"] == "found"]
    assert built and all(s["source"].startswith(str(first)) for s in built)  # read from the PDBs beside the trace
    shutil.rmtree(first)
    used = [s for s in symbols(now) if s["status"] == "found"]
    assert {s["module"] for s in used} == {s["module"] for s in built}
    for s in used:
        assert Path(s["source"]).is_file() and Path(s["source"]).is_relative_to(tmp_path / "cache"), s
        assert "cached table" in s["detail"] and str(first) not in s["detail"], s


def test_unmerged_trace_image_with_other_stamp_is_not_used(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(FX / "leaky.sys", d / "leaky.sys")
    shutil.copy(FX / "leaky.pdb", d / "leaky.pdb")
    mods = modules(module_row(LEAKY, "leaky.sys", K, identity=False, timedatestamp=0x12345678))
    s = sym(tmp_path, mods, local_dirs=[d])
    assert s.lookup(np.array([0]), np.array([0x1022], np.uint64)) == [None]
    assert s.status()[0]["status"] == "mismatch"
    mods = modules(module_row(LEAKY, "leaky.sys", K, identity=False, timedatestamp=0))
    s = sym(tmp_path, mods, local_dirs=[d])
    assert s.lookup(np.array([0]), np.array([0x1022], np.uint64)) == [None]
    assert s.status()[0]["status"] == "no identity"


def test_windows_system_dirs_identify_local_images(tmp_path, monkeypatch):
    sysdir = tmp_path / "System32" / "drivers"
    sysdir.mkdir(parents=True)
    shutil.copy(FX / "leaky.sys", sysdir / "leaky.sys")
    monkeypatch.setattr("pooltrace.symbols.system_image_dirs", lambda: [sysdir])
    mods = modules(module_row(LEAKY, "leaky.sys", K, identity=False))
    s = sym(tmp_path, mods, local_dirs=[pdb_dir(tmp_path, "leaky.pdb")])
    assert s.lookup(np.array([0]), np.array([0x1022], np.uint64)) == [("AllocateLeakyBuffer", 0x22)]


# -- local stores -------------------------------------------------------------------------------------------
def put(root: Path, name: str, key: str, data: bytes, leaf: str | None = None) -> Path:
    p = root / name / key / (leaf or name)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def cab(data: bytes, name: str) -> bytes:
    arc = cabarchive.CabArchive()
    arc[name] = cabarchive.CabFile(data)
    return arc.save(compress=True)


def test_local_store_variants(tmp_path):
    leaky, nt = (FX / "leaky.pdb").read_bytes(), (FX / "ntkrnlmp.pdb").read_bytes()
    a = tmp_path / "a"  # lower-case key and a case-changed name: Linux caches are case-sensitive
    put(a, "LEAKY.PDB", LEAKY["pdb_key"].lower(), leaky, "Leaky.pdb")
    b = tmp_path / "b"  # two-tier store, compressed
    (b / "index2.txt").parent.mkdir(parents=True)
    (b / "index2.txt").write_text("")
    put(b / "nt", "ntkrnlmp.pdb", NT["pdb_key"], cab(nt, "ntkrnlmp.pdb"), "ntkrnlmp.pd_")
    cache = tmp_path / "cache"
    s = sym(tmp_path, symbol_path=f"cache*{cache};srv*{a};SRV*{b}")
    got = s.lookup(np.array([0, 1]), np.array([0x108D, 0x1022], np.uint64))
    assert got == [("ExAllocatePoolWithTag", 0x4D), ("AllocateLeakyBuffer", 0x22)]
    # copied into the cache, canonical form, uncompressed
    assert (cache / "leaky.pdb" / LEAKY["pdb_key"] / "leaky.pdb").read_bytes() == leaky
    assert (cache / "ntkrnlmp.pdb" / NT["pdb_key"] / "ntkrnlmp.pdb").read_bytes() == nt
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]


def test_file_ptr_and_msg(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(FX / "leaky.pdb", elsewhere / "build-output.pdb")
    st = tmp_path / "st"
    put(st, "leaky.pdb", LEAKY["pdb_key"], f"PATH:{elsewhere / 'build-output.pdb'}\r\n".encode(), "file.ptr")
    put(st, "ntkrnlmp.pdb", NT["pdb_key"], b"MSG: withheld by policy", "file.ptr")
    warnings = []
    s = sym(tmp_path, symbol_path=f"srv*{tmp_path / 'down'}*{st}", warn=warnings.append)
    assert s.lookup(np.array([1, 0]), np.array([0x1022, 0x108D], np.uint64)) == [("AllocateLeakyBuffer", 0x22), None]
    assert (tmp_path / "down" / "leaky.pdb" / LEAKY["pdb_key"] / "leaky.pdb").exists()
    assert any("withheld by policy" in w for w in warnings)


def test_plain_directory_layouts(tmp_path):
    d = tmp_path / "d"
    (d / "symbols" / "pdb").mkdir(parents=True)
    shutil.copy(FX / "leaky.pdb", d / "symbols" / "pdb" / "leaky.pdb")
    (d / "pdb").mkdir()
    shutil.copy(FX / "ntkrnlmp.pdb", d / "pdb" / "ntkrnlmp.pdb")
    s = sym(tmp_path, symbol_path=str(d))
    assert s.lookup(np.array([0, 1]), np.array([0x108D, 0x1022], np.uint64)) == [("ExAllocatePoolWithTag", 0x4D),
                                                                             ("AllocateLeakyBuffer", 0x22)]


def test_cab_lzx_without_tools_says_what_to_install(tmp_path, monkeypatch):
    data = bytearray(cab(b"x" * 100, "a.pdb"))
    data[36 + 6] = 3  # CFFOLDER.typeCompress = LZX
    src = tmp_path / "a.pd_"
    src.write_bytes(bytes(data))
    monkeypatch.setattr(store_mod.shutil, "which", lambda name: None)
    with pytest.raises(CabError, match="install cabextract"):
        expand_cab(src, tmp_path / "out")


def test_cab_round_trip(tmp_path):
    src = tmp_path / "a.pd_"
    src.write_bytes(cab((FX / "leaky.pdb").read_bytes(), "leaky.pdb"))
    expand_cab(src, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == (FX / "leaky.pdb").read_bytes()


@pytest.mark.skipif(shutil.which("cabextract") is None, reason="cabextract not installed")
def test_cab_falls_back_to_cabextract(tmp_path, monkeypatch):
    import cabarchive as real

    src = tmp_path / "a.pd_"
    src.write_bytes(cab((FX / "leaky.pdb").read_bytes(), "leaky.pdb"))

    class Unsupported(real.CabArchive):
        def __init__(self, *a, **k):
            raise real.NotSupportedError("LZX compression not supported")

    monkeypatch.setattr(real, "CabArchive", Unsupported)
    expand_cab(src, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == (FX / "leaky.pdb").read_bytes()


# -- symbol path syntax -------------------------------------------------------------------------------------
def test_symbol_path_parsing(tmp_path):
    d = tmp_path / "default"
    e = parse_symbol_path(r"srv*C:\sym*https://msdl.microsoft.com/download/symbols", d)
    assert e == [Entry("srv", stores=[Store(r"C:\sym"), Store("https://msdl.microsoft.com/download/symbols")])]
    e = parse_symbol_path("SRV*https://a/s;  ;/plain/dir ; symsrv*symsrv.dll*/x*http://b", d)
    assert [x.describe() for x in e] == [f"srv*{d}*https://a/s", "/plain/dir", "srv*/x*http://b"]
    e = parse_symbol_path("cache*/c;srv*http://u;/p", d)
    assert [x.describe() for x in e] == ["srv*/c*http://u", "srv*/c", "/p"]
    e = parse_symbol_path("srv**http://u;cache*", d)
    assert e[0].stores[0] == Store(str(d)) and e[0].stores[1].is_url
    assert parse_symbol_path("", d) == [] and parse_symbol_path(None, d) == []
    assert parse_symbol_path("http://bare", d)[0].stores == [Store(str(d)), Store("http://bare")]
    for bad in ("foo*bar", "cache*http://x", "cache*a*b", "symsrv*dll"):
        with pytest.raises(SymbolPathError):
            parse_symbol_path(bad, d)


def test_bad_symbol_path_is_a_user_error(tmp_path):
    with pytest.raises(PooltraceError, match="unknown keyword"):
        sym(tmp_path, symbol_path="foo*bar")


def test_environment_symbol_path(tmp_path, monkeypatch):
    monkeypatch.setenv("_NT_SYMBOL_PATH", str(pdb_dir(tmp_path, "leaky.pdb")))
    monkeypatch.delenv("_NT_ALT_SYMBOL_PATH", raising=False)
    s = Symbolizer(fixture_modules(), cache_dir=tmp_path / "cache")
    assert s.lookup(np.array([1]), np.array([0x1022], np.uint64)) == [("AllocateLeakyBuffer", 0x22)]
    assert not s.online


# -- untrusted names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("evil", [r"..\..\outside\leaky.pdb", "../outside/leaky.pdb", "..", "leaky.pdb\0.txt",
                                  "c:leaky.pdb", "../../../../../../../../tmp/leaky.pdb"])
def test_untrusted_pdb_names_never_leave_the_configured_dirs(tmp_path, evil, monkeypatch):
    conf = tmp_path / "conf" / "inner"
    conf.mkdir(parents=True)
    outside = tmp_path / "conf" / "outside"
    outside.mkdir()
    shutil.copy(FX / "leaky.pdb", outside / "leaky.pdb")  # the decoy a traversal would reach
    opened: list[str] = []
    real_read = pdbtable.read_pdb

    def spy(path, **kw):
        opened.append(str(path))
        return real_read(path, **kw)

    monkeypatch.setattr("pooltrace.symbols.read_pdb", spy)
    warnings = []
    mods = modules(module_row(LEAKY, "leaky.sys", K, pdb_name=evil))
    s = sym(tmp_path, mods, local_dirs=[conf], symbol_path=f"srv*{conf / 'cache'}*{conf}", warn=warnings.append)
    assert s.lookup(np.array([0]), np.array([0x1022], np.uint64)) == [None]
    assert s.status()[0]["status"] == "no identity" and opened == []
    assert any("unsafe PDB name" in w for w in warnings)
    assert sorted(p.name for p in outside.iterdir()) == ["leaky.pdb"]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.pdb"))


def test_absolute_build_path_uses_the_basename_inside_configured_dirs(tmp_path):
    mods = modules(module_row(LEAKY, "leaky.sys", K, pdb_name=str(FX / "leaky.pdb")))  # exists, but not configured
    s = sym(tmp_path, mods, local_dirs=[tmp_path / "empty"])
    assert s.lookup(np.array([0]), np.array([0x1022], np.uint64)) == [None]
    assert s.status()[0]["status"] == "not found"
    s = sym(tmp_path, mods, local_dirs=[pdb_dir(tmp_path, "leaky.pdb")])
    assert s.lookup(np.array([0]), np.array([0x1022], np.uint64)) == [("AllocateLeakyBuffer", 0x22)]


@pytest.mark.parametrize("evil", [r"..\x.sys", "x/../../y.sys", "CON", "a\tb.sys"])
def test_untrusted_module_names(tmp_path, evil):
    mods = modules(module_row(LEAKY, evil, K, identity=False))
    s = sym(tmp_path, mods, local_dirs=[tmp_path])
    assert s.lookup(np.array([0]), np.array([0x1022], np.uint64)) == [None]
    assert s.status()[0]["status"] == "no identity"


def test_locator_refuses_unsafe_names_directly(tmp_path):
    loc = store_mod.Locator([Entry("dir", path=str(tmp_path))], warn=lambda m: None)
    assert loc.find("../x.pdb", "AB", lambda p: ("ok", None)).status == "not found"
    assert loc.find("x.pdb", "../AB", lambda p: ("ok", None)).status == "not found"


def test_malformed_guid_in_trace(tmp_path):
    mods = modules(module_row(LEAKY, "leaky.sys", K, pdb_guid="not-a-guid"))
    s = sym(tmp_path, mods)
    assert s.lookup(np.array([0]), np.array([0x1022], np.uint64)) == [None]
    assert s.status()[0]["status"] == "no identity"


def test_small_and_large_lookups_agree(tmp_path):
    s = sym(tmp_path, local_dirs=[pdb_dir(tmp_path, "leaky.pdb", "ntkrnlmp.pdb")])
    rng = np.random.default_rng(5)
    rows = rng.integers(-1, 3, 2000).astype(np.int64)  # 2: out of range
    rvas = rng.integers(0, 0x1400, 2000).astype(np.uint64)
    ra = rng.random(2000) < 0.8
    big = s.lookup(rows, rvas, ra)
    small = [x for k in range(0, 2000, 10) for x in s.lookup(rows[k:k + 10], rvas[k:k + 10], ra[k:k + 10])]
    assert big == small and sum(x is not None for x in big) > 100


def test_trace_directories_do_not_lead_outside(tmp_path):
    """A trace's own folder (local_dirs) may come from someone else: a symlink out of it is not read and its
    file.ptr files are not followed; the same layout in a user-configured store works."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(FX / "leaky.pdb", outside / "leaky.pdb")
    trace_dir = tmp_path / "trace"
    (trace_dir / "symbols" / "leaky.pdb" / LEAKY["pdb_key"]).mkdir(parents=True)
    (trace_dir / "leaky.pdb").symlink_to(outside / "leaky.pdb")
    put(trace_dir / "symbols", "ntkrnlmp.pdb", NT["pdb_key"], f"PATH:{FX / 'ntkrnlmp.pdb'}".encode(), "file.ptr")
    s = sym(tmp_path, local_dirs=[trace_dir])
    assert s.lookup(np.array([0, 1]), np.array([0x108D, 0x1022], np.uint64)) == [None, None]
    s = sym(tmp_path, symbol_path=f"{trace_dir};srv*{trace_dir / 'symbols'}", cache_dir=tmp_path / "c2")
    assert s.lookup(np.array([0, 1]), np.array([0x108D, 0x1022], np.uint64)) == [("ExAllocatePoolWithTag", 0x4D),
                                                                             ("AllocateLeakyBuffer", 0x22)]
