"""``pooltrace doctor``: the checks a Windows user runs first and attaches to a bug report.

Machine checks (elevation; Windows build and architecture; free disk; running kernel sessions and free
system-logger slots), then a short test recording filtered on a tag the doctor provokes itself from user
mode (``File``: creating and closing files, see providers/session.toml [doctor]), read back with pooltrace's
own reader and pairing: pool events present, share of allocations with stacks, stacks that reach ntoskrnl,
drivers in the module map, only the filtered tag seen, sidecar identities present, and the read-back of
what the kernel put in effect. Every check is one line with pass/fail and the fix; everything also goes
into ``pooltrace-doctor.json``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pooltrace import __version__
from pooltrace.collector.boundary import WindowsApi
from pooltrace.collector.config import constants
from pooltrace.collector.configure import KernelRefused, KernelState
from pooltrace.collector.plan import MB, RecordRequest, check_platform
from pooltrace.collector.recorder import Recorder, RecordResult
from pooltrace.collector.stop import list_sessions
from pooltrace.collector.tagfilter import parse_pattern, tag_matches
from pooltrace.errors import PooltraceError
from pooltrace.tags import parse_tag

FORMAT = "pooltrace-doctor"

@dataclass
class Check:
    name: str
    ok: bool | None  # None: not run (an earlier check failed)
    detail: str
    fix: str = ""
    data: dict = field(default_factory=dict)

    def line(self) -> str:
        mark = {True: "pass", False: "FAIL", None: "skip"}[self.ok]
        return f"{mark}  {self.name}: {self.detail}" + (f" — fix: {self.fix}" if self.fix and not self.ok else "")


@dataclass
class DoctorReport:
    checks: list[Check]
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "created_by": f"pooltrace {__version__}", "ok": self.ok,
                "checks": [asdict(c) for c in self.checks], "warnings": self.warnings}


def check_report_path(path: Path) -> None:
    """pooltrace-doctor.json is ours to replace only when pooltrace doctor wrote it."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        ours = path.is_file() and not path.is_symlink() and \
            json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise PooltraceError(f"{path} exists and was not written by pooltrace doctor: move it, or write the report "
                             "elsewhere with -o")


