"""`pair --jobs N`: chunks decoded in worker processes give the same dataset, byte for byte, as one
process — on the shipped samples (plain and compressed), on a generated trace with stack keys and
PERFINFO pool records, and on a damaged trace (same warnings, same skipped bytes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pooltrace import dataset
from pooltrace.dataset import pair_trace
from pooltrace.etl import workerstart
from pooltrace.etl.columns import Columns
from pooltrace.etl.workerstart import decode_jobs
from pooltrace.etl.writer import TraceWriter
from tests.conftest import ROOT

FILES = ("allocations.parquet", "stacks.parquet", "modules.parquet")


@pytest.fixture(autouse=True)
def workers_only(monkeypatch):
    """Every chunk decoded by the workers: the reader would otherwise decode most chunks of these small
    traces itself while the workers start (test_chunks_are_decoded_here_while_the_workers_start)."""
    from pooltrace.etl import parallel

    monkeypatch.setattr(parallel, "DECODE_WHILE_STARTING", False)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(dataset, "CHUNK_BYTES", 96 << 10)
    monkeypatch.setattr(workerstart, "PARALLEL_MIN_BYTES", 0)


def _pair_all(trace, tmp_path, jobs_list=(1, 2)):
    out = {}
    for jobs in jobs_list:
        ds = tmp_path / f"j{jobs}"
        meta = pair_trace(trace, ds, jobs=jobs)
        out[jobs] = ({f: (ds / f).read_bytes() for f in FILES}, json.dumps(meta, sort_keys=False))
    return out


def _assert_identical(out):
    first = out[1]
    for jobs, got in out.items():
        assert got[0] == first[0], f"--jobs {jobs}: Parquet files differ from --jobs 1"
        assert got[1] == first[1], f"--jobs {jobs}: trace.json differs from --jobs 1"


@pytest.mark.parametrize("name", ["sample-leak", "sample-leak-fixed"])
def test_shipped_samples_identical_for_every_jobs(tmp_path, small_chunks, name):
    _assert_identical(_pair_all(ROOT / "traces" / f"{name}.etl", tmp_path))


def _keyed_trace(path, damage: bool = False):
    w = TraceWriter(pointer_size=8, cpus=3, buffer_size=0x1000)
    base = 0xFFFFF80412000000
    for k in range(3000):
        cpu, ts = k % 3, 1_000_000_100 + 10 * k
        hook = 0x0E20 if k % 4 != 3 else 0x0E22
        addr = 0xFFFFA28000000000 + 0x100 * (k // 4)
        header = "perfinfo" if k % 5 == 0 else "system"
        w.pool(cpu, ts, hook, 0x200, "Tst1", 0x40, addr, header=header, **({} if header == "perfinfo" else
                                                                             {"tid": 8 + cpu, "pid": 4}))
        if k % 7 == 0:  # a cached stack: reference now, definition later
            w.stack_key_ref(cpu, ts, ts, 4, 8 + cpu, 0xFFFF0000 + k % 50)
            w.stack_key_def(cpu, ts + 5, 0xFFFF0000 + k % 50, [base + 0x100 + k % 50, base + 0x200])
        else:
            w.stack(cpu, ts, ts, 4, 8 + cpu, [base + 0x1000 + (k % 37), base + 0x2000, base + 0x3000 + k % 3])
    data = bytearray(w.to_bytes())
    if damage:
        data[0x5000 + 0x48 + 0x100:0x5000 + 0x48 + 0x140] = b"\xAB" * 0x40  # records of one buffer overwritten
        data = data[:-0x800]  # the last buffer cut short
    path.write_bytes(bytes(data))
    return path


def test_generated_trace_with_stack_keys_identical_for_every_jobs(tmp_path, small_chunks, monkeypatch):

    monkeypatch.setattr(workerstart, "default_jobs", lambda: 3)  # 3 workers even on a 2-core machine
    out = _pair_all(_keyed_trace(tmp_path / "keys.etl"), tmp_path, (1, 2, 3))
    _assert_identical(out)
    meta = json.loads(out[2][1])
    assert meta["pairing"]["allocs"] == 2250 and meta["pairing"]["allocations_with_stack"] > 2000


def test_damaged_trace_same_warnings_for_every_jobs(tmp_path, small_chunks):
    out = _pair_all(_keyed_trace(tmp_path / "bad.etl", damage=True), tmp_path)
    _assert_identical(out)
    meta = json.loads(out[2][1])
    assert meta["warnings"] and meta["pairing"]["bytes_skipped"] > 0


def test_small_traces_stay_in_one_process(monkeypatch):

    monkeypatch.setattr(workerstart, "PARALLEL_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(workerstart, "default_jobs", lambda: 8)
    assert decode_jobs(8, 1000) == 1
    assert decode_jobs(8, 2 << 20) == 8 and decode_jobs(1, 2 << 20) == 1 and decode_jobs(None, 2 << 20) == 8


def test_no_more_workers_than_processors_or_chunks(monkeypatch, tmp_path):
    """`--jobs 999` (typed, or copied from a bigger machine) starts no more workers than there are
    processors, nor more than chunks to decode: more would only take memory."""
    from pooltrace.etl import parallel
    from pooltrace.etl.chunks import plan_chunks
    from pooltrace.etl.reader import EtlReader

    monkeypatch.setattr(workerstart, "PARALLEL_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(workerstart, "default_jobs", lambda: 3)
    assert decode_jobs(999, 2 << 20) == 3 and decode_jobs(2, 2 << 20) == 2
    started = []
    workers = parallel.Workers
    monkeypatch.setattr(parallel, "Workers", lambda jobs, *a, **k: started.append(jobs) or workers(jobs, *a, **k))
    with EtlReader(_keyed_trace(tmp_path / "keys.etl"), chunk_bytes=64 << 10) as r:
        plan = plan_chunks(r.index, r.chunk_bytes)[:3]
        assert len(list(parallel.decode_in_workers(r, plan, 999, digest_stacks=True))) == 3
    assert started == [3]


def test_a_script_without_main_guard_is_not_run_again_by_the_workers(tmp_path):
    """spawn/forkserver import the parent's main module in every worker; pooltrace hides it."""
    script = tmp_path / "script.py"
    script.write_text(
        "import pooltrace.dataset as d, pooltrace.etl.workerstart as w\n"
        "w.PARALLEL_MIN_BYTES, d.CHUNK_BYTES = 0, 96 << 10\n"
        f"d.pair_trace({str(ROOT / 'traces' / 'sample-leak.etl')!r}, {str(tmp_path / 'ds')!r}, jobs=2)\n"
        "print('paired')\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["paired"]


def _same_chunk(got, want) -> None:
    assert got.counts == want.counts
    assert set(got.tables) == set(want.tables)
    for name, t in want.tables.items():
        g = got.tables[name]
        if isinstance(t, Columns):
            assert set(g.cols) == set(t.cols) and set(g.valid) == set(t.valid)
            for k in t.cols:
                assert np.array_equal(g.cols[k], t.cols[k]) and g.cols[k].dtype == t.cols[k].dtype, (name, k)
            for k in t.valid:
                assert np.array_equal(g.valid[k], t.valid[k]), (name, k)
            for k, (offsets, values) in t.lists.items():
                assert np.array_equal(g.lists[k][0], offsets) and np.array_equal(g.lists[k][1], values)
        else:
            assert g.equals(t)
    assert (got.digest is None) == (want.digest is None)
    for k in ("h1", "h2", "offsets", "values") if want.digest is not None else ():
        assert np.array_equal(getattr(got.digest, k), getattr(want.digest, k)), k


@pytest.mark.parametrize("hold", [False, True])
def test_reused_blocks_are_never_written_while_the_reader_holds_their_arrays(tmp_path, monkeypatch, hold):
    """The reader's shared-memory blocks are lent again only once every array made from them is freed: a
    consumer that keeps every decoded chunk (hold) gets chunks in blocks of their own once the blocks run
    out, one that drops them gets the same blocks again; either way every chunk equals its decoding in this
    process, checked after all of them were decoded."""
    from pooltrace.etl import parallel
    from pooltrace.etl.chunks import decode_buffers, plan_chunks
    from pooltrace.etl.reader import EtlReader

    reused, empty = [], []  # per chunk decoded by a worker: in a reader's block; without columns
    take = parallel._take
    monkeypatch.setattr(parallel, "_take", lambda result, blocks=None: reused.append(result[1]) or
                        empty.append(not result[2]) or take(result, blocks))
    trace = _keyed_trace(tmp_path / "keys.etl")
    with EtlReader(trace, chunk_bytes=16 << 10) as r:
        plan = plan_chunks(r.index, r.chunk_bytes)
        assert len(plan) > 3 * (2 * parallel.AHEAD + parallel.SPARE_BLOCKS)
        got = []
        for dc in parallel.decode_in_workers(r, plan, 2, digest_stacks=True):
            got.append(dc if hold else _copied(dc))
            del dc
        for (buffers, _wm), dc in zip(plan, got, strict=True):
            _same_chunk(dc, decode_buffers(r.source, r.index, buffers, int(r.user_limit), True))
    blocks = 2 * parallel.AHEAD + parallel.SPARE_BLOCKS
    assert len(reused) > 2 * blocks  # (the first chunks may be decoded here while the workers start)
    if hold:  # the first chunks took every block (a chunk without columns gives it back), later ones had their own
        assert reused[:blocks] == [True] * blocks and reused.count(True) == blocks + sum(empty)
    else:
        assert all(reused)


def _copied(dc):
    from pooltrace.etl.chunks import DecodedChunk
    from pooltrace.etl.fragments import Digest

    tables = {n: Columns({k: v.copy() for k, v in t.cols.items()}, {k: v.copy() for k, v in t.valid.items()},
                         {k: (o.copy(), v.copy()) for k, (o, v) in t.lists.items()}) if isinstance(t, Columns) else t
              for n, t in dc.tables.items()}
    d = dc.digest
    return DecodedChunk(tables, dc.counts, d and Digest(d.h1.copy(), d.h2.copy(), d.offsets.copy(), d.values.copy(),
                                                        inverse=None))


def test_chunks_whose_columns_do_not_fit_a_block_get_their_own(tmp_path, monkeypatch, small_chunks):
    from pooltrace.etl import parallel

    reused = []  # (in a reader's block, with columns) per chunk
    take = parallel._take
    monkeypatch.setattr(parallel, "_take", lambda result, blocks=None: reused.append((result[1], bool(result[2])))
                        or take(result, blocks))
    monkeypatch.setattr(parallel, "block_size", lambda chunk_bytes: 64)
    _assert_identical(_pair_all(_keyed_trace(tmp_path / "keys.etl"), tmp_path, (1, 2)))
    assert len(reused) > 3 and (False, True) in reused and (True, True) not in reused


def test_a_worker_error_reaches_the_reader_and_every_worker_stops(tmp_path):
    """A chunk a worker cannot decode raises the worker's exception in the reading process; the workers
    are stopped and the blocks a worker made for chunks it decoded meanwhile are removed."""
    import multiprocessing as mp

    from pooltrace.etl import parallel
    from pooltrace.etl.chunks import plan_chunks
    from pooltrace.etl.reader import EtlReader

    with EtlReader(_keyed_trace(tmp_path / "keys.etl"), chunk_bytes=16 << 10) as r:
        plan = plan_chunks(r.index, r.chunk_bytes)
        plan[3] = ([len(r.index) + 5], plan[3][1])  # a buffer that is not in the file
        got = []
        t0 = time.monotonic()
        with pytest.raises(IndexError):
            for dc in parallel.decode_in_workers(r, plan, 2, digest_stacks=True):
                got.append(dc.counts.records)
    assert len(got) == 3 and not mp.active_children()
    # the chunks still in flight are collected, not waited for past their answers (once 30 s: the failed
    # chunk stayed in the in-flight list and its worker's next answer was taken for it)
    assert time.monotonic() - t0 < 15


def test_a_reader_that_stops_early_stops_the_workers(tmp_path, monkeypatch):
    import multiprocessing as mp
    from multiprocessing import shared_memory

    from pooltrace.etl import parallel
    from pooltrace.etl.chunks import plan_chunks
    from pooltrace.etl.reader import EtlReader

    taken, made = [], []  # every result taken; the blocks the workers made for a chunk of their own
    take = parallel._take
    monkeypatch.setattr(parallel, "_take", lambda result, blocks=None: taken.append(result) or
                        (None if result[1] else made.append(result[0])) or take(result, blocks))
    monkeypatch.setattr(parallel, "block_size", lambda chunk_bytes: 64)  # every chunk makes its own
    with EtlReader(_keyed_trace(tmp_path / "keys.etl"), chunk_bytes=16 << 10) as r:
        chunks = parallel.decode_in_workers(r, plan_chunks(r.index, r.chunk_bytes), 2, digest_stacks=True)
        while len(taken) < 2:  # (the first chunks may be decoded here while the workers start)
            next(chunks)
        chunks.close()
    assert not mp.active_children()
    assert len(taken) == 2 + 2 * parallel.AHEAD and made  # two read, then the four in flight when it stopped
    for name in made:  # removed, those of the chunks taken and of those in flight when it stopped
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=name)


