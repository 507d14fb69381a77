"""``pooltrace doctor``: check this machine can record, with a short test recording (logic in
:mod:`pooltrace.collector.doctor`)."""

from __future__ import annotations

from pathlib import Path

import click

from pooltrace.cli.common import user_errors
from pooltrace.collector.config import constants
from pooltrace.errors import PooltraceError

REPORT = constants()["doctor"]["report"]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=REPORT, show_default=True,
              metavar="FILE.json", help="Where to write the report (attach it to a bug report).")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=None, hidden=True)
@user_errors
def doctor(output: Path, seconds: float | None) -> None:
    """Check that this machine can record pool traces with stacks (Windows 8.1+, x64, elevated).

    Elevation, Windows build and architecture, free disk, running kernel sessions and free slots, then a
    3-second test recording of pool tag File (provoked by creating and closing files), read back with
    pooltrace's own reader. One line per check with the fix; exit 0 when all pass, 1 when one failed.
    """
    from pooltrace.cli.record import windows_api
    from pooltrace.collector.doctor import Doctor, check_report_path, write_report

    api = windows_api()
    output = Path(output)
    check_report_path(output)
    report = Doctor(api, Path.cwd(), seconds=seconds, on_check=lambda c: click.echo(c.line())).run()
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    try:
        write_report(output, report)
    except OSError as exc:
        raise PooltraceError(f"cannot write {output}: {exc.strerror or exc}") from exc
    click.echo(f"{'all checks passed' if report.ok else 'a check failed'}; wrote {output}")
    if not report.ok:
        raise SystemExit(1)