def write_report(path: Path, report: DoctorReport) -> None:
    check_report_path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.as_dict(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Doctor:
    def __init__(self, api: WindowsApi, workdir: Path, *, seconds: float | None = None,
                 on_check: Callable[[Check], None] | None = None):
        self.api, self.workdir = api, workdir
        self.cfg = constants()["doctor"]
        self.seconds = self.cfg["seconds"] if seconds is None else seconds
        self.on_check = on_check or (lambda c: None)
        self.checks: list[Check] = []
        self.warnings: list[str] = []

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        self.on_check(check)
        return check

    # -- machine checks
    def machine(self) -> bool:
        c, api = constants(), self.api
        admin = api.is_admin()
        self.add(Check("elevation", admin, "running elevated" if admin else "not elevated",
                       "run from an elevated prompt (Run as administrator)"))
        try:
            version = check_platform(api)
            self.add(Check("windows", True, f"Windows {'.'.join(map(str, version))}, x64, 64-bit Python",
                           data={"version": list(version)}))
            platform_ok = True
        except PooltraceError as exc:
            self.add(Check("windows", False, str(exc), "use Windows 8.1 or later, x64, with 64-bit Python"))
            platform_ok = False
        free = api.free_bytes(str(self.workdir))
        need = c["disk"]["min_free_mb"]
        self.add(Check("disk", free >= need * MB, f"{free // MB:,} MB free in {self.workdir} (recording needs "
                       f"{need:,} MB)", "free some space or run doctor from another drive",
                       data={"free_mb": free // MB}))
        if admin and platform_ok:
            self.sessions()
        else:
            self.add(Check("sessions", None, "not checked (needs an elevated prompt on a supported Windows)"))
        return admin and platform_ok

    def sessions(self) -> None:
        logger = constants()["logger"]
        try:
            running = list_sessions(self.api)
        except PooltraceError as exc:
            self.add(Check("sessions", False, str(exc), "run from an elevated prompt"))
            return
        reserved = set(logger["reserved_system_logger_names"])
        private = [s.name for s in running if s.system_logger and s.name not in reserved]
        free = logger["system_logger_slots"] - logger["reserved_system_logger_slots"] - len(private)
        ours = [s.name for s in running if s.ours]
        kernel = [s.name for s in running if s.system_logger]
        detail = (f"{len(running)} trace sessions running, kernel ones: {', '.join(kernel) or 'none'}; "
                  f"{max(free, 0)} of {logger['system_logger_slots'] - logger['reserved_system_logger_slots']} "
                  "system-logger slots free")
        if ours:
            self.add(Check("sessions", False, detail + f"; pooltrace sessions left running: {', '.join(ours)}",
                           "end them with `pooltrace stop`", data={"running": [s.name for s in running]}))
        else:
            self.add(Check("sessions", free > 0, detail, "stop another kernel trace session (`logman query -ets` "
                           "lists them; `logman stop NAME -ets`)", data={"running": [s.name for s in running],
                                                                        "free_slots": free}))

    # -- the test recording
    def recording(self, tmp: Path) -> None:
        c = constants()
        tag = parse_pattern(self.cfg["tag"])
        out = tmp / "pooltrace-doctor.etl"
        request = RecordRequest(
            output=out, tags=(tag.text,), duration_s=self.seconds + 30,
            command=(sys.executable, "-m", "pooltrace.collector.provoke", str(tmp), str(self.seconds)),
            session_name=c["logger"]["doctor_name"], session_guid=c.doctor_guid)
        try:
            result = Recorder(self.api, request).run()
        except KernelRefused as exc:
            self.add(Check("test recording", False, "the session started, but not everything asked was in effect",
                           "see the read-back line; attach pooltrace-doctor.json to a bug report"))
            self.read_back(exc.state)
            return
        except PooltraceError as exc:
            self.add(Check("test recording", False, str(exc), "fix what it says, then run pooltrace doctor again"))
            return
        self.warnings += result.warnings
        self.add(Check("test recording", True, f"{result.seconds:.1f} s, {result.file_bytes:,} bytes, tag "
                       f"filter {tag.text}, creating and closing files meanwhile",
                       data={"stopped_by": result.stopped_by, "events_lost": result.stats.events_lost
                             if result.stats else None}))
        self.read_back(result.kernel_state)
        self.analyze(result, tag.value, tmp)

    def read_back(self, state: KernelState | None) -> None:
        if state is None:
            self.add(Check("read-back", False, "nothing was read back", "attach pooltrace-doctor.json to a bug report"))
            return
        parts = {"pool events": state.pool_enabled, "stacks": state.stacks_enabled,
                 "tag filter": state.tag_filter_in_effect}
        text = ", ".join(f"{k} {'on' if v else 'unknown' if v is None else 'NOT on'}" for k, v in parts.items())
        ok = all(v is True for v in parts.values())
        self.add(Check("read-back", ok, text + f" (stacks set by {state.stacks_set_by})",
                       "attach pooltrace-doctor.json to a bug report", data=state.as_dict()))

    def analyze(self, result: RecordResult, tag: int, tmp: Path) -> None:
        from pooltrace.dataset import pair_trace
        from pooltrace.datasetopen import load_dataset  # the data stack, at analysis time only
        from pooltrace.modulemap import KERNEL_IMAGES

        try:
            pair_trace(result.output, tmp / "ds")
            ds = load_dataset(tmp / "ds")
        except PooltraceError as exc:
            self.add(Check("pool events", False, f"pooltrace could not read the test trace: {exc}",
                           "attach pooltrace-doctor.json to a bug report"))
            return
        import numpy as np

        n = ds.n
        self.add(Check("pool events", n > 0, f"{n:,} pool allocations in the test trace",
                       "the POOL group was not in effect: attach pooltrace-doctor.json to a bug report",
                       data={"allocations": n}))
        stacks = ds.rows["alloc_stack"]
        share = float((stacks >= 0).mean()) if n else 0.0
        self.add(Check("stacks", n > 0 and share >= self.cfg["min_stack_share"],
                       f"{share:.0%} of the allocations have a stack", "stack walking was not in effect for pool "
                       "events: attach pooltrace-doctor.json to a bug report", data={"share": share}))
        self.reach(ds, np.unique(stacks[stacks >= 0]), KERNEL_IMAGES)
        seen = sorted({ds.tags[i] for i in np.unique(ds.rows["tag"]).tolist()}) if n else []
        only = bool(seen) and all(tag_matches(parse_tag(t), tag) for t in seen)
        self.add(Check("tag filter", only, f"tags seen: {', '.join(seen) or 'none'}",
                       "the kernel did not filter by tag: attach pooltrace-doctor.json to a bug report",
                       data={"tags": seen}))
        side = json.loads(result.sidecar.read_text(encoding="utf-8")) if result.sidecar else {}
        ids = [m for m in side.get("modules", []) if m.get("pdb_guid")]
        nt = any((m.get("name") or "").lower() in KERNEL_IMAGES for m in ids)
        self.add(Check("sidecar identities", bool(ids) and nt,
                       f"{len(ids):,} drivers with a PDB identity" + ("" if nt else ", none for ntoskrnl"),
                       "the driver files could not be read: see module_errors in the sidecar",
                       data={"identities": len(ids), "errors": side.get("module_errors", [])[:20],
                             "module_bases": side.get("recording", {}).get("module_bases")}))

    def reach(self, ds, stack_ids, kernel_images) -> None:
        import numpy as np

        from pooltrace.modulemap import ModuleMap

        rows = ds.modules.select(["name", "pid"]).to_pylist() if ds.modules.num_rows else []
        names = [(r["name"] or "").lower() for r in rows]
        driver_rows = {i for i, r in enumerate(rows) if r["pid"] == 0 and names[i] not in kernel_images}
        nt_rows = {i for i, n in enumerate(names) if n in kernel_images}
        drivers = sorted({names[i] for i in driver_rows})
        mm = ModuleMap(ds.modules)
        with_nt = with_driver = 0
        for sid in stack_ids.tolist():
            mods, _ = mm.locate(np.asarray(ds.stacks[sid].as_py(), dtype=np.uint64))
            hit = set(mods.tolist())
            with_nt += bool(hit & nt_rows)
            with_driver += bool(hit & driver_rows)
        total = len(stack_ids)
        ok = with_nt > 0 and bool(drivers)
        self.add(Check("stacks reach the kernel", ok,
                       f"{with_nt:,} of {total:,} distinct stacks reach ntoskrnl, {with_driver:,} a driver; "
                       f"{len(drivers):,} drivers in the module map",
                       "kernel frames or image events are missing: attach pooltrace-doctor.json to a bug report",
                       data={"stacks": total, "reach_ntoskrnl": with_nt, "reach_driver": with_driver,
                             "drivers": len(drivers)}))

    def run(self) -> DoctorReport:
        if self.machine():
            with tempfile.TemporaryDirectory(prefix="pooltrace-doctor-", dir=self.workdir) as tmp:
                self.recording(Path(tmp))
        else:
            self.add(Check("test recording", None, "not run (the checks above must pass first)"))
        return DoctorReport(self.checks, self.warnings)


def doctor(api: WindowsApi, workdir: Path, **kw) -> DoctorReport:
    return Doctor(api, workdir, **kw).run()


def report_lines(report: DoctorReport) -> Sequence[str]:
    return [c.line() for c in report.checks]