def test_chunks_are_decoded_here_while_the_workers_start(tmp_path, monkeypatch, small_chunks):
    """Starting a worker waits for the workers' server; meanwhile the reader decodes the first chunks itself
    (here a server made slow on purpose): the dataset is the same."""

    from pooltrace.etl import parallel

    SlowStart = _slow_start([], every=True)  # noqa: N806 - stands for the context class

    here = []
    decode = parallel.decode_buffers
    monkeypatch.setattr(parallel, "DECODE_WHILE_STARTING", True)
    monkeypatch.setattr(parallel, "context", SlowStart)
    monkeypatch.setattr(parallel, "decode_buffers", lambda *a: here.append(a[2]) or decode(*a))
    _assert_identical(_pair_all(_keyed_trace(tmp_path / "keys.etl"), tmp_path, (1, 2)))
    assert len(here) > 2


def test_the_first_worker_gets_chunks_as_soon_as_it_runs(tmp_path, monkeypatch):
    """The thread that starts the workers hands chunks out as soon as the first one runs (starting the next
    takes 10-60 ms, made 0.3 s here); the reader decodes chunks itself until then and no more after; the
    chunks are the same as decoded in this process, in plan order."""
    import threading

    from pooltrace.etl import parallel
    from pooltrace.etl.chunks import decode_buffers, plan_chunks
    from pooltrace.etl.reader import EtlReader

    started = []
    SlowSecondStart = _slow_start(started)  # noqa: N806 - stands for the context class

    calls, here = [], []
    submit = parallel.Feed.submit
    monkeypatch.setattr(parallel, "DECODE_WHILE_STARTING", True)
    monkeypatch.setattr(parallel, "context", SlowSecondStart)
    monkeypatch.setattr(parallel.Feed, "submit", lambda feed, workers: calls.append(
        (threading.current_thread().name, len(started), feed.next)) or submit(feed, workers))
    decode = parallel.decode_buffers
    monkeypatch.setattr(parallel, "decode_buffers", lambda *a: here.append(a[2]) or decode(*a))
    with EtlReader(_keyed_trace(tmp_path / "keys.etl"), chunk_bytes=4 << 10) as r:
        plan = plan_chunks(r.index, r.chunk_bytes)
        got = [_copied(dc) for dc in parallel.decode_in_workers(r, plan, 2, digest_stacks=True)]
        assert len(got) == len(plan)
        for (buffers, _wm), dc in zip(plan, got, strict=True):
            _same_chunk(dc, decode_buffers(r.source, r.index, buffers, int(r.user_limit), True))
    assert calls[0][:2] == ("pooltrace-decode-start", 1)  # one worker running, the second not yet
    assert here == [b for b, _wm in plan[:calls[0][2]]]  # the reader decoded the chunks before those handed out
    assert all(name != "pooltrace-decode-start" for name, _n, _k in calls[1:])


