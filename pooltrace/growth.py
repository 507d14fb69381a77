"""Growth of outstanding memory per report group over the window, and a leak/cache classification.

For every group of a report (any `--by`), from `alloc_ns`/`free_ns` of the rows allocated inside the
window (filters applied), in one vectorized pass (bincount over group x time bin, then cumsum):

- the outstanding-bytes and outstanding-blocks series over time, `POINTS` points, each the value at the
  end of its bin (the last point equals the group's outstanding bytes/blocks at the end of the window);
- `bytes_per_s` / `blocks_per_s`: least-squares slope of those series over the window, `r2` how well a
  straight line explains the bytes series (0 when it is flat);
- `late_bytes_per_s`: the slope over the last third, and `still_growing`;
- `alloc_per_s` / `free_per_s`: allocations inside the window and their frees inside it, per second;
- `survivor_position`: where in the window the outstanding blocks were allocated, on average (0 = start,
  1 = end), and `age_spread`: their spread, 1.0 for survivors uniformly spread over the window (a leak),
  near 0 when they were all allocated at about the same time (a cache filled once, a burst).

Classes, tested in this order (thresholds in `THRESHOLDS`, documented in the README):

- `transient`: survivor_position >= 0.8 — the outstanding blocks were allocated, on average, in the last
  fifth of the window: outstanding only because the window ended (a burst, short-lived requests in flight);
- `plateau`: not still growing — the bytes series rose by at most 10 % of its final value over the last
  third of the window, or fell: a cache, a lookaside list, objects that live for the whole run;
- `leak`: still growing, r2 >= 0.8 and age_spread >= 0.5 — steady growth with survivors of every age;
- `growing`: still growing, but noisy or in steps (r2 or age_spread below those thresholds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POINTS = 64
THRESHOLDS = {"transient_position": 0.8, "late_share": 0.1, "leak_r2": 0.8, "leak_spread": 0.5}
CLASSES = ("leak", "growing", "plateau", "transient")
_UNIFORM_STD = 1 / np.sqrt(12)  # the standard deviation of a uniform position over [0, 1]


@dataclass
class Growth:
    cls: str
    bytes_per_s: float
    blocks_per_s: float
    r2: float
    late_bytes_per_s: float
    still_growing: bool
    alloc_per_s: float
    free_per_s: float
    survivor_position: float
    age_spread: float
    series_bytes: list[int]
    series_blocks: list[int]

    def as_dict(self, series: bool = True) -> dict:
        out = {"class": self.cls, "bytes_per_s": round(self.bytes_per_s, 3),
               "blocks_per_s": round(self.blocks_per_s, 6), "r2": round(self.r2, 4),
               "late_bytes_per_s": round(self.late_bytes_per_s, 3), "still_growing": self.still_growing,
               "alloc_per_s": round(self.alloc_per_s, 6), "free_per_s": round(self.free_per_s, 6),
               "survivor_position": round(self.survivor_position, 4), "age_spread": round(self.age_spread, 4)}
        if series:
            out["series"] = {"bytes": self.series_bytes, "blocks": self.series_blocks}
        return out


def class_rank(g: Growth | None) -> int:
    """Sort order of `--sort growth`: leak, growing, plateau, transient."""
    return CLASSES.index(g.cls) if g is not None else len(CLASSES)


def times(start_ns: int, end_ns: int, points: int = POINTS) -> np.ndarray:
    """The time (ns) of every point: the end of each of `points` equal bins over [start, end)."""
    return start_ns + (np.arange(1, points + 1, dtype=np.float64) * (end_ns - start_ns) / points).astype(np.int64)


CHUNK = 1 << 20  # rows binned per step: its temporaries stay small (and in the CPU caches)


def _bins(alloc_ns: np.ndarray, free_ns: np.ndarray, gid: np.ndarray, groups: int, start_ns: int, end_ns: int,
          null_ns: int, points: int, span: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, its allocation bin ((key, bin) * 2 + survivor) and its free bin (key, bin; bin `points`:
    not freed inside the window); rows not counted (gid < 0) go to key `groups`."""
    stride = points + 1
    # integer bins, (t - start) * points // span, and few temporaries, updated in place (rows allocated
    # before the trace have alloc_ns = null_ns)
    counted = (alloc_ns >= start_ns) & (alloc_ns < end_ns) & (gid >= 0)
    base = np.where(counted, gid, groups)
    base *= stride
    freed = (free_ns < end_ns) & (free_ns != null_ns) & counted  # counted rows are freed at or after the start
    ia = alloc_ns - start_ns  # wraps for null_ns rows: they are not counted, and clipped below
    ia *= points
    ia //= span
    np.clip(ia, 0, points - 1, out=ia)
    ia += base
    ia *= 2
    ia += ~freed  # the lowest bit: still outstanding at the end (a survivor)
    fi = free_ns - start_ns
    fi *= points
    fi //= span
    np.copyto(fi, points, where=~freed)
    np.clip(fi, 0, points, out=fi)  # a free before the start comes only from damaged times (freed before allocated)
    fi += base
    return ia, fi


