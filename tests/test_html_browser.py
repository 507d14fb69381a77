"""The HTML reports in a real headless Chromium (Debian's package): the flame graph, table and plot
render, the console stays empty, and the page makes no network request. Skips where Chromium is absent."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading

import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from pooltrace.etl.writer import TraceWriter

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


class Trap:
    """A loopback proxy that only counts connections: any request the page makes lands here."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(1)
            try:
                first = conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
            except OSError:
                first = ""
            self.requests.append(first)
            conn.close()

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        self.sock.close()


def render(page, tmp_path) -> tuple[str, list[str], int]:
    trap = Trap()
    try:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
             f"--user-data-dir={tmp_path / 'profile'}", f"--proxy-server=http://127.0.0.1:{trap.port}",
             "--proxy-bypass-list=<-loopback>", "--enable-logging=stderr", "--v=0", "--window-size=1200,900",
             "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120)
    finally:
        trap.close()
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console, [r for r in trap.requests if not _browser_service(r)]


def _browser_service(request_line: str) -> bool:
    """Chromium's own background calls (clock, account and update services) go to Google hosts whatever
    the page does; the page itself has no URL at all (checked statically in test_report.py)."""
    parts = request_line.split()
    target = parts[1] if len(parts) > 1 else ""
    host = target.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    return host.endswith((".google.com", ".googleapis.com", ".gvt1.com", ".gstatic.com"))


def test_report_page_renders_without_errors_or_requests(tmp_path, shipped):
    page = tmp_path / "r.html"
    result = CliRunner().invoke(cli, ["report", str(shipped / "sample-leak.etl"), "--format", "html",
                                      "-o", str(page), "--no-symbols"])
    assert result.exit_code == 0, result.output
    dom, console, requests = render(page, tmp_path)
    assert console == [] and requests == []
    assert dom.count('class="fr') >= 20  # flame graph boxes
    assert dom.count("<tr>") >= 5  # header + groups
    assert "<polyline" in dom and "leaky.sys+0x" in dom


def test_diff_page_renders(tmp_path, shipped):
    page = tmp_path / "d.html"
    t = shipped
    result = CliRunner().invoke(cli, ["diff", str(t / "sample-leak.etl"), str(t / "sample-leak-fixed.etl"),
                                      "--format", "html", "-o", str(page), "--no-symbols"])
    assert result.exit_code == 0, result.output
    dom, console, requests = render(page, tmp_path)
    assert console == [] and requests == []
    assert dom.count('class="fr') >= 10 and "hsl(0," in dom  # grown frames coloured red


def test_trace_markup_is_text_in_the_browser(tmp_path):
    w = TraceWriter(pointer_size=8, cpus=1)
    t = w.start_qpc + 10
    w.image(0, t, 0x1403, 0xFFFFF80000000000, 0x10000, 0, "\\SystemRoot\\<img src=x onerror=alert(1)>.sys")
    w.pool(0, t + 5, 0x0E20, 0, "<b>\x00", 64, 0xFFFFA00000001000, tid=8, pid=4)
    w.stack(0, t + 5, t + 5, 4, 8, [0xFFFFF80000000100])
    w.save(tmp_path / "evil.etl")
    page = tmp_path / "e.html"
    CliRunner().invoke(cli, ["report", str(tmp_path / "evil.etl"), "--format", "html", "-o", str(page)])
    dom, console, requests = render(page, tmp_path)
    assert console == [] and requests == []
    assert "<img" not in dom and "&lt;img src=x onerror=alert(1)&gt;.sys+0x100" in dom
