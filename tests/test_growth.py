"""Growth per group (pooltrace.growth): planted patterns get exactly their class, and the series add up to
what is outstanding at every point."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace.growth import POINTS, growth_table, human_rate, times

NULL = np.iinfo(np.int64).min
S = 1_000_000_000
END = 60 * S
START = 4 * S  # the property test's window: [START, END)


def table(groups):
    """groups: list of (alloc_ns, free_ns or NULL) arrays -> growth list."""
    a = np.concatenate([g[0] for g in groups]).astype(np.int64)
    f = np.concatenate([g[1] for g in groups]).astype(np.int64)
    gid = np.concatenate([np.full(len(g[0]), i) for i, g in enumerate(groups)])
    size = np.full(len(a), 256, dtype=np.uint64)
    return growth_table(a, f, size, gid, len(groups), 0, END, NULL)


def test_planted_patterns_get_their_class():
    rng = np.random.default_rng(3)
    leak = np.sort(rng.integers(0, END, 600))
    slow_leak = np.sort(rng.integers(0, END, 40))
    cache = np.sort(rng.integers(0, 12 * S, 2000))  # fills in the first 12 s, then only churns a little
    cache_free = np.where(rng.random(2000) < 0.1, cache + rng.integers(S, 5 * S, 2000), NULL)
    churn = np.sort(rng.integers(12 * S, END, 200))  # replacements of the freed cache entries
    burst = np.sort(rng.integers(57 * S, 59 * S, 300))  # freed after the window
    requests = np.sort(rng.integers(0, END, 5000))  # short-lived: a few in flight at the end
    req_free = requests + rng.integers(1_000_000, 50_000_000, 5000)
    req_free = np.where(req_free < END, req_free, NULL)
    out = table([(leak, np.full(600, NULL)), (slow_leak, np.full(40, NULL)),
                 (np.concatenate([cache, churn]), np.concatenate([cache_free, np.full(200, NULL)])),
                 (burst, np.full(300, NULL)), (requests, req_free)])
    assert [g.cls for g in out] == ["leak", "leak", "plateau", "transient", "transient"]
    assert out[0].bytes_per_s > out[1].bytes_per_s > 0
    assert abs(out[0].bytes_per_s - 600 * 256 / 60) < 0.1 * 600 * 256 / 60  # the planted rate
    assert out[0].r2 > 0.95 and out[0].age_spread > 0.8 and out[0].free_per_s == 0
    assert out[2].series_bytes[-1] == int((np.count_nonzero(cache_free == NULL) + 200) * 256)
    assert out[3].survivor_position > 0.9 and out[3].age_spread < 0.2


def test_steps_are_growing_not_leak():
    # three bursts a third of the window apart: growth through the window, but not a straight line
    a = np.concatenate([np.full(100, 1 * S), np.full(100, 30 * S), np.full(400, 50 * S)])
    (g,) = table([(a, np.full(len(a), NULL))])
    assert g.cls == "growing" and g.still_growing and g.r2 < 0.8


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, END - 1), st.integers(0, END), st.integers(0, 3),
                          st.integers(1, 4096)), min_size=1, max_size=60))
def test_series_match_outstanding_at_every_point(rows):
    # the window starts at START: rows allocated before it (some freed before it, some inside) do not count
    a = np.array([r[0] for r in rows], dtype=np.int64)
    f = np.array([r[0] + r[1] if r[0] + r[1] < END else NULL for r in rows], dtype=np.int64)
    gid = np.array([r[2] for r in rows])
    size = np.array([r[3] for r in rows], dtype=np.uint64)
    out = growth_table(a, f, size, gid, 4, START, END, NULL)
    t = times(START, END)
    assert len(t) == POINTS and t[-1] == END
    for k in range(4):
        sel = (gid == k) & (a >= START)
        for p in (0, POINTS // 2, POINTS - 1):
            # the value at the end of bin p: allocated in bins 0..p and not freed in bins 0..p
            edge = START + (p + 1) * (END - START) // POINTS
            live = sel & (a < edge) & ((f == NULL) | (f >= edge))
            assert out[k].series_bytes[p] == int(size[live].sum())
            assert out[k].series_blocks[p] == int(live.sum())
        outstanding = sel & ((f == NULL) | (f >= END))
        assert out[k].alloc_per_s == pytest.approx(sel.sum() / ((END - START) / 1e9))
        assert out[k].series_bytes[-1] == int(size[outstanding].sum())
        assert out[k].cls in ("leak", "growing", "plateau", "transient")


def test_human_rate():
    assert human_rate(13354.4) == "+13.0 KiB/s" and human_rate(-12) == "-12 B/s"
    assert human_rate(3 * 1024 ** 3) == "+3.0 GiB/s"


def test_diff_shows_growth_of_both_sides_when_asked(shipped):
    from click.testing import CliRunner

    from pooltrace.cli import cli

    t = shipped  # a copy: the .etl inputs get their dataset cache beside them
    args = ["diff", str(t / "sample-leak.etl"), str(t / "sample-leak-fixed.etl"), "--by", "function", "--no-symbols",
            "--format", "json"]
    plain = json.loads(CliRunner().invoke(cli, args).output)
    assert "base_growth" not in plain["groups"][0]
    data = json.loads(CliRunner().invoke(cli, [*args, "--growth"]).output)
    by_status = {g["status"]: g for g in data["groups"]}
    assert by_status["new"]["base_growth"] is None and by_status["new"]["new_growth"]["class"] == "leak"
    leak = next(g for g in data["groups"] if g["frames"] == ["leaky.sys+0x1022"])
    assert leak["base_growth"]["class"] == "leak" and leak["base_growth"]["bytes_per_s"] > 0


def test_binning_in_steps_gives_the_one_pass_answer(monkeypatch):
    """growth_table bins CHUNK rows at a time: any step size gives the same growth, exactly."""
    import pooltrace.growth as growth

    rng = np.random.default_rng(5)
    n = 20_000
    a = np.where(rng.random(n) < 0.05, NULL, rng.integers(0, END, n)).astype(np.int64)
    f = np.where(rng.random(n) < 0.3, NULL, a + rng.integers(0, 20 * S, n)).astype(np.int64)
    gid = rng.integers(-1, 6, n).astype(np.int32)
    size = rng.integers(1, 1 << 20, n).astype(np.uint64)
    whole = growth_table(a, f, size, gid, 6, START, END, NULL)
    monkeypatch.setattr(growth, "CHUNK", 1)  # steps of 2 * (groups + 1) * (POINTS + 1) rows: 910
    stepped = growth_table(a, f, size, gid, 6, START, END, NULL)
    assert [g.as_dict() for g in stepped] == [g.as_dict() for g in whole]
    assert sum(g.series_blocks[-1] for g in whole) > 0