def growth_table(alloc_ns: np.ndarray, free_ns: np.ndarray, size: np.ndarray, gid: np.ndarray, groups: int,
                 start_ns: int, end_ns: int, null_ns: int, points: int = POINTS) -> list[Growth]:
    """Growth of `groups` groups from the rows allocated inside [start, end): `gid` is each row's group
    (0..groups-1). Rows with gid < 0 or allocated outside the window are ignored (GrowthCounts)."""
    counts = GrowthCounts(groups, start_ns, end_ns, null_ns, points)
    counts.add(alloc_ns, free_ns, size, gid)
    return counts.growth()


class GrowthCounts:
    """Per key (a stack, a tag, a group: 0..keys-1), bytes and blocks allocated and freed in each of
    `points` bins of the window, added part by part (a report adds its rows as it reads them, per stack, and
    sums the stacks of each group at the end).

    Every row adds its size to (key, allocation bin) and, when freed inside the window, removes it at
    (key, free bin); a cumulative sum over the bins gives the series. Rows that are not counted go to an
    extra key, frees after the window to an extra bin, so nothing is compressed. Rows are binned CHUNK at a
    time. Sums of sizes are exact in float64 (below 2**53 bytes) in any order and grouping."""

    def __init__(self, keys: int, start_ns: int, end_ns: int, null_ns: int, points: int = POINTS):
        self.keys, self.start_ns, self.end_ns, self.null_ns, self.points = keys, start_ns, end_ns, null_ns, points
        self.span = max(1, end_ns - start_ns)
        self.stride = points + 1  # bin `points`: not freed inside the window
        n = (keys + 1) * self.stride
        self.up_w, self.up_c = np.zeros(2 * n), np.zeros(2 * n, dtype=np.int64)
        self.down_w, self.down_c = np.zeros(n), np.zeros(n, dtype=np.int64)

    @classmethod
    def from_arrays(cls, keys: int, start_ns: int, end_ns: int, null_ns: int, up_w: np.ndarray, up_c: np.ndarray,
                    down_w: np.ndarray, down_c: np.ndarray, points: int = POINTS) -> GrowthCounts:
        """Counts added before (a dataset's summary keeps them): the four arrays of the same shapes."""
        counts = cls(0, start_ns, end_ns, null_ns, points)
        counts.keys = keys
        counts.up_w, counts.up_c, counts.down_w, counts.down_c = up_w, up_c, down_w, down_c
        return counts

    def grow(self, keys: int) -> None:
        """Room for `keys` keys (keys counted so far keep their counts; so do the rows not counted)."""
        if keys <= self.keys:
            return
        parts = []
        for arr, width in ((self.up_w, 2), (self.up_c, 2), (self.down_w, 1), (self.down_c, 1)):
            old = arr.reshape(self.keys + 1, -1)
            new = np.zeros((keys + 1, self.stride * width), dtype=arr.dtype)
            new[:self.keys] = old[:self.keys]
            new[keys] = old[self.keys]  # the key of the rows not counted stays the last
            parts.append(new.reshape(-1))
        self.up_w, self.up_c, self.down_w, self.down_c = parts
        self.keys = keys

    def add(self, alloc_ns: np.ndarray, free_ns: np.ndarray, size: np.ndarray, key: np.ndarray) -> None:
        """Count rows: `key` is each row's key, < 0 for a row not counted."""
        n = len(self.down_c)
        step = max(CHUNK, 2 * n)  # a step's counts are not much larger than its rows
        for lo in range(0, len(alloc_ns), step):
            hi = lo + step
            ia, fi = _bins(alloc_ns[lo:hi], free_ns[lo:hi], key[lo:hi], self.keys, self.start_ns, self.end_ns,
                           self.null_ns, self.points, self.span)
            w = size[lo:hi].astype(np.float64)
            self.up_w += np.bincount(ia, weights=w, minlength=2 * n)
            self.up_c += np.bincount(ia, minlength=2 * n)
            self.down_w += np.bincount(fi, weights=w, minlength=n)
            self.down_c += np.bincount(fi, minlength=n)

    def growth(self, group_of_key: np.ndarray | None = None, groups: int | None = None) -> list[Growth]:
        """Growth per group: key k belongs to group group_of_key[k] (< 0: to none); default, key k is group k."""
        points, stride, keys = self.points, self.stride, self.keys
        up_w = self.up_w.reshape(keys + 1, stride, 2)
        up_c = self.up_c.reshape(keys + 1, stride, 2)
        down_w = self.down_w.reshape(keys + 1, stride)
        down_c = self.down_c.reshape(keys + 1, stride)
        if group_of_key is not None:  # each group's keys summed (the extra key: not counted)
            to = np.where(group_of_key >= 0, group_of_key, groups).astype(np.intp)
            parts = []
            for arr in (up_w, up_c, down_w, down_c):
                out = np.zeros((groups + 1, *arr.shape[1:]), dtype=arr.dtype)
                np.add.at(out, to, arr[:keys])
                parts.append(out)
            up_w, up_c, down_w, down_c = parts
            keys = groups
        up = up_w[:keys, :points]
        up_n2 = up_c[:keys, :points]
        up_b, up_n, surv = up.sum(axis=2), up_n2.sum(axis=2), up_n2[:, :, 1].astype(np.float64)
        down_b = down_w[:keys]
        down_n = down_c[:keys]
        return _growth(up_b, up_n, surv, down_b, down_n, points, self.span)


