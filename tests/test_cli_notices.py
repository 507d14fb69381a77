"""No silent pass: a trace without pool events, losses the trace recorded, hidden rows, filters that match
nothing and missing symbols are said by report, tags, diff and whose, in every format; a CI gate never
passes on a trace without pool events."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pooltrace.cli import cli
from pooltrace.etl.writer import TraceWriter
from tests.conftest import SAMPLES


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def no_pool(tmp_path_factory):
    """A kernel trace with an image load and a process, but no pool events (the POOL group was off)."""
    w = TraceWriter(pointer_size=8, cpus=1)
    t = w.start_qpc + 10
    w.image(0, t, 0x1403, 0xFFFFF80000000000, 0x10000, 0, "\\SystemRoot\\system32\\ntoskrnl.exe")
    path = tmp_path_factory.mktemp("nopool") / "nopool.etl"
    w.save(path)
    return path


@pytest.fixture(scope="module")
def leak(shipped):
    return shipped / "sample-leak.etl"


@pytest.fixture(scope="module")
def fixed(shipped):
    return shipped / "sample-leak-fixed.etl"


@pytest.fixture(scope="module")
def truth(shipped):
    return json.loads((shipped / "sample-leak.truth.json").read_text())


def test_report_and_tags_say_there_are_no_pool_events(no_pool, tmp_path):
    for args in (["report", no_pool], ["tags", no_pool]):
        r = run(*args)
        assert r.exit_code == 0 and "no pool events" in r.stdout, r.output
        data = json.loads(run(*args, "--format", "json").stdout)
        assert "no pool events" in data["verdict"]
    page = tmp_path / "r.html"
    assert run("report", no_pool, "--format", "html", "-o", page).exit_code == 0
    assert "no pool events" in page.read_text()
    r = run("report", no_pool, "--format", "csv")
    assert "no pool events" in r.stderr


def test_diff_gate_never_passes_on_a_trace_without_pool_events(no_pool, leak):
    for a, b in ((no_pool, leak), (leak, no_pool), (no_pool, no_pool)):
        r = run("diff", a, b, "--fail-on-growth", "1MB", "--no-symbols")
        assert r.exit_code == 2, r.output
        assert "no pool events" in r.stderr and "cannot pass on nothing" in r.stderr
        side = "BASE and NEW have" if a == b else "BASE has" if a == no_pool else "NEW has"
        assert f"error: {side} no pool events" in r.stderr  # was "BASE and NEW has"
    data = json.loads(run("diff", no_pool, leak, "--format", "json", "--no-symbols").stdout)
    assert "no pool events" in data["base"]["verdict"] and data["new"]["verdict"] is None


def test_diff_json_carries_the_gate(leak, fixed):
    r = run("diff", leak, fixed, "--format", "json", "--fail-on-growth", "1", "--per-group", "--no-symbols")
    gate = json.loads(r.stdout)["gate"]
    assert r.exit_code == 1
    assert gate["threshold"] == "1" and gate["per_group"] is True and gate["passed"] is False and gate["reason"]
    r = run("diff", leak, fixed, "--format", "json", "--fail-on-growth", "10MB", "--no-symbols")
    assert r.exit_code == 0 and json.loads(r.stdout)["gate"] == {"threshold": "10MB", "per_group": False,
                                                                  "passed": True, "reason": None}
    assert json.loads(run("diff", leak, fixed, "--json", "--no-symbols").stdout)["gate"] is None


def test_losses_recorded_in_the_trace_are_in_every_report_header(leak, tmp_path):
    trace = json.loads((leak.with_name("sample-leak.pooltrace") / "trace.json").read_text()) \
        if leak.with_name("sample-leak.pooltrace").is_dir() else None
    data = json.loads(run("report", leak, "--format", "json", "--no-symbols").stdout)
    trace = trace or json.loads((leak.with_name("sample-leak.pooltrace") / "trace.json").read_text())
    lost = trace["lost"]["events"]
    if not lost and not trace["warnings"]:
        pytest.skip("the shipped sample records no loss")
    assert data["warnings"] and all(w in data["warnings"] for w in trace["warnings"])
    text = run("report", leak, "--no-symbols").stdout
    assert all(f"warning: {w}"[:60] in text.replace("\n    ", " ") for w in data["warnings"])
    tags = json.loads(run("tags", leak, "--format", "json").stdout)
    assert tags["warnings"] == data["warnings"]
    page = tmp_path / "r.html"
    run("report", leak, "--format", "html", "-o", page, "--no-symbols")
    assert data["warnings"][0][:40] in page.read_text()


def test_hidden_rows_get_a_footer_in_every_format(leak):
    full = json.loads(run("report", leak, "--format", "json", "--no-symbols").stdout)
    top = json.loads(run("report", leak, "--format", "json", "--no-symbols", "--top", "2").stdout)
    rest = full["groups"][2:]
    assert top["hidden"] == {"groups": len(rest), "bytes": sum(g["bytes"] for g in rest), "reason": "--top 2"}
    text = run("report", leak, "--no-symbols", "--top", "2").stdout
    assert f"{len(rest):,} more groups, {sum(g['bytes'] for g in rest):,} bytes not shown (--top 2)" in text
    small = min(g["bytes"] for g in full["groups"])
    mb = json.loads(run("report", leak, "--format", "json", "--no-symbols", "--min-bytes", small + 1).stdout)
    assert mb["hidden"]["groups"] == sum(g["bytes"] <= small for g in full["groups"]) and "--min-bytes" in \
        mb["hidden"]["reason"]
    csv = run("report", leak, "--format", "csv", "--no-symbols", "--top", "2")
    assert "more groups" in csv.stderr and len(csv.stdout.splitlines()) == 3
    tags = json.loads(run("tags", leak, "--format", "json", "--top", "1").stdout)
    assert tags["hidden"]["rows"] >= 1 and "more tags" in run("tags", leak, "--top", "1").stdout


def test_diff_top_keeps_the_biggest_changes(leak, fixed):
    every = json.loads(run("diff", leak, fixed, "--format", "json", "--no-symbols").stdout)["groups"]
    top = json.loads(run("diff", leak, fixed, "--format", "json", "--no-symbols", "--top", "2").stdout)
    want = sorted(abs(g["delta_bytes"]) for g in every)[-2:]
    assert sorted(abs(g["delta_bytes"]) for g in top["groups"]) == want
    assert top["hidden"]["groups"] == len(every) - 2
    assert "more groups not shown" in run("diff", leak, fixed, "--no-symbols", "--top", "2").stdout


def test_list_shows_call_sites_of_the_biggest_group_first_with_hex_addresses(leak, truth):
    data = json.loads(run("report", leak, "--format", "json", "--list", "--no-symbols").stdout)
    first = data["groups"][0]
    blocks = data["blocks"]
    assert blocks[0]["call_site"] != blocks[0]["frames"][0]  # the call site, not the allocator frame
    assert all(b["address"].startswith("0x") and int(b["address"], 16) > 2 ** 53 for b in blocks[:5])
    assert sum(1 for b in blocks if b["tag"] in first["tags"]) >= first["count"]
    assert [b["tag"] for b in blocks[:first["count"]]] == [next(iter(first["tags"]))] * first["count"]
    assert data["blocks_hidden"]["count"] == data["totals"]["outstanding_count"] - len(blocks)
    text = run("report", leak, "--list", "--no-symbols", "--top", "1").stdout
    assert "blocks of groups not shown" in text and "ExAllocatePool" not in text.split("outstanding blocks")[1]


def test_filters_that_match_nothing_name_the_closest(leak):
    r = run("report", leak, "--tag", "leak")
    assert r.exit_code == 2 and "matches no tag" in r.stderr and "closest: Leak" in r.stderr
    r = run("report", leak, "--module", "leaky")
    assert r.exit_code == 2 and "closest: leaky.sys" in r.stderr
    assert run("tags", leak, "--tag", "Lek").exit_code == 2
    assert run("report", leak, "--tag", "Le*", "--no-symbols").exit_code == 0
    # a process that allocated nothing: said, like a tag or module (was an empty report, exit 0)
    pids = json.loads(run("report", leak, "--list", "--format", "json", "--no-symbols").stdout)["blocks"]
    pid = pids[0]["pid"]
    assert run("report", leak, "--pid", str(pid), "--no-symbols").exit_code == 0
    r = run("report", leak, "--pid", "999999", "--no-symbols")
    assert r.exit_code == 2 and "--pid 999999 allocated nothing in this trace" in r.stderr
    assert run("tags", leak, "--pid", "999999").exit_code == 2


def test_missing_symbols_are_one_summary_line(leak):
    data = json.loads(run("report", leak, "--format", "json").stdout)
    assert data["symbols"].startswith("no PDB for ") and "_NT_SYMBOL_PATH" in data["symbols"]
    text = run("report", leak).stdout
    assert sum("no PDB for" in line for line in text.splitlines()) == 1
    assert json.loads(run("report", leak, "--format", "json", "--no-symbols").stdout)["symbols"] is None


def test_whose_says_no_pool_events_and_the_closest_tag(no_pool, leak):
    r = CliRunner().invoke(cli, ["whose", "Leak", str(no_pool), "--no-scan"])
    assert r.exit_code == 0 and "no pool events" in r.stdout
    data = json.loads(CliRunner().invoke(cli, ["whose", "leak", str(leak), "--no-scan", "--format", "json"]).stdout)
    assert data["trace"]["tags"] == [] and data["trace"]["closest_tags"][0] == "Leak"
    assert data["trace"]["pool_verdict"] is None
    r = CliRunner().invoke(cli, ["whose", "Leak", str(leak), "--symbols", str(leak.parent), "--no-symbols"])
    assert r.exit_code == 2 and "exclude each other" in r.output


@pytest.mark.parametrize("bad", ["Leaky", "", "\\xzz"])
def test_one_tag_validator_for_report_tags_and_whose(leak, bad):
    msgs = []
    for args in (["report", leak, "--tag", bad], ["tags", leak, "--tag", bad], ["whose", bad, leak, "--no-scan"]):
        r = run(*args)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        msgs.append(r.stderr.strip().splitlines()[-1].split("pool tag", 1)[-1])
    assert len(set(msgs)) == 1, msgs


@pytest.mark.parametrize("name", ["ShutdownPerfDiagLogger", "AMSITrace"])
def test_every_command_says_infos_verdict_for_a_trace_without_pool_events(name, tmp_path):
    """One wording (pooltrace.verdicts): a kernel trace without the POOL group, a user-mode trace."""
    src = SAMPLES / f"{name}.etl"
    if not src.exists():
        pytest.skip(f"{src} absent")
    t = tmp_path / src.name  # a copy: pairing writes a cache beside the trace, never into ../shared
    t.write_bytes(src.read_bytes())
    # info adds losses and damage to its verdict; reports say those as warnings of their own
    verdict = json.loads(run("info", t, "--format", "json").stdout)["verdict"].split("; WARNING")[0]
    assert verdict.startswith("no pool events (the POOL group" if name == "ShutdownPerfDiagLogger"
                              else "no kernel events: this is a user-mode trace")

    def flat(text):
        return " ".join(text.split())

    for args in (["report", t, "--no-symbols"], ["tags", t], ["diff", t, t, "--no-symbols"],
                 ["whose", "Leak", t, "--no-scan", "--no-symbols"]):
        r = run(*args)
        assert r.exit_code == 0, r.output
        assert flat(verdict) in flat(r.output), (args[0], r.output)
    for cmd in ("report", "tags"):
        assert json.loads(run(cmd, t, "--format", "json").stdout)["verdict"] == verdict
