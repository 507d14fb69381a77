"""Damaged inputs for the robustness suite (tests/test_mutation.py) and the long campaign
(benchmarks/mutation_campaign.py): mutations of the shipped sample traces, of their paired datasets and
sidecars, and odd paths; every analysis command run on each; each run classified.

Classes of a case's outcome, worst first:
  traceback      an exception escaped a command (or an exit code outside 0/1/2)
  hang           a command did not finish within the time limit (campaign: the worker is killed)
  memory         the process's peak RSS went past the memory limit
  silent-damage  records were lost (fewer than the intact trace has) or the reader reported damage, yet a
                 command exited 0 without saying so (info: a warning or DAMAGED verdict; pair: trace.json
                 warnings; report/tags/diff: the dataset's first warning in their output)
  bad-input      some command refused the input (exit 2, one line)
  ok             every command exited 0

A case is built from a seed alone (``make_case(seed, ...)``), so any finding can be replayed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"
CLASSES = ("ok", "bad-input", "traceback", "hang", "memory", "silent-damage")
TRACE_KINDS = ("truncate", "truncate-at-buffer", "bit-flips", "buffer-header", "record-header",
               "compressed-data", "logfile-header")
OTHER_KINDS = ("dataset", "sidecar", "odd-path")
# the kinds the campaign drew from before the dataset had a summary.npz: its seeds replay with these
FIRST_KINDS = TRACE_KINDS + OTHER_KINDS
KINDS = FIRST_KINDS + ("summary",)

# buffer header fields (etl-format.md §1.2): offset, struct format
BUFFER_FIELDS = {"BufferSize": (0x00, "<I"), "SavedOffset": (0x04, "<I"), "CurrentOffset": (0x08, "<I"),
                 "TimeStamp": (0x10, "<q"), "SequenceNumber": (0x18, "<Q"), "ProcessorIndex": (0x28, "<H"),
                 "State": (0x2C, "<I"), "Offset": (0x30, "<I"), "BufferFlag": (0x34, "<H"),
                 "BufferType": (0x36, "<H")}
# logfile header fields inside the first record's payload (etl-format.md §1.5, 64-bit layout)
LOGFILE_FIELDS = {"BufferSize": (0x00, "<I"), "NumberOfProcessors": (0x0C, "<I"), "EndTime": (0x10, "<q"),
                  "LogFileMode": (0x1C, "<I"), "BuffersWritten": (0x20, "<I"), "PointerSize": (0x28, "<I"),
                  "EventsLost": (0x2C, "<I"), "CpuSpeedInMHz": (0x30, "<I"), "BootTime": (0xF8, "<q"),
                  "PerfFreq": (0x100, "<q"), "StartTime": (0x108, "<q"), "ReservedFlags": (0x110, "<I"),
                  "BuffersLost": (0x114, "<I")}
LOGFILE_PAYLOAD = 0x48 + 0x20


@dataclass
class Sample:
    """An intact shipped trace and what the mutations need to know about it."""

    path: Path
    data: bytes
    buffers: list[tuple[int, int, int, int]]  # (offset, size, filled, flags)
    records: int  # records the intact trace holds
    record_offsets: list[int]  # file offsets of records in uncompressed buffers
    dataset: Path  # its paired dataset


def load_samples(workdir: Path) -> list[Sample]:
    from click.testing import CliRunner

    from pooltrace.cli import cli
    from pooltrace.etl.buffers import FLAG_COMPRESSED, scan_buffers
    from pooltrace.etl.reader import EtlReader
    from pooltrace.etl.records import Chunk, walk

    out = []
    for path in sorted(TRACES.glob("*.etl")):
        data = path.read_bytes()
        idx = scan_buffers(data)
        buffers = [(int(idx.offset[i]), int(idx.size[i]), int(idx.filled[i]), int(idx.flags[i]))
                   for i in range(len(idx))]
        offsets = []
        for off, _size, filled, flags in buffers[1:]:
            if not flags & FLAG_COMPRESSED:
                slots, _, _ = walk(Chunk([data[off + 0x48: off + filled]], [0]))
                offsets.extend(off + 0x48 + 8 * int(s) for s in slots)
        with EtlReader(path) as r:
            for _ in r.batches():
                pass
            records = r.stats.records
        ds = workdir / f"{path.stem}.intact"
        res = CliRunner().invoke(cli, ["pair", str(path), "-o", str(ds)])
        assert res.exit_code == 0, res.output
        out.append(Sample(path, data, buffers, records, offsets, ds))
    return out


@dataclass
class Case:
    seed: int
    kind: str
    label: str
    sample: Sample
    trace: Path | None = None  # the (damaged) trace to analyze
    dataset: Path | None = None  # a (damaged) dataset to analyze
    args: list[list[str]] = field(default_factory=list)  # commands to run (the odd-path case)


# ---- trace mutations --------------------------------------------------------------------------------------

def _value(rng: random.Random, fmt: str, old: int) -> int:
    bits = struct.calcsize(fmt) * 8
    signed = fmt[-1].islower()
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    choice = rng.choice(["zero", "max", "min", "random", "small", "plus", "minus", "half", "bit"])
    v = {"zero": 0, "max": hi, "min": lo, "random": rng.randint(lo, hi), "small": rng.randint(0, 0x100),
         "plus": old + rng.choice([1, 8, 0x48, 0x1000]), "minus": old - rng.choice([1, 8, 0x48, 0x1000]),
         "half": old // 2, "bit": old ^ (1 << rng.randrange(bits))}[choice]
    return min(max(v, lo), hi)


def mutate_trace(rng: random.Random, s: Sample, kind: str) -> tuple[bytes, str]:
    data = bytearray(s.data)
    n = len(data)
    if kind == "truncate":
        cut = rng.randrange(0x48, n)
        return bytes(data[:cut]), f"truncated at {cut} of {n}"
    if kind == "truncate-at-buffer":
        off = rng.choice([b[0] for b in s.buffers[1:]])
        cut = off + rng.choice([0, 0, 1, 8, 0x48, -1, -8])
        return bytes(data[:cut]), f"truncated at {cut} (buffer boundary {off})"
    if kind == "bit-flips":
        flips = [rng.randrange(n * 8) for _ in range(rng.choice([1, 1, 2, 4, 16]))]
        for b in flips:
            data[b // 8] ^= 1 << (b % 8)
        return bytes(data), f"bits flipped at {flips[:4]}"
    if kind == "buffer-header":
        i = rng.randrange(len(s.buffers))
        name = rng.choice(list(BUFFER_FIELDS))
        off, fmt = BUFFER_FIELDS[name]
        at = s.buffers[i][0] + off
        old = struct.unpack_from(fmt, data, at)[0]
        new = _value(rng, fmt, old)
        struct.pack_into(fmt, data, at, new)
        return bytes(data), f"buffer {i} {name} {old:#x} -> {new:#x}"
    if kind == "record-header" and s.record_offsets:
        at = rng.choice(s.record_offsets)
        where = rng.choice([0, 2, 3, 4, 6, 8, 16])
        fmt = "<H" if where in (0, 4, 6) else "<B" if where in (2, 3) else "<I" if where == 8 else "<q"
        old = struct.unpack_from(fmt, data, at + where)[0]
        new = _value(rng, fmt, old)
        struct.pack_into(fmt, data, at + where, new)
        return bytes(data), f"record at {at:#x} +{where} {old:#x} -> {new:#x}"
    if kind == "compressed-data":
        comp = [b for b in s.buffers if b[3] & 0x40]
        if comp:
            off, size, _filled, _flags = rng.choice(comp)
            at = rng.randrange(off + 0x48, off + size - 4)
            new = rng.choice([b"\xff\x00\x00\x00", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                              rng.randbytes(4)])
            data[at:at + 4] = new
            return bytes(data), f"compressed bytes at {at} set to {new.hex()}"
    if kind in ("logfile-header", "record-header", "compressed-data"):
        name = rng.choice(list(LOGFILE_FIELDS))
        off, fmt = LOGFILE_FIELDS[name]
        at = LOGFILE_PAYLOAD + off
        old = struct.unpack_from(fmt, data, at)[0]
        new = _value(rng, fmt, old)
        struct.pack_into(fmt, data, at, new)
        return bytes(data), f"logfile header {name} {old:#x} -> {new:#x}"
    raise ValueError(kind)


# ---- dataset mutations ------------------------------------------------------------------------------------

def _deep(n: int) -> str:
    return "[" * n + "]" * n


def mutate_dataset(rng: random.Random, ds: Path) -> str:
    """Damage the dataset directory `ds` (a copy) in place; returns a description."""
    what = rng.choice(["trace.json", "truncate", "bit-flips", "retype", "swap", "replace", "delete", "nulls"])
    pq_files = ["allocations.parquet", "stacks.parquet", "modules.parquet"]
    if what == "trace.json":
        meta = json.loads((ds / "trace.json").read_text())
        choice = rng.choice(["[]", '"x"', "deep", "empty", "utf16", "drop", "type", "nan"])
        if choice in ("[]", '"x"'):
            text = choice
        elif choice == "deep":
            text = _deep(100_000)
        elif choice == "empty":
            text = ""
        elif choice == "utf16":
            (ds / "trace.json").write_bytes(json.dumps(meta).encode("utf-16"))
            return "trace.json as UTF-16"
        elif choice == "nan":
            text = json.dumps(meta).replace('"pointer_size": 8', '"pointer_size": NaN')
        else:
            key = rng.choice(sorted(meta))
            if choice == "drop":
                meta.pop(key)
            else:
                meta[key] = rng.choice(["x", -1, None, [], {}, 1e308, True])
            text = json.dumps(meta)
            choice = f"{choice} {key}"
        (ds / "trace.json").write_text(text)
        return f"trace.json {choice}"
    name = rng.choice(pq_files)
    p = ds / name
    if what in ("truncate", "bit-flips"):
        return _damage_file(rng, p, what)
    if what == "replace":
        p.unlink()
        if rng.random() < 0.5:
            p.mkdir()
            return f"{name} an empty directory"
        os.mkfifo(p)
        return f"{name} a named pipe"
    if what == "delete":
        p.unlink()
        return f"{name} deleted"
    table = pq.read_table(p)
    col = rng.choice(table.column_names)
    i = table.schema.get_field_index(col)
    if what == "retype":
        arr = table[col]
        new = pa.array([None if v is None else str(v) for v in arr.to_pylist()], pa.string()) \
            if rng.random() < 0.5 or not pa.types.is_integer(arr.type) else arr.cast(pa.float64(), safe=False)
        table = table.set_column(i, col, new)
        desc = f"{name} column {col} as {new.type}"
    elif what == "swap":
        other = rng.choice(table.column_names)
        names = list(table.column_names)
        j = names.index(other)
        names[i], names[j] = names[j], names[i]
        table = table.rename_columns(names)
        desc = f"{name} columns {col} and {other} swapped"
    else:  # nulls
        arr = table[col].combine_chunks()
        mask = pa.array([rng.random() < 0.3 for _ in range(len(arr))])
        table = table.set_column(i, col, pa.compute.if_else(mask, pa.nulls(len(arr), arr.type), arr))
        desc = f"{name} column {col} with nulls"
    pq.write_table(table, p)
    return desc


def _damage_file(rng: random.Random, p: Path, what: str) -> str:
    """Cut the file `p` at a random length ("truncate") or flip 1, 4 or 32 random bits in it ("bit-flips")."""
    if what == "truncate":
        raw = p.read_bytes()
        cut = rng.randrange(0, len(raw))
        p.write_bytes(raw[:cut])
        return f"{p.name} truncated at {cut} of {len(raw)}"
    raw = bytearray(p.read_bytes())
    for _ in range(rng.choice([1, 4, 32])):
        b = rng.randrange(len(raw) * 8)
        raw[b // 8] ^= 1 << (b % 8)
    p.write_bytes(bytes(raw))
    return f"{p.name} bits flipped"


def mutate_summary(rng: random.Random, ds: Path, others: list[Path]) -> str:
    """Damage the dataset's summary.npz, or make it another dataset's (a user copying files between dataset
    folders): the report must then come from the rows, the same as without a summary."""
    p = ds / "summary.npz"
    what = rng.choice(["truncate", "bit-flips", "delete", "directory", "foreign", "foreign-rows", "empty"])
    if what in ("truncate", "bit-flips"):
        return _damage_file(rng, p, what)
    if what == "delete":
        p.unlink()
        return "summary.npz deleted"
    if what == "directory":
        p.unlink()
        p.mkdir()
        return "summary.npz an empty directory"
    if what == "empty":
        p.write_bytes(b"")
        return "summary.npz empty"
    if not others:
        p.unlink()
        return "summary.npz deleted (no other dataset)"
    other = rng.choice(others)
    if what == "foreign":
        shutil.copyfile(other / "summary.npz", p)
        return f"summary.npz of {other.name}"
    for name in ("allocations.parquet", "stacks.parquet", "modules.parquet", "trace.json"):
        shutil.copyfile(other / name, ds / name)
    return f"the rows of {other.name} beside this summary"


# ---- sidecar mutations ------------------------------------------------------------------------------------

def good_sidecar(trace_name: str) -> dict:
    return {
        "format": "pooltrace-sidecar", "version": 1, "trace": trace_name, "created_by": "pooltrace 0.1.0",
        "recording": {"pointer_size": 8, "seconds": 10.0, "stacks": ["PoolAlloc"], "events_lost": 0},
        "modules": [{"name": "leaky.sys", "base": "0xfffff80412340000", "size": 32768, "timedatestamp": 1597905451,
                     "checksum": 0, "pdb_name": "leaky.pdb", "pdb_guid": "6c5a0b8e-9f1d-4e1b-a7c2-3d4e5f607182",
                     "pdb_age": 2}],
        "pool_tags": {"filter": [], "start": {"utc": "2026-01-01T00:00:00Z", "entries": [
            {"tag": "Leak", "value": 1, "paged_allocs": 5, "paged_frees": 2, "paged_bytes": 300,
             "nonpaged_allocs": 0, "nonpaged_frees": 0, "nonpaged_bytes": 0}]}, "stop": None},
    }


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def mutate_sidecar(rng: random.Random, path: Path, trace_name: str) -> str:
    data = good_sidecar(trace_name)
    choice = rng.choice(["value", "value", "value", "delete", "utf16", "deep", "garbage", "fifo", "nonfinite"])
    if choice == "utf16":
        path.write_bytes(json.dumps(data).encode("utf-16"))
        return "sidecar UTF-16"
    if choice == "deep":
        path.write_text('{"format": "pooltrace-sidecar", "version": 1, "modules": ' + _deep(100_000) + "}")
        return "sidecar nested 100,000 deep"
    if choice == "garbage":
        path.write_bytes(rng.randbytes(rng.randrange(1, 200)))
        return "sidecar random bytes"
    if choice == "fifo":
        os.mkfifo(path)
        return "sidecar a named pipe"
    if choice == "nonfinite":
        path.write_text(json.dumps(data).replace("10.0", rng.choice(["Infinity", "NaN", "1e999", "-Infinity"])))
        return "sidecar non-finite number"
    spots = [p for p in _paths(data) if p]
    spot = rng.choice(spots)
    node = data
    for k in spot[:-1]:
        node = node[k]
    if choice == "delete":
        del node[spot[-1]]
    else:
        node[spot[-1]] = rng.choice(["x", "", -1, -(1 << 70), 1 << 70, None, [], [[]], {}, True, 1.5, "0xZZ",
                                     "../../etc/passwd"])
    path.write_text(json.dumps(data))
    return f"sidecar {choice} {'.'.join(map(str, spot))}"


# ---- odd paths --------------------------------------------------------------------------------------------

def odd_path(rng: random.Random, s: Sample, work: Path) -> tuple[str, list[list[str]]]:
    choice = rng.choice(["fifo", "directory", "missing", "dev-null", "long-name", "unicode", "symlink-loop",
                         "empty", "not-etl", "dataset-file"])
    if choice == "fifo":
        p = work / "pipe.etl"
        os.mkfifo(p)
    elif choice == "directory":
        p = work / "dir.etl"
        p.mkdir()
    elif choice == "missing":
        p = work / "missing.etl"
    elif choice == "dev-null":
        p = Path("/dev/null")
    elif choice == "long-name":
        p = work / ("n" * (rng.choice([240, 244, 247, 250, 255]) - 4) + ".etl")
        shutil.copyfile(s.path, p)
    elif choice == "unicode":
        p = work / "tr\u00e4ce \u6f22 ; $x `y`.etl"
        shutil.copyfile(s.path, p)
    elif choice == "symlink-loop":
        p = work / "loop.etl"
        p.symlink_to(p)
    elif choice == "empty":
        p = work / "empty.etl"
        p.write_bytes(b"")
    elif choice == "not-etl":
        p = work / "notes.etl"
        p.write_text("hello\n" * 100)
    else:
        p = work / "trace.json"
        shutil.copyfile(s.dataset / "trace.json", p)
    t = str(p)
    return choice, [["info", t], ["info", "--format", "json", t], ["pair", t, "-o", str(work / "odd.ds")],
                    ["report", t], ["tags", t], ["diff", str(s.dataset), t],
                    ["whose", "Leak", t, "--no-scan", "--no-symbols"]]


# ---- building and running a case -----------------------------------------------------------------------------

def make_case(seed: int, samples: list[Sample], work: Path, kinds: tuple[str, ...] = KINDS) -> Case:
    """The damaged input of case `seed`, written under `work` (an empty directory)."""
    rng = random.Random(seed)
    kind = rng.choice(kinds)
    s = rng.choice(samples)
    if kind in TRACE_KINDS:
        data, label = mutate_trace(rng, s, kind)
        trace = work / s.path.name
        trace.write_bytes(data)
        return Case(seed, kind, label, s, trace=trace)
    if kind == "dataset":
        ds = work / "ds"
        shutil.copytree(s.dataset, ds)
        return Case(seed, kind, mutate_dataset(rng, ds), s, dataset=ds)
    if kind == "sidecar":
        trace = work / s.path.name
        shutil.copyfile(s.path, trace)
        label = mutate_sidecar(rng, trace.with_name(trace.name + ".pooltrace.json"), trace.name)
        return Case(seed, kind, label, s, trace=trace)
    if kind == "summary":
        ds = work / "ds"
        shutil.copytree(s.dataset, ds)
        others = [o.dataset for o in samples if o.dataset != s.dataset]
        return Case(seed, kind, mutate_summary(rng, ds, others), s, dataset=ds)
    label, args = odd_path(rng, s, work)
    return Case(seed, kind, label, s, args=args)


@dataclass
class Run:
    args: list[str]
    exit_code: int
    output: str  # stdout and stderr as a terminal shows them
    error: str | None  # the escaped exception, if any
    seconds: float
    stdout: str = ""  # stdout alone


def invoke(args: list[str]) -> Run:
    """Run one command in-process (click's CliRunner): no interpreter start-up per command."""
    from click.testing import CliRunner

    from pooltrace.cli import cli

    t0 = time.monotonic()
    r = CliRunner().invoke(cli, args)
    err = None
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err = f"{type(r.exception).__name__}: {r.exception}"
    return Run(args, r.exit_code, r.output, err, time.monotonic() - t0, r.stdout)


def _json(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _read_meta(ds: Path) -> dict:
    """trace.json of a dataset as far as it can be read (a tampered one: {})."""
    try:
        meta = _json((ds / "trace.json").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _damage_said(meta_warnings: list[str], output: str) -> bool:
    """A command's output carries the dataset's damage notice: one of its warnings (its first words; line
    breaks and wrapping ignored)."""
    flat = " ".join(output.split())
    return any(" ".join(w.split())[:40] in flat for w in meta_warnings)


def run_case(case: Case, work: Path, run: Callable[[list[str]], Run] = invoke,
             notices: bool = True) -> tuple[str, list[str], list[Run]]:
    """Every analysis command on the case's input. Returns (class, problems, runs).
    `notices`: also require the damage notice in report/tags/diff output."""
    runs: list[Run] = []
    problems: list[str] = []

    def go(args: list[str]) -> Run:
        r = run(args)
        runs.append(r)
        if r.error or r.exit_code not in (0, 1, 2) or "Traceback (most recent call last)" in r.output:
            problems.append(f"traceback: {' '.join(args[:2])}: {r.error or r.output[-300:]}")
        elif r.exit_code == 2 and len(r.output.strip().splitlines()) > 1 and "Usage:" not in r.output:
            problems.append(f"bad-input message of {len(r.output.splitlines())} lines: {' '.join(args[:2])}")
        return r

    if case.args:
        for args in case.args:
            go(args)
        return _classify(problems, runs), problems, runs
    intact = case.sample
    ds = case.dataset
    damaged = False
    warnings: list[str] = []
    if case.trace is not None:
        t = str(case.trace)
        info = go(["info", "--format", "json", t])
        d = _json(info.output) if info.exit_code == 0 else None
        if d is not None:
            said = bool(d.get("warnings")) or "DAMAGED" in d.get("verdict", "")
            lost = d.get("records", 0) < intact.records
            damaged = said or lost
            if lost and not said:
                problems.append(f"silent-damage: info reads {d['records']} of {intact.records} records and "
                                "says nothing")
        ds = work / "paired"
        pr = go(["pair", t, "-o", str(ds)])
        if pr.exit_code != 0:
            ds = None
        else:
            meta = _read_meta(ds)
            warnings = list(meta.get("warnings", []))
            if damaged and not warnings:
                problems.append("silent-damage: info found damage, trace.json has no warnings")
        go(["report", t])
    elif ds is not None:
        warnings = _read_meta(ds).get("warnings", [])
        warnings = [w for w in warnings if isinstance(w, str)] if isinstance(warnings, list) else []
    if ds is not None:
        s = str(ds)
        outs = [go(["report", s]), go(["report", s, "--format", "json"]),
                go(["report", s, "--format", "html", "-o", str(work / "r.html")]),
                go(["report", s, "--by", "tag", "--format", "csv"]), go(["tags", s]),
                go(["diff", str(intact.dataset), s])]
        go(["whose", "Leak", s, "--no-scan", "--no-symbols"])
        if case.kind == "summary":  # whatever happened to the summary, the report is the rows' report
            rows = work / "rows"
            shutil.copytree(ds, rows, ignore=shutil.ignore_patterns("summary.npz"))
            for args in (["report"], ["report", "--format", "json"], ["report", "--by", "function"],
                         ["report", "--by", "module", "--format", "csv"]):
                a, b = go([args[0], s, *args[1:]]), go([args[0], str(rows), *args[1:]])
                if (a.exit_code, a.stdout) != (b.exit_code, b.stdout):
                    problems.append(f"silent-damage: {' '.join(args)} differs from the report of the rows "
                                    "(the same dataset without its summary)")
        if notices and warnings:
            for r in outs:
                text = r.output
                if "-o" in r.args and r.exit_code == 0:
                    text = (work / "r.html").read_text(errors="replace")
                if r.exit_code == 0 and not _damage_said(warnings, text):
                    problems.append(f"silent-damage: {' '.join(r.args[:3])} does not show the dataset's warnings")
    return _classify(problems, runs), problems, runs


def _classify(problems: list[str], runs: list[Run]) -> str:
    for cls in ("traceback", "silent-damage"):
        if any(p.startswith(cls) for p in problems):
            return cls
    if any(r.exit_code == 2 for r in runs) or problems:
        return "bad-input"
    return "ok"
