"""The HTML reports driven in Debian's Chromium through Playwright, as a user would: zoom into the flame graph
and back, search, click a table row, hover the time chart, an 800 px window, the differential page's
legend, tag totals and tooltips, and a trace without pool events. One browser for the module; skips when
Playwright or Chromium is missing (never `playwright install`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from pooltrace.etl.writer import TraceWriter
from tests.conftest import ROOT

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = Path("/usr/bin/chromium") if Path("/usr/bin/chromium").exists() else (
    Path(shutil.which("chromium")) if shutil.which("chromium") else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TRACES = ROOT / "traces"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory, shipped):
    """The pages under test, made from the session's copy of traces/ (pairing on the fly writes a cache beside
    the trace; the source tree must stay untouched)."""
    d = tmp_path_factory.mktemp("html")
    out = {"report": d / "report.html", "diff": d / "diff.html", "empty": d / "empty.html"}
    r = CliRunner().invoke(cli, ["report", str(shipped / "sample-growth.etl"), "--format", "html", "-o",
                                 str(out["report"])])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["diff", str(shipped / "sample-leak.etl"), str(shipped / "sample-leak-fixed.etl"),
                                 "--format", "html", "-o", str(out["diff"])])
    assert r.exit_code == 0, r.output
    w = TraceWriter(pointer_size=8, cpus=1)  # a kernel trace with images but no pool events
    t = w.start_qpc + 10
    w.image(0, t, 0x1403, 0xFFFFF80000000000, 0x10000, 0, "\\SystemRoot\\system32\\ntoskrnl.exe")
    w.save(d / "nopool.etl")
    r = CliRunner().invoke(cli, ["report", str(d / "nopool.etl"), "--format", "html", "-o", str(out["empty"])])
    assert r.exit_code == 0, r.output
    return out


class Page:
    """A page opened at `width`, recording console messages and every request other than the file itself."""

    def __init__(self, browser, path: Path, width: int = 1200):
        self.ctx = browser.new_context(viewport={"width": width, "height": 900})
        self.page = self.ctx.new_page()
        self.console: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"error: {e}"))
        self.page.on("request", lambda r: r.url != path.as_uri() and self.requests.append(r.url))
        self.page.goto(path.as_uri())

    def close(self) -> tuple[list[str], list[str]]:
        self.ctx.close()
        return self.console, self.requests


def test_report_page_zoom_search_rows_and_chart(browser, pages):
    truth = json.loads((TRACES / "sample-growth.truth.json").read_text())["truth"]
    v = Page(browser, pages["report"])
    p = v.page
    rows = p.locator("#groups tbody tr")
    assert rows.count() == len(truth) and p.locator("svg.spark").count() == rows.count()
    assert sorted(p.locator("#groups .cls").all_inner_texts()) == sorted(t["class"] for t in truth.values())
    assert "KiB" in p.locator("#flame").inner_text()
    # zoom: a narrow frame fills the width after a click, and back restores it
    box = p.locator(".fr", has_text="leaky.sys!AllocateLeakyBuffer").first
    before = box.bounding_box()["width"]
    box.click()
    after = p.locator(".fr", has_text="leaky.sys!AllocateLeakyBuffer").first.bounding_box()["width"]
    assert after > 3 * before and p.locator(".fr").count() < 40
    p.click("#back")
    assert abs(p.locator(".fr", has_text="leaky.sys!AllocateLeakyBuffer").first.bounding_box()["width"] - before) < 1
    # search: matches highlighted, with their share of the bytes
    p.fill("#search", "leaky.sys")
    leak_share = 100 * truth["leak"]["outstanding_bytes"] / sum(t["outstanding_bytes"] for t in truth.values())
    assert p.locator(".fr.hit").count() >= 2 and f"{leak_share:.1f}% of outstanding bytes" in p.inner_text("#found")
    p.fill("#search", "")
    # a row click highlights its whole stack
    p.locator("#groups tbody tr", has_text="leaky.sys!AllocateLeakyBuffer").click()
    assert p.locator(".fr.sel").count() == len(truth["leak"]["frames"])
    # the chart: labelled axes, a hover value
    assert p.locator("#plot text.xlabel").count() == 1 and p.locator("#plot text.ylabel").count() == 1
    hover = p.locator("#plot rect.hover").bounding_box()
    p.mouse.move(hover["x"] + hover["width"] * 0.99, hover["y"] + 20)
    tip = p.inner_text("#tip")
    assert p.is_visible("#tip") and " s\n" in tip and "Leak" in tip and "KiB" in tip
    assert v.close() == ([], [])


def test_no_horizontal_overflow_at_800px(browser, pages):
    for name in ("report", "diff"):
        v = Page(browser, pages[name], width=800)
        assert v.page.evaluate("document.documentElement.scrollWidth") <= 800, name
        assert v.close() == ([], [])


def test_diff_page_legend_tags_blocks_and_tooltips_inside(browser, pages):
    v = Page(browser, pages["diff"])
    p = v.page
    assert p.is_visible("#legend") and "grown" in p.inner_text("#legend") and "shrunk" in p.inner_text("#legend")
    tags = p.locator("#tags tbody tr").all_inner_texts()
    assert len(tags) == 7 and any(t.split("\t")[1] == "Lea2" for t in tags)
    head = p.locator("#groups thead th").all_inner_texts()
    assert {"BASE blocks", "NEW blocks", "Δ blocks"} <= set(head)
    vw = p.viewport_size["width"]
    right = max(p.locator(".fr").all(), key=lambda e: e.bounding_box()["x"] + e.bounding_box()["width"])
    b = right.bounding_box()
    p.mouse.move(b["x"] + b["width"] - 2, b["y"] + 5)
    t = p.locator("#tip").bounding_box()
    assert p.is_visible("#tip") and t["x"] >= 0 and t["x"] + t["width"] <= vw
    assert v.close() == ([], [])


def test_trace_without_pool_events_shows_the_verdict(browser, pages):
    v = Page(browser, pages["empty"])
    p = v.page
    assert p.is_visible("#verdict") and "no pool events" in p.inner_text("#verdict")
    assert p.locator(".fr").count() == 0 and not p.is_visible("#flame") and not p.is_visible("#plot")
    assert v.close() == ([], [])