def test_a_reader_that_stops_while_decoding_itself_removes_the_workers_blocks(tmp_path, monkeypatch):
    """The consumer stops while the reader still decodes chunks itself but the start thread has handed the
    next ones to the workers already: the blocks the workers made for those are removed, the workers stop."""
    import multiprocessing as mp
    from multiprocessing import shared_memory

    from pooltrace.etl import parallel
    from pooltrace.etl.chunks import plan_chunks
    from pooltrace.etl.reader import EtlReader

    started = []
    SlowSecondStart = _slow_start(started)  # noqa: N806 - stands for the context class

    made, handed = [], []
    take, submit = parallel._take, parallel.Feed.submit
    monkeypatch.setattr(parallel, "DECODE_WHILE_STARTING", True)
    monkeypatch.setattr(parallel, "context", SlowSecondStart)
    monkeypatch.setattr(parallel, "block_size", lambda chunk_bytes: 64)  # every chunk makes its own
    monkeypatch.setattr(parallel, "_take", lambda result, blocks=None: (None if result[1] else made.append(result[0]))
                        or take(result, blocks))
    monkeypatch.setattr(parallel.Feed, "submit",
                        lambda feed, workers: handed.append(feed.next) or submit(feed, workers))
    with EtlReader(_keyed_trace(tmp_path / "keys.etl"), chunk_bytes=4 << 10) as r:
        chunks = parallel.decode_in_workers(r, plan_chunks(r.index, r.chunk_bytes), 2, digest_stacks=True)
        next(chunks)  # decoded here
        deadline = time.monotonic() + 60
        while not handed and time.monotonic() < deadline:  # the first worker runs, the second not yet
            time.sleep(0.01)
        assert handed
        chunks.close()
    assert not mp.active_children()
    assert len(made) == 2 * parallel.AHEAD  # the chunks in flight, taken back when it stopped
    for name in made:
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=name)


