"""The module map: kernel vs per-process images, validity in time, rendering."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pooltrace.datasetschema import MODULES_SCHEMA
from pooltrace.modulemap import NONE, ModuleMap, frame_text

K = 0xFFFFF80412000000


def table(rows):
    full = [{"base": b, "size": s, "name": n, "path": "\\x\\" + n, "pid": p, "timedatestamp": 0, "checksum": 0,
             "pdb_name": None, "pdb_guid": None, "pdb_age": None, "load_ns": lo, "unload_ns": un}
            for b, s, n, p, lo, un in rows]
    return pa.Table.from_pylist(full, schema=MODULES_SCHEMA)


def test_kernel_and_user_spaces():
    mm = ModuleMap(table([(K, 0x1000000, "ntoskrnl.exe", 0, None, None),
                          (K + 0x2000000, 0x8000, "leaky.sys", 0, None, None),
                          (0x7FF600000000, 0x10000, "app.exe", 100, None, None),
                          (0x7FF600000000, 0x20000, "other.exe", 200, None, None)]))
    addr = np.array([K + 0x3A41F2, K + 0x2001127, K + 0x1800000, 0x7FF600001000, 0x7FF600001000, 0x7FF600015000,
                     0x1234], dtype=np.uint64)
    pid = np.array([7, 7, 7, 100, 200, 200, 100])
    mod, rva = mm.locate(addr, pid)
    names = [mm.names[m] if m != NONE else None for m in mod.tolist()]
    assert names == ["ntoskrnl.exe", "leaky.sys", None, "app.exe", "other.exe", "other.exe", None]
    assert rva.tolist()[:2] == [0x3A41F2, 0x1127]


def test_unload_and_reload_at_the_same_base():
    mm = ModuleMap(table([(K, 0x8000, "old.sys", 0, None, 5_000), (K, 0x9000, "new.sys", 0, 6_000, None)]))
    mod, _ = mm.locate(np.array([K + 0x10] * 3, dtype=np.uint64), 0, np.array([1_000, 5_500, 7_000]))
    assert [mm.names[m] if m >= 0 else None for m in mod.tolist()] == ["old.sys", None, "new.sys"]


def test_frame_text():
    assert frame_text("ntoskrnl.exe", 0x3A41F2, K) == "ntoskrnl.exe+0x3a41f2"
    assert frame_text("myfault.sys", 0x1127, K, ("AllocateLeakyBuffer", 0x17)) == "myfault.sys!AllocateLeakyBuffer+0x17"
    assert frame_text("myfault.sys", 0x1110, K, ("AllocateLeakyBuffer", 0)) == "myfault.sys!AllocateLeakyBuffer"
    assert frame_text(None, 0, 0xFFFFF80499999999) == "0xfffff80499999999"


def test_empty_map():
    mm = ModuleMap(table([]))
    mod, rva = mm.locate(np.array([K], dtype=np.uint64))
    assert mod.tolist() == [NONE] and rva.tolist() == [0]
