"""PDB identity (CodeView RSDS) of PE files: byte-level on PEs built here with struct, then on real PEs
built with clang + lld-link and on PE launchers shipped with pip, cross-checked with llvm-readobj (each
skipped when the tool or file is absent)."""

from __future__ import annotations

import importlib.util
import io
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from pooltrace.collector.pe import PeError, read_identity, read_identity_file
from tests.collector_fake import GUID, make_pe


@pytest.mark.parametrize("plus", [True, False])
@pytest.mark.parametrize("use_pointer", [True, False])
def test_rsds_from_a_pe_built_byte_by_byte(plus, use_pointer):
    ident = read_identity(io.BytesIO(make_pe(plus=plus, use_pointer=use_pointer)))
    assert ident.machine == (0x8664 if plus else 0x14C)
    assert (ident.timedatestamp, ident.size_of_image, ident.checksum) == (0x5F3E1A2B, 0x3000, 0x1234)
    assert ident.pdb_guid == str(GUID) and ident.pdb_age == 2 and ident.pdb_name == "C:\\build\\leaky.pdb"


def test_pe_without_usable_debug_info_has_no_pdb_identity():
    for data in (make_pe(debug=False), make_pe(n_dirs=4),
                 make_pe(codeview=b"NB10" + bytes(12) + b"old.pdb\0")):
        ident = read_identity(io.BytesIO(data))
        assert ident.pdb_guid is None and ident.pdb_name is None and ident.timedatestamp == 0x5F3E1A2B


@pytest.mark.parametrize(("data", "words"), [
    (b"", "no MZ header"),
    (b"ZM" + bytes(62), "no MZ header"),
    (make_pe()[:0x90], "bad e_lfanew"),
    (make_pe().replace(b"PE\0\0", b"PX\0\0", 1), "no PE signature"),
])
def test_damaged_pe_files_raise_pe_error(data, words):
    with pytest.raises(PeError, match=words):
        read_identity(io.BytesIO(data))


def _readobj(path: Path) -> dict:
    out = subprocess.run(["llvm-readobj", "--file-headers", "--coff-debug-directory", str(path)],
                         capture_output=True, text=True, check=True).stdout
    guid = re.search(r"PDBGUID: \(([0-9A-F ]+)\)", out)
    return {"stamp": int(re.search(r"TimeDateStamp: .*\(0x([0-9A-F]+)\)", out).group(1), 16),
            "size": int(re.search(r"SizeOfImage: (\d+)", out).group(1)),
            "guid": str(uuid.UUID(bytes_le=bytes.fromhex(guid.group(1).replace(" ", "")))) if guid else None,
            "age": int(re.search(r"PDBAge: (\d+)", out).group(1)) if guid else None,
            "name": re.search(r"PDBFileName: (.*)", out).group(1).strip() if guid else None}


DRIVER_C = """
typedef unsigned long ULONG; typedef long NTSTATUS;
volatile ULONG g_counter;
__declspec(noinline) ULONG Work(ULONG a, ULONG b) { g_counter += a * b; return g_counter; }
NTSTATUS DriverEntry(void *DriverObject, void *RegistryPath) { (void)DriverObject; (void)RegistryPath;
  return (NTSTATUS)Work(3, 4); }
"""


@pytest.mark.skipif(not (shutil.which("clang") and shutil.which("lld-link")), reason="clang/lld-link not installed")
def test_rsds_of_a_real_driver_built_with_clang_and_lld(tmp_path):
    (tmp_path / "fakedrv.c").write_text(DRIVER_C)
    subprocess.run(["clang", "--target=x86_64-pc-windows-msvc", "-O1", "-g", "-gcodeview", "-ffreestanding",
                    "-funwind-tables", "-fno-stack-protector", "-mno-stack-arg-probe", "-c", "fakedrv.c",
                    "-o", "fakedrv.obj"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run(["lld-link", "/nologo", "/driver", "/subsystem:native", "/entry:DriverEntry", "/nodefaultlib",
                    "/debug", "/pdb:fakedrv.pdb", "/pdbaltpath:%_PDB%", "/Brepro", "/machine:x64",
                    "/out:fakedrv.sys", "fakedrv.obj"], cwd=tmp_path, check=True, capture_output=True)
    ident = read_identity_file(tmp_path / "fakedrv.sys")
    assert ident.machine == 0x8664 and ident.pdb_age == 1 and ident.pdb_name == "fakedrv.pdb"
    # lld's PDB GUID ends with the ASCII bytes "LLD PDB." (symbols.md §1.3)
    assert uuid.UUID(ident.pdb_guid).bytes_le.endswith(b"LLD PDB.")
    if shutil.which("llvm-readobj"):
        ref = _readobj(tmp_path / "fakedrv.sys")
        assert (ident.timedatestamp, ident.size_of_image, ident.pdb_guid, ident.pdb_age, ident.pdb_name) == \
            (ref["stamp"], ref["size"], ref["guid"], ref["age"], ref["name"])


def _pip_launchers() -> list[Path]:
    spec = importlib.util.find_spec("pip")
    if spec is None or spec.origin is None:
        return []
    d = Path(spec.origin).parent / "_vendor" / "distlib"
    return [p for p in (d / "t32.exe", d / "t64.exe") if p.exists()]


@pytest.mark.skipif(not shutil.which("llvm-readobj") or not _pip_launchers(),
                    reason="llvm-readobj or pip's PE launchers not available")
def test_rsds_of_real_msvc_binaries_match_llvm_readobj():
    for exe in _pip_launchers():  # PE32 (t32.exe) and PE32+ (t64.exe), linked by MSVC
        ident, ref = read_identity_file(exe), _readobj(exe)
        assert (ident.timedatestamp, ident.size_of_image, ident.pdb_guid, ident.pdb_age, ident.pdb_name) == \
            (ref["stamp"], ref["size"], ref["guid"], ref["age"], ref["name"]), exe