def test_a_killed_worker_ends_pair_in_one_line_and_leaves_no_dataset(tmp_path, small_chunks, monkeypatch):
    """A decode worker killed mid-run (the OOM killer, a user's kill): `pair` says so in one line, exits 2
    and leaves no dataset behind; nothing else in the output's folder is touched."""
    from click.testing import CliRunner

    from pooltrace.cli import cli
    from pooltrace.etl import parallel

    receive = parallel.Workers.receive

    def kill_then_receive(self, k, timeout=None):
        for proc in self.procs:
            proc.kill()
            proc.join()
        return receive(self, k, timeout)

    monkeypatch.setattr(parallel.Workers, "receive", kill_then_receive)
    (tmp_path / "keep.txt").write_text("mine")
    out = tmp_path / "ds"
    shm = Path("/dev/shm")
    before = set(shm.iterdir()) if shm.is_dir() else set()
    r = CliRunner().invoke(cli, ["pair", str(_keyed_trace(tmp_path / "keys.etl")), "-o", str(out), "--jobs", "2"])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert r.stderr.strip().splitlines() == [
        "pooltrace: error: a decode worker stopped (killed, or out of memory?); run again, or with --jobs 1 to "
        "decode in this process"]
    assert not out.exists() and (tmp_path / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "keys.etl"]
    assert (set(shm.iterdir()) if shm.is_dir() else set()) <= before  # no shared memory left behind


