"""Compare two ``bench/gpu_bench.py`` results (gpu-DATE.json) row by row: new / old throughput of
every seal and verify figure, at every size, and whether each is within the issue #10 target
(new >= 0.97 x old; ``--within`` to change it). Exit code 1 when a wall figure misses.

    python bench/compare_gpu.py bench/results/gpu-2026-11-28.json /tmp/vram-residency-gpu-check/gpu-DATE.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

WALL = ("seal_pinned_GBps", "seal_pageable_GBps", "verify_GBps", "hash_with_units_GBps")
DEVICE = ("verify_device_GBps",)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--within", type=float, default=0.03, help="allowed shortfall (default 0.03)")
    args = ap.parse_args()
    old: dict[str, Any] = json.loads(args.old.read_text())
    new: dict[str, Any] = json.loads(args.new.read_text())
    rows = {(r["algorithm"], r["size"]): r for r in old["gpu"]}
    print(f"graphs: {new.get('graphs', 'not recorded')} (old: {old.get('graphs', 'not recorded')})")
    missed = 0
    for r in new["gpu"]:
        o = rows.get((r["algorithm"], r["size"]))
        if o is None:
            continue
        cells = []
        for key in WALL + DEVICE:
            ratio = r[key] / o[key]
            miss = key in WALL and ratio < 1 - args.within
            missed += miss
            cells.append(f"{key.removesuffix('_GBps')} {ratio:.3f}{' MISS' if miss else ''}")
        print(f"{r['algorithm']:15s} {r['size'] >> 20:6d} MiB  " + "  ".join(cells))
    print(f"{missed} wall figure(s) below {1 - args.within:.2f} x old")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
