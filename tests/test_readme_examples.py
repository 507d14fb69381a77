"""Every command example of the README's "Start here", "Commands" and `whose` sections runs, on a copy of
the shipped samples, and every output line the README shows is what the command prints today (a line
ending in `...` is compared up to there). The `pair` example's figures are also checked against the
sample's truth file, so a regenerated sample cannot leave a stale README behind. (The trend and run store
examples are run by tests/test_store.py; recording needs Windows.)"""

from __future__ import annotations

import json
import re
import shlex
import shutil

import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(start: str, stop_at=("\n## ",)) -> str:
    text = README.split(start, 1)[1]
    end = min((i for i in (text.find(s) for s in stop_at) if i >= 0), default=len(text))
    return text[:end]


def _blocks(text: str) -> list[list[str]]:
    """The lines of each fenced block without a language tag (```sql, ```python blocks are not commands)."""
    blocks, cur, lang = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if cur is None:
                cur, lang = [], line[3:].strip()
            else:
                if not lang:
                    blocks.append(cur)
                cur = None
        elif cur is not None:
            cur.append(line)
    return blocks


def examples() -> list[tuple[str, list[str]]]:
    """(command line, the output lines shown below it) for every example in the sections run here."""
    commands = _section("## Commands").split("### `pooltrace trend", 1)[0]
    parts = [_section("## Start here"), commands, _section("### `pooltrace whose", ("\n## ", "\n### "))]
    out = []
    for part in parts:
        for lines in _blocks(part):
            for i, line in enumerate(lines):
                cmd = line[2:] if line.startswith("$ ") else line.split("&& ")[-1]
                if not cmd.startswith("pooltrace "):
                    continue
                shown = []
                if line.startswith("$ "):
                    for more in lines[i + 1:]:
                        if more.startswith("$ "):
                            break
                        shown.append(more)
                out.append((cmd, shown))
    return out


EXAMPLES = examples()


def test_the_readme_has_the_examples_this_test_runs():
    cmds = [c for c, _ in EXAMPLES]
    assert any(c.startswith("pooltrace pair ") for c in cmds) and any(c.startswith("pooltrace whose ") for c in cmds)
    assert sum(1 for _, shown in EXAMPLES if shown) >= 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "traces", d / "traces", ignore=shutil.ignore_patterns("*.pooltrace", "__pycache__"))
    shutil.copytree(ROOT / "tests" / "fixtures" / "symbols", d / "tests" / "fixtures" / "symbols")
    return d


@pytest.mark.parametrize("cmd,shown", EXAMPLES, ids=[c for c, _ in EXAMPLES])
def test_readme_example(cmd, shown, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("POOLTRACE_CACHE", str(workdir / "cache"))
    for var in ("_NT_SYMBOL_PATH", "_NT_ALT_SYMBOL_PATH", "POOLTRACE_POOLTAG", "COLUMNS"):
        monkeypatch.delenv(var, raising=False)
    r = CliRunner().invoke(cli, shlex.split(cmd)[1:])
    allowed = (0, 1) if "--fail-on-growth" in cmd else (0,)
    assert r.exit_code in allowed, (cmd, r.output)
    got = r.stdout.splitlines()
    for k, want in enumerate(shown):
        want = want.replace("/path/to/", f"{workdir}/")
        assert k < len(got), (cmd, want, r.stdout)
        if want.endswith("..."):
            assert got[k].startswith(want[:-3]), (cmd, want, got[k])
        else:
            assert got[k] == want, (cmd, want, got[k])


def test_pair_example_figures_are_the_samples_truth():
    cmd, shown = next((c, s) for c, s in EXAMPLES if c.startswith("pooltrace pair ") and s)
    trace = cmd.split()[2]
    expected = json.loads((ROOT / trace.replace(".etl", ".truth.json")).read_text())["expected_pair"]
    nums = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", shown[0].split(": ", 1)[1])]
    assert nums[:5] == [expected["allocs"], expected["frees"], expected["outstanding"]["count"],
                        expected["outstanding"]["bytes"], expected["lost_free"]]