def _growth(up_b: np.ndarray, up_n: np.ndarray, surv: np.ndarray, down_b: np.ndarray, down_n: np.ndarray,
            points: int, span: int) -> list[Growth]:
    """Series, slopes, fit and class per group from its binned bytes and blocks."""
    ybytes = np.cumsum(up_b - down_b[:, :points], axis=1)
    yblocks = np.cumsum(up_n - down_n[:, :points], axis=1)
    secs = span / 1e9
    x = np.arange(1, points + 1, dtype=np.float64) * secs / points

    def slope(y: np.ndarray, xs: np.ndarray) -> np.ndarray:
        xc = xs - xs.mean()
        return (y - y.mean(axis=1, keepdims=True)) @ xc / max(float(xc @ xc), 1e-30)

    bps = slope(ybytes, x)
    nps = slope(yblocks.astype(np.float64), x)
    fit = ybytes.mean(axis=1, keepdims=True) + bps[:, None] * (x - x.mean())
    ss_tot = ((ybytes - ybytes.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    ss_res = ((ybytes - fit) ** 2).sum(axis=1)
    r2 = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1), 0.0)
    third = points - points // 3 - 1  # the point at two thirds of the window
    late = slope(ybytes[:, third:], x[third:]) if points - third > 1 else bps
    final = ybytes[:, -1]
    still = (final - ybytes[:, third] > THRESHOLDS["late_share"] * final) & (late > 0)
    centers = (np.arange(points) + 0.5) / points
    cnt = surv.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nan_to_num(surv @ centers / cnt)
        var = np.nan_to_num(surv @ (centers * centers) / cnt - mean * mean)
    spread = np.sqrt(np.clip(var, 0, None)) / _UNIFORM_STD
    allocs = up_n.sum(axis=1) / secs
    frees = down_n[:, :points].sum(axis=1) / secs
    cls = np.where(mean >= THRESHOLDS["transient_position"], 3,
                   np.where(~still, 2, np.where((r2 >= THRESHOLDS["leak_r2"]) &
                                                (spread >= THRESHOLDS["leak_spread"]), 0, 1)))
    yb = np.rint(ybytes).astype(np.int64).tolist()
    yn = yblocks.tolist()
    return [Growth(CLASSES[c], b, nb, q, lt, st, al, fr, m, sp, yb[i], yn[i])
            for i, (c, b, nb, q, lt, st, al, fr, m, sp) in enumerate(zip(
                cls.tolist(), bps.tolist(), nps.tolist(), r2.tolist(), late.tolist(), still.tolist(),
                allocs.tolist(), frees.tolist(), mean.tolist(), spread.tolist(), strict=True))]


def human_rate(bps: float) -> str:
    """Bytes per second with a binary unit: `+1.2 KiB/s`."""
    v, unit = abs(bps), "B/s"
    for u in ("KiB/s", "MiB/s", "GiB/s"):
        if v < 1024:
            break
        v /= 1024
        unit = u
    return f"{'+' if bps >= 0 else '-'}{v:.1f} {unit}" if unit != "B/s" else f"{bps:+.0f} B/s"
