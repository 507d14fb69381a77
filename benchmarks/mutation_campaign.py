"""Mutation campaign: N damaged inputs (default 10,000) through every analysis command, counted per class.

    python benchmarks/mutation_campaign.py [-n 10000] [--seed 0] [--jobs 2] [--minutes M] [--kinds truncate,...]

Cases are built by tests/mutations.py from their seed alone (so every finding can be replayed with
``--seed S -n 1``): truncated and bit-flipped traces, damaged buffer, record and logfile headers, corrupted
compressed buffers, tampered datasets and sidecars, named pipes and odd paths. Each case runs info, pair,
report (text, JSON, HTML, CSV), tags, diff and whose in a worker process (in-process through click's
CliRunner). The parent kills a worker whose case runs past --timeout (class "hang") and restarts a worker
whose peak RSS passed --max-rss-mb (class "memory"). Prints the count per class (ok, bad-input, traceback,
hang, memory, silent-damage) and the first findings of each bad class with their seeds.

Run it niced on a shared machine: ``nice -n 19 python benchmarks/mutation_campaign.py``.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import queue
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.mutations import CLASSES, KINDS, load_samples, make_case, run_case  # noqa: E402


def _worker(tasks: mp.Queue, results: mp.Queue, base: str, kinds: tuple[str, ...], max_rss_mb: int) -> None:
    base_path = Path(base)
    work_root = Path(tempfile.mkdtemp(prefix="worker-", dir=base_path))
    samples = load_samples(work_root)
    while True:
        seed = tasks.get()
        if seed is None:
            return
        work = work_root / f"case-{seed}"
        work.mkdir()
        results.put(("start", seed, None, None))
        try:
            case = make_case(seed, samples, work, kinds)
            cls, problems, _runs = run_case(case, work)
            label = f"{case.kind}: {case.label}"
        except Exception as exc:  # noqa: BLE001 - a harness failure is reported, not hidden
            cls, problems, label = "traceback", [f"harness: {type(exc).__name__}: {exc}"], "harness"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        if rss > max_rss_mb:
            cls, problems = "memory", [f"peak RSS {rss} MB", *problems]
        shutil.rmtree(work, ignore_errors=True)
        results.put(("done", seed, cls, (label, problems[:3])))
        if cls == "memory":
            return  # the peak stays: a fresh worker measures the next case


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=10_000, help="cases to run")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per case before it counts as a hang")
    ap.add_argument("--max-rss-mb", type=int, default=1500, help="peak RSS of a worker that counts as a blow-up")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated case kinds")
    ap.add_argument("--show", type=int, default=10, help="findings shown per bad class")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop after this long and count the cases finished (default: run all N)")
    args = ap.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        ap.error(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    base = tempfile.mkdtemp(prefix="pooltrace-campaign-")
    ctx = mp.get_context("spawn")
    tasks: mp.Queue = ctx.Queue()
    results: mp.Queue = ctx.Queue()
    for s in range(args.seed, args.seed + args.n):
        tasks.put(s)

    def spawn():
        p = ctx.Process(target=_worker, args=(tasks, results, base, kinds, args.max_rss_mb), daemon=True)
        p.start()
        return p

    workers = [spawn() for _ in range(args.jobs)]
    running: dict[int, float] = {}  # seed -> start time
    counts: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    findings: dict[str, list[str]] = collections.defaultdict(list)
    done = 0
    t0 = time.monotonic()
    deadline = t0 + 60 * args.minutes if args.minutes else None
    try:
        while done < args.n and (deadline is None or time.monotonic() < deadline):
            try:
                what, seed, cls, detail = results.get(timeout=1)
                if what == "start":
                    running[seed] = time.monotonic()
                    continue
                running.pop(seed, None)
                counts[cls] += 1
                by_kind[detail[0].split(":")[0]][cls] += 1
                done += 1
                if cls not in ("ok", "bad-input"):
                    findings[cls].append(f"seed {seed}: {detail[0]}: {detail[1]}")
                if done % 500 == 0:
                    rate = done / (time.monotonic() - t0)
                    print(f"{done:,}/{args.n:,} cases ({rate:.1f}/s): {dict(counts)}", flush=True)
            except queue.Empty:
                pass
            now = time.monotonic()
            for seed, started in list(running.items()):
                if now - started > args.timeout:  # a hang: kill every worker (we do not know whose it is)
                    counts["hang"] += 1
                    findings["hang"].append(f"seed {seed}: over {args.timeout:.0f} s")
                    done += 1
                    running.pop(seed)
                    for w in workers:
                        w.kill()
                    for s in list(running):  # cases the other workers were running are run again
                        tasks.put(s)
                        running.pop(s)
                    workers = [spawn() for _ in range(args.jobs)]
                    break
            for i, w in enumerate(workers):
                if not w.is_alive() and done < args.n:
                    workers[i] = spawn()  # a worker that left after a memory blow-up
    finally:
        for _ in workers:
            tasks.put(None)
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()
        shutil.rmtree(base, ignore_errors=True)
    secs = time.monotonic() - t0
    stopped = " (stopped by --minutes)" if done < args.n else ""
    print(f"\n{done:,} cases in {secs:,.0f} s ({done / max(secs, 1e-9):.1f} cases/s), seeds from {args.seed}"
          f"{stopped}")
    for cls in CLASSES:
        print(f"  {cls:14} {counts[cls]:7,}")
    print("\nper kind:")
    for kind in sorted(by_kind):
        print(f"  {kind:20} " + ", ".join(f"{c} {n:,}" for c, n in sorted(by_kind[kind].items())))
    for cls in ("traceback", "hang", "memory", "silent-damage"):
        for line in findings[cls][:args.show]:
            print(f"{cls}: {line}")
    return 0 if not any(counts[c] for c in ("traceback", "hang", "memory", "silent-damage")) else 1


if __name__ == "__main__":
    sys.exit(main())
