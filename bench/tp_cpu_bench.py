#!/usr/bin/env python3
"""The collective verify's fixed cost on CPUs: gloo, host backend, small shards (issue 12/16's
overhead target, measurable without GPUs).

    PYTHONPATH=src .venv/bin/python bench/tp_cpu_bench.py --world 4 --iters 300

Spawns ``--world`` processes (gloo over loopback). Each seals ``--shards`` shards of
``--shard-kib`` KiB on the host backend, binds them with ``TPModel.seal`` and runs ``--iters``
collective verifies after a barrier, for the verdict on a dedicated gloo group ("gloo") and on
the default group itself ("group"). Prints, from rank 0, the median collective verify, the
median of the slowest rank's local verify in the same iteration, and their difference (the
fixed cost of agreeing on one verdict). On GPUs, ``bench/tp_bench.py`` measures the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

TOKEN = "tp-cpu-bench-token-0123456789abcdef"


def _rank(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    import numpy as np
    import torch.distributed as dist

    from vram_residency import VramManager
    from vram_residency.distributed import TPModel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    size = args.shard_kib << 10
    out: dict[str, Any] = {}
    with VramManager(TOKEN, 0, backend="host", capacity_bytes=2 * size * args.shards + (1 << 20)) as mgr:
        rng = np.random.default_rng(rank)
        shards = [
            mgr.seal_model(rng.integers(0, 256, size, dtype=np.uint8).tobytes()) for _ in range(args.shards)
        ]
        for transport in ("gloo", "group"):
            tp = TPModel.seal(mgr, shards, model_name="cpu-bench", token=TOKEN, verdict_transport=transport)
            for _ in range(20):
                tp.verify()
            totals, locals_ = [], []
            for _ in range(args.iters):
                dist.barrier()
                t0 = time.perf_counter_ns()
                tp.verify()
                totals.append(time.perf_counter_ns() - t0)
                locals_.append(tp.last_local_ns)
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (totals, locals_))
            slowest = [max(per) for per in zip(*(g[1] for g in gathered), strict=True)]
            med_total = statistics.median(totals)
            med_slow = statistics.median(slowest)
            out[transport] = {
                "collective_median_us": round(med_total / 1e3, 1),
                "slowest_local_median_us": round(med_slow / 1e3, 1),
                "overhead_us": round((med_total - med_slow) / 1e3, 1),
                "rank_medians_us": [round(statistics.median(g[0]) / 1e3, 1) for g in gathered],
            }
    if rank == 0:
        print(
            json.dumps(
                {
                    "world": world,
                    "shards": args.shards,
                    "shard_kib": args.shard_kib,
                    "iters": args.iters,
                    **out,
                },
                indent=2,
            )
        )
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-kib", type=int, default=64)
    ap.add_argument("--rank", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank >= 0:
        _rank(args.rank, args.world, args.port, args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = [
        sys.executable,
        __file__,
        "--world",
        str(args.world),
        "--iters",
        str(args.iters),
        "--shards",
        str(args.shards),
        "--shard-kib",
        str(args.shard_kib),
        "--port",
        str(port),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([*base, "--rank", str(r)], env=env) for r in range(args.world)]
    codes = [p.wait(timeout=900) for p in procs]
    if any(codes):
        raise SystemExit(f"ranks exited with {codes}")


if __name__ == "__main__":
    main()