@pytest.mark.skipif(not Path("/proc/self/stat").exists() or "forkserver" not in
                    __import__("multiprocessing").get_all_start_methods(), reason="needs /proc and forkserver")
def test_pair_starts_the_workers_server_before_loading_the_pairing_code(tmp_path):
    """`pooltrace pair` starts the decode workers' server first, so that its imports (numpy, pyarrow, the
    decoders) run beside the command's own: when this process starts loading numpy, pyarrow or the pairing
    code, the server is already running."""
    code = ("import os, sys\n"
            "import pooltrace.etl.workerstart as w\n"
            "w.PARALLEL_MIN_BYTES, w.default_jobs = 0, lambda: 2\n"
            "seen = []\n"
            "def servers():\n"
            "    me, found = str(os.getpid()), 0\n"
            "    for pid in filter(str.isdigit, os.listdir('/proc')):\n"
            "        try:\n"
            "            stat = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()\n"
            "            cmd = open(f'/proc/{pid}/cmdline', 'rb').read()\n"
            "        except OSError:\n"
            "            continue\n"
            "        found += stat[1] == me and b'forkserver' in cmd\n"
            "    return found\n"
            "class Spy:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name in ('numpy', 'pyarrow', 'pooltrace.dataset') and not seen:\n"
            "            seen.append((name, servers()))\n"
            "sys.meta_path.insert(0, Spy())\n"
            "import atexit\n"
            "atexit.register(lambda: print(seen))\n"
            "from pooltrace.cli import main\n"
            "main()\n")
    trace = ROOT / "traces" / "sample-leak.etl"
    out = subprocess.run([sys.executable, "-c", code, "pair", str(trace), "-o", str(tmp_path / "ds"), "--jobs", "2"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    first, servers = eval(out.stdout.strip().splitlines()[-1])[0]
    assert first in ("numpy", "pyarrow") and servers == 1
    assert (tmp_path / "ds" / "allocations.parquet").is_file()


def test_decode_workers_do_not_load_pyarrow_compute():
    """What the workers' server preloads, and decoding a chunk with its stack digest, stay off
    pyarrow.compute (whose import makes a wrapper for every Arrow function: 0.04-0.1 s before the
    workers can start, in every `pair --jobs N`) and off pandas."""
    code = ("import sys; from pooltrace.arrowprobe import skip_pandas_probe; skip_pandas_probe()\n"
            "import importlib; from pooltrace.etl.workerstart import DECODERS; importlib.import_module(DECODERS)\n"
            "from pooltrace.etl.chunks import decode_buffers, plan_chunks\n"
            "from pooltrace.etl.reader import EtlReader\n"
            "r = EtlReader(sys.argv[1]); plan = plan_chunks(r.index, 1 << 16)\n"
            "dcs = [decode_buffers(r.source, r.index, b, int(r.user_limit), True) for b, _ in plan]\n"
            "assert sum(dc.digest is not None for dc in dcs) > 1\n"
            "print(sorted(m for m in ('pyarrow.compute', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "traces" / "sample-leak.etl")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_pair_in_a_fresh_process_without_pyarrow_compute(samples, tmp_path):
    """`pooltrace pair` on a trace without pool events in a process of its own (the test process has
    pyarrow.compute loaded, which hid a `pa.compute` attribute that only exists once it is imported)."""
    for name in ("SelfDescribingSingleEvent.etl", "AMSITrace.etl"):
        out = subprocess.run([sys.executable, "-m", "pooltrace", "pair", str(samples / name), "-o",
                              str(tmp_path / name), "-q", "--jobs", "1"], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads((tmp_path / name / "trace.json").read_text())["modules_with_pdb"] >= 0


def _slow_start(started: list, every: bool = False):
    """The workers' multiprocessing context with every worker start but the first (`every`: every one) delayed
    by 0.3 s, as by a slow workers' server; the processes started are appended to `started`."""
    from pooltrace.etl import parallel

    ctx = parallel.context()

    class SlowSecondStart:
        def __getattr__(self, name):
            return getattr(ctx, name)

        def Pipe(self, duplex):  # noqa: N802 - the multiprocessing context's names
            return ctx.Pipe(duplex=duplex)

        def Process(self, **kw):  # noqa: N802
            if started or every:
                time.sleep(0.3)
            started.append(ctx.Process(**kw))
            return started[-1]

    return SlowSecondStart
