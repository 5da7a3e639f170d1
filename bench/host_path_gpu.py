#!/usr/bin/env python3
"""Where the host time of a single-shard verify and seal goes on a GPU (issue #10's small rows).

The port to cuda.core left a few microseconds per call on the rows bound by the host (a 1 MiB
seal from pinned memory, a 64 MiB verify). This times, on the CUDA backend, the same calls
``gpu_bench.measure_one`` times (``digest`` of a shard, ``write_and_hash`` from a pinned buffer
into the same buffer) and splits their host time by function with cProfile (the profiler's own
cost inflates every figure alike: read the shares, not the totals), next to the same calls
unprofiled, the piece timed alone (``_activate``: making the context current) and the device time.
For the record of a GPU session; not a target of its own.

    PYTHONPATH=src python3 bench/host_path_gpu.py --out /tmp/hp
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import functools
import io
import json
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vram_residency.backends.cuda import open_backend
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1

MiB = 1 << 20


def median_us(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e6 * statistics.median(ts)


def profile(fn: Callable[[], object], calls: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    backend = open_backend(args.device)
    rows: list[dict[str, Any]] = []
    text: list[str] = []
    try:
        backend.warm_up()
        pinned = backend.pinned_host_buffer(64 * MiB)
        pinned.array[:] = 0xA5
        cases = [(SHA256_TREE_V1, MiB), (BLAKE3, MiB), (SHA256_TREE_V1, 64 * MiB), (BLAKE3, 64 * MiB)]
        for alg, size in cases:
            buf = backend.allocate(size)
            try:
                src = pinned.view[:size]
                calls: dict[str, Callable[[], object]] = {
                    "verify": functools.partial(backend.digest, buf, alg),
                    "seal_pinned": functools.partial(backend.write_and_hash, buf, src, alg),
                }
                for what, fn in calls.items():
                    wall = median_us(fn, args.reps)
                    fn()
                    device = 1e6 * backend.last_device_seconds
                    row = {"algorithm": alg, "size": size, "call": what, "wall_us": wall, "device_us": device}
                    rows.append(row)
                    text.append(
                        f"## {what} {alg} {size // MiB} MiB: wall {wall:.1f} us, device {device:.1f} us\n"
                    )
                    text.append(profile(fn, args.reps, args.top))
            finally:
                buf.close()
        pieces: dict[str, Callable[[], object]] = {"_activate": backend._activate}
        for name, fn in pieces.items():
            us = median_us(fn, args.reps)
            rows.append({"call": name, "wall_us": us})
            text.append(f"## {name}: {us:.2f} us\n")
        pinned.close()
    finally:
        backend.close()
    date = dt.date.today().isoformat()
    (args.out / f"host-path-gpu-{date}.json").write_text(
        json.dumps({"date": date, "rows": rows}, indent=2) + "\n"
    )
    (args.out / f"host-path-gpu-{date}.txt").write_text("\n".join(text))
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
