"""`pooltrace whose TAG [PATH...]`: owners from the sample traces' stacks, pooltag.txt, and the tag's bytes in
driver files; the pooltag.txt parser."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from pooltrace.cli.whose import whose
from pooltrace.owners import ANY, scan_files, tag_slots
from pooltrace.symbols.pooltag import parse_pooltag, read_pooltag
from tests.conftest import ROOT

TRACES = ROOT / "traces"
FX = ROOT / "tests" / "fixtures" / "symbols"
POOLTAG = FX / "pooltag.txt"
LAYOUT = json.loads((FX / "layout.json").read_text())


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch, shipped):
    monkeypatch.setitem(globals(), "TRACES", shipped)  # whose pairs an .etl beside it: never in the source tree
    monkeypatch.setenv("POOLTRACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("_NT_SYMBOL_PATH", raising=False)
    monkeypatch.delenv("_NT_ALT_SYMBOL_PATH", raising=False)
    monkeypatch.delenv("POOLTRACE_POOLTAG", raising=False)


def run(*args) -> dict:
    r = CliRunner().invoke(whose, [*map(str, args), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def truth(name: str) -> dict:
    return json.loads((TRACES / f"{name}.truth.json").read_text())["truth"]


def test_leak_in_the_sample_trace_pooltag_and_driver_files():
    a = run("Leak", TRACES / "sample-leak.etl", FX, "--pooltag", POOLTAG)
    t = truth("sample-leak")
    tr = a["trace"]
    assert tr["tags"] == ["Leak"] and tr["allocations"] == t["allocs"]["leak"] + t["allocs"]["leak_ok"]
    assert [o["module"] for o in tr["owners"]] == ["leaky.sys"]
    sites = {s["site"]: s for s in tr["owners"][0]["sites"]}
    leak = sites["leaky.sys!AllocateLeakyBuffer+0x22"]
    assert leak["caller"] == "leaky.sys!DispatchIoctl+0x2f"
    assert (leak["allocations"], leak["outstanding"]) == (t["allocs"]["leak"], t["outstanding"]["leak"])
    ok = sites["leaky.sys!AllocateScratchBuffer+0x1d"]
    assert (ok["allocations"], ok["outstanding"]) == (t["allocs"]["leak_ok"], t["outstanding"].get("leak_ok", 0))
    # pooltag.txt: the exact entry first, then the wildcard one
    assert [(e["tag"], e["module"], e["wildcard"]) for e in a["pooltag"]["entries"]] == [
        ("Leak", "leaky.sys", False), ("Lea?", "leaky.sys", True)]
    # the scan: only leaky.sys holds the bytes, each loaded by an instruction inside an allocating function
    files = a["scan"]["files"]
    assert [f["path"].endswith("leaky.sys") for f in files] == [True] and a["scan"]["files_scanned"] == 2
    offs = files[0]["offsets"]
    assert all(o["section"] == ".text" for o in offs) and files[0]["code_loads"] == len(offs) == 3
    funcs = {f["name"]: f for f in LAYOUT["images"]["leaky.sys"]["functions"]}

    def func_of(rva):
        return next(n for n, f in funcs.items() if f["size"] and f["rva"] <= rva < f["rva"] + f["size"])

    assert [(func_of(o["rva"]), o["instruction"].split(",")[0]) for o in offs] == [
        ("AllocateLeakyBuffer", "mov r8d"), ("AllocateScratchBuffer", "mov r8d"), ("AllocateScratchBuffer", "mov edx")]
    assert a["verdict"] == ("'Leak': the trace's call sites are in leaky.sys; pooltag.txt says leaky.sys; "
                            "the tag's bytes are in leaky.sys")


def test_kernel_tag_call_site_is_past_the_allocator():
    a = run("Irp", TRACES / "sample-leak-fixed.etl", "--pooltag", POOLTAG, "--no-scan")
    assert a["tag"] == "Irp " and a["scan"] is None
    o = a["trace"]["owners"]
    assert [x["module"] for x in o] == ["ntoskrnl.exe"]
    assert o[0]["sites"][0]["site"] == "ntoskrnl.exe!IoAllocateIrp+0x33"
    assert o[0]["sites"][0]["caller"] == "Ntfs.sys+0x1b3c0"
    assert a["pooltag"]["entries"][0]["binary"] == "nt!io" and a["pooltag"]["entries"][0]["module"] == "ntoskrnl.exe"


def test_without_symbols_the_leading_kernel_frames_are_skipped():
    a = run("Leak", TRACES / "sample-leak.etl", "--no-symbols", "--no-scan", "--pooltag", POOLTAG)
    sites = [s["site"] for s in a["trace"]["owners"][0]["sites"]]
    assert a["trace"]["owners"][0]["module"] == "leaky.sys" and sites == ["leaky.sys+0x1022", "leaky.sys+0x10bd"]
    assert {s["status"] for s in a["trace"]["symbols"]} == {"disabled"}


def test_wildcard_query():
    a = run("Lea?", TRACES / "sample-leak-fixed.etl", "--no-scan", "--pooltag", POOLTAG)
    t = truth("sample-leak-fixed")
    assert a["trace"]["tags"] == ["Lea2", "Leak"]
    assert a["trace"]["allocations"] == t["allocs"]["leak"] + t["allocs"]["leak_ok"] + t["allocs"]["new_leak"]
    sites = {s["site"] for s in a["trace"]["owners"][0]["sites"]}
    assert "leaky.sys!AllocateTelemetry+0x1d" in sites
    assert run("Le*", TRACES / "sample-leak-fixed.etl", "--no-scan")["trace"]["tags"] == ["Lea2", "Leak"]


def test_dataset_dir_and_reuse_of_the_dataset_beside_the_trace(tmp_path, monkeypatch):
    from pooltrace.dataset import pair_trace

    trace = tmp_path / "t.etl"
    shutil.copy(TRACES / "sample-leak.etl", trace)
    shutil.copytree(TRACES / "symbols", tmp_path / "symbols")
    pair_trace(trace, tmp_path / "t.pooltrace")

    def no_pairing(*a, **k):
        raise AssertionError("paired again")

    monkeypatch.setattr("pooltrace.dataset.pair_trace", no_pairing)
    by_trace = run("Leak", trace, "--no-scan")
    by_dir = run("Leak", tmp_path / "t.pooltrace", "--no-scan")
    assert by_trace["trace"]["owners"] == by_dir["trace"]["owners"]
    assert by_trace["trace"]["owners"][0]["sites"][0]["site"] == "leaky.sys!AllocateLeakyBuffer+0x22"


def test_text_output():
    r = CliRunner().invoke(whose, ["Leak", str(TRACES / "sample-leak.etl"), str(FX), "--pooltag", str(POOLTAG)])
    assert r.exit_code == 0, r.output
    assert "leaky.sys!AllocateLeakyBuffer+0x22  <- leaky.sys!DispatchIoctl+0x2f" in r.output
    assert "mov r8d, imm32" in r.output and "Leak - leaky.sys - leaky test driver, request buffers" in r.output
    assert r.output.rstrip().endswith("the tag's bytes are in leaky.sys")


def test_no_pooltag_and_no_trace(tmp_path):
    r = CliRunner().invoke(whose, ["Zzzz", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "pooltag.txt: not found" in r.output and "no owner found for 'Zzzz'" in r.output


def test_pooltag_from_the_environment(monkeypatch):
    monkeypatch.setenv("POOLTRACE_POOLTAG", str(POOLTAG))
    a = run("CMab", "--no-scan")
    assert [e["tag"] for e in a["pooltag"]["entries"]] == ["CM??"] and a["pooltag"]["entries"][0]["component"] == "cm"


@pytest.mark.parametrize(("args", "message"), [
    (["Leaky"], "1 to 4 characters"), (["Le\u20ac"], "single-byte"), (["Leak", "missing.etl"], "no such trace"),
    (["Leak", "nowhere-dir"], "no such file"), (["Leak", "--pooltag", "missing.txt"], "cannot read"),
])
def test_user_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(whose, args)
    assert r.exit_code == 2 and message in r.output, r.output


def test_dataset_dir_missing_files(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "trace.json").write_text("{}")
    (tmp_path / "ds" / "allocations.parquet").write_text("")
    r = CliRunner().invoke(whose, ["Leak", str(tmp_path / "ds")])
    assert r.exit_code == 2 and "not a pooltrace dataset" in r.output


# -- the pieces ---------------------------------------------------------------------------------------------
def test_tag_slots():
    assert tag_slots("Irp") == list(b"Irp ")
    assert tag_slots("Le*") == [ord("L"), ord("e"), ANY, ANY]
    assert tag_slots("L?ak") == [ord("L"), ANY, ord("a"), ord("k")]
    assert tag_slots("\\x01abc") == [1, ord("a"), ord("b"), ord("c")]


def test_scan_skips_non_images_but_reads_explicit_files(tmp_path):
    d = tmp_path / "drivers"
    d.mkdir()
    (d / "notes.txt").write_bytes(b"Leak Leak")
    shutil.copy(FX / "leaky.sys", d / "leaky.sys")
    (d / "sub").mkdir()
    shutil.copy(FX / "leaky.sys", d / "sub" / "copy.sys")
    (d / "link.sys").symlink_to(d / "leaky.sys")
    res = scan_files([d], list(b"Leak"))
    assert sorted(f["path"].removeprefix(str(d)) for f in res["files"]) == ["/leaky.sys", "/sub/copy.sys"]
    assert res["files_scanned"] == 2
    res = scan_files([d / "notes.txt"], list(b"Leak"))
    assert res["files"][0]["count"] == 2 and res["files"][0]["offsets"][0]["section"] is None
    assert res["files_scanned"] == 0 and res["not_images"] == [str(d / "notes.txt")]


def test_whose_says_a_named_file_is_not_a_pe_image(tmp_path):
    pic = tmp_path / "pic.png"
    pic.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    fake = tmp_path / "fake.sys"
    fake.write_bytes(b"MZ" + b"\x00" * 200)  # MZ but no PE header: not an image either
    r = CliRunner().invoke(whose, ["Leak", str(pic), str(fake), "--pooltag", str(POOLTAG)])
    assert r.exit_code == 0, r.output
    assert "0 of 0 image(s) scanned" in r.output
    assert f"{pic}: not a PE image" in r.output and f"{fake}: not a PE image" in r.output
    r = CliRunner().invoke(whose, ["Leak", str(FX / "leaky.sys"), "--pooltag", str(POOLTAG)])
    assert "1 of 1 image(s) scanned" in r.output and "not a PE image" not in r.output


def test_pooltag_parser_formats(tmp_path):
    text = ("rem header\r\nREM upper-case rem\r\n\r\nAfd? - afd.sys - AFD objects\r\nCc   - nt!cc - Cache\r\n"
            "Ab\t-\tab.sys\t-\ttabs\r\nNone - just a description\r\nbad\r\nIrp  - nt!io - Io - with a dash\r\n")
    pt = parse_pooltag(text)
    assert [(e.tag, e.binary, e.description) for e in pt.entries] == [
        ("Afd?", "afd.sys", "AFD objects"), ("Cc  ", "nt!cc", "Cache"), ("Ab  ", "ab.sys", "tabs"),
        ("None", "", "just a description"), ("Irp ", "nt!io", "Io - with a dash")]
    assert pt.skipped == 1
    assert [e.tag for e in pt.lookup("Afdx")] == ["Afd?"] == [e.tag for e in pt.lookup("Afd")]
    assert pt.lookup("Afx1") == []
    assert pt.lookup("Cc")[0].module == "ntoskrnl.exe" and pt.lookup("Cc")[0].component == "cc"
    assert [e.tag for e in pt.search("A*")] == ["Afd?", "Ab  "]
    p = tmp_path / "pooltag.txt"
    p.write_bytes(text.encode("utf-16"))
    assert len(read_pooltag(p).entries) == 5
    p.write_bytes(b"Tag\xe9 - x.sys - caf\xe9\r\n")  # ANSI
    assert read_pooltag(p).entries[0].description == "caf\xe9"
