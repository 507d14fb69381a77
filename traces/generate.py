"""Regenerate the shipped sample traces and their ground truth (deterministic, byte for byte).

    python traces/generate.py            # write traces/*.etl and *.truth.json
    python traces/generate.py --check    # regenerate in memory and compare with the committed files

sample-leak.etl        the classic case: leaky.sys allocates tag Leak at two call sites, one never frees;
                       background tags Irp, MmSt, File, Ntfr and session-pool Gh05; uncompressed, like a
                       trace straight from the kernel logger.
sample-leak-fixed.etl  the same scenario after the "fix" (the Leak site frees), with a second leak (tag Lea2)
                       that only this build has, other module bases (another boot), LZXpress-compressed
                       like a merged WPR/xperf trace.
sample-growth.etl      leak or cache? 60 s with planted growth patterns (pooltrace/synthetic_growth.py): a
                       linear leak, a cache that fills and plateaus, a burst still outstanding when the trace
                       ends, a slow leak under a large cache of the same tag, short-lived requests; the truth
                       gives each call site's growth class.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pooltrace.synthetic import classic_leak  # noqa: E402
from pooltrace.synthetic_growth import growth_plan, growth_sample  # noqa: E402

SAMPLES = {
    "sample-leak": {"fixed": False, "new_leak": False, "seed": 1, "shift": 0, "compressed": False},
    "sample-leak-fixed": {"fixed": True, "new_leak": True, "seed": 2, "shift": 0x5600000, "compressed": True},
}


def build(name: str) -> tuple[bytes, str]:
    params = SAMPLES[name]
    writer, truth = classic_leak(**params)
    meta = {"scenario": "classic_leak", "params": params, "truth": truth.as_dict(),
            "expected_pair": truth.expected_pair()}
    return writer.to_bytes(), json.dumps(meta, indent=2, sort_keys=True) + "\n"


GROWTH_SAMPLES = {"sample-growth": {"seed": 13, "duration_s": 60.0, "compressed": True}}


def build_growth(name: str) -> tuple[bytes, str]:
    params = GROWTH_SAMPLES[name]
    writer, truth = growth_sample(**params)
    sites = growth_plan(params["seed"], params["duration_s"])
    for key, t in truth.items():  # the planted stack: (module key of synthetic.kernel_modules, rva), innermost first
        t["frames"] = [list(f) for f in sites[key].frames]
    meta = {"scenario": "growth_sample", "params": params, "truth": truth}
    return writer.to_bytes(), json.dumps(meta, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    bad = 0
    for name in [*SAMPLES, *GROWTH_SAMPLES]:
        data, meta = build(name) if name in SAMPLES else build_growth(name)
        etl, truth = HERE / f"{name}.etl", HERE / f"{name}.truth.json"
        if check:
            same = etl.read_bytes() == data and truth.read_text() == meta
            print(f"{etl.name}: {'identical' if same else 'DIFFERS'}")
            bad += not same
        else:
            etl.write_bytes(data)
            truth.write_text(meta)
            print(f"wrote {etl.name} ({len(data):,} bytes)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
