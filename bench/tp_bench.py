"""Tensor-parallel verification on several GPUs (NCCL), for issue #12's (2 GPUs) and issue #16's
(4 and 8 GPUs) targets.

Run one process per GPU under torchrun; the rank count is torchrun's ``--nproc-per-node`` (2, 4
or 8). NVLink multicast must stay off::

    NCCL_NVLS_ENABLE=0 .venv/bin/torchrun --standalone --nproc-per-node 4 bench/tp_bench.py \
        --out bench/results --gib-per-rank 4

Measures, on every rank, then writes ``tp-<date>-<N>gpu.json`` and ``.md`` from rank 0:

1. collective verify (local verification of the rank's shards + ONE verdict all_gather), median
   of ``--iters`` (100), against the slowest rank's local verify in the same iteration
   (target: <= 1.1 x + 200 us at 2 GPUs, + 300 us at 4 and 8), with the verdict on the gloo group
   (default) and on the NCCL group itself;
2. the same total bytes verified by one GPU alone vs split over all of them (target >= 1.8 x at
   2 GPUs, >= 7 x at 8; 0.875 x the rank count otherwise);
3. ``--flips`` trials: a random bit of a random rank's shard flipped; every rank must name that
   rank (target: all of them);
4. the tensor-parallel byte decoder (1 GiB preset, split over the ranks, run with CuPy on the
   sealed parts): tokens/s with and without a collective verify before each execute.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vram_residency import VramManager
from vram_residency.distributed import (
    TPByteLM,
    TPModel,
    TPVerificationFailed,
    split_byte_lm,
    verify_shards,
)
from vram_residency.testing import flip_bit

TOKEN = "tp-bench-token-0123456789abcdef"
SHARD = 256 << 20


def overhead_target_ns(world: int) -> float:
    """The fixed part of the collective-verify target: 200 us at 2 GPUs (#12), 300 us beyond (#16)."""
    return 200e3 if world <= 2 else 300e3


def speedup_target(world: int) -> float:
    """Same bytes on ``world`` GPUs vs one: 1.8 x at 2 (#12), 7 x at 8 (#16), 0.875 x N otherwise."""
    return {2: 1.8, 8: 7.0}.get(world, 0.875 * world)


def _gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _seal_part(mgr: VramManager, nbytes: int, seed: int) -> list[Any]:
    block = np.random.default_rng(seed).integers(0, 256, SHARD, dtype=np.uint8)
    shards = []
    for i in range(max(nbytes // SHARD, 1)):
        block[:8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)  # distinct shards
        # numpy's stubs give ndarray.__buffer__ to Python >= 3.12 only; 3.11 arrays export the
        # buffer protocol all the same (in C).
        shards.append(mgr.seal_model(block))  # type: ignore[arg-type]
    return shards


def _collective(mgr: VramManager, shards: list[Any], iters: int, transport: str) -> dict[str, Any]:
    tp = TPModel.seal(mgr, shards, model_name="bench", token=TOKEN, verdict_transport=transport)  # type: ignore[arg-type]
    for _ in range(3):
        tp.verify()
    totals, locals_, slowest = [], [], []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter_ns()
        tp.verify()
        totals.append(time.perf_counter_ns() - t0)
        locals_.append(tp.last_local_ns)
    for per_rank in zip(*_gather(locals_), strict=True):
        slowest.append(max(per_rank))
    med_total, med_slow = statistics.median(totals), statistics.median(slowest)
    fixed = overhead_target_ns(dist.get_world_size())
    return {
        "transport": transport,
        "collective_verify_median_us": med_total / 1e3,
        "collective_verify_p99_us": sorted(totals)[int(0.99 * (len(totals) - 1))] / 1e3,
        "slowest_rank_local_median_us": med_slow / 1e3,
        "overhead_us": (med_total - med_slow) / 1e3,
        "target_us": (1.1 * med_slow + fixed) / 1e3,
        "meets_target": med_total <= 1.1 * med_slow + fixed,
    }


def _flips(mgr: VramManager, shards: list[Any], trials: int, seed: int) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = np.random.default_rng(seed)  # the same draws on every rank
    correct = 0
    for _ in range(trials):
        k = int(rng.integers(world))
        j = int(rng.integers(len(shards)))
        bit = int(rng.integers(8 * shards[j].vram_bytes))
        tp = TPModel.seal(mgr, shards, model_name="flips", token=TOKEN)
        if rank == k:
            flip_bit(mgr, shards[j], bit)
        try:
            tp.verify()
            got: list[int] = []
        except TPVerificationFailed as exc:
            got = list(exc.failing_ranks)
        if rank == k:
            flip_bit(mgr, shards[j], bit)  # restore for the next trial
        correct += got == [k]
    counts = _gather(correct)
    return {"trials": trials, "correct_per_rank": counts, "all_correct": all(c == trials for c in counts)}


def _decoder(mgr: VramManager, tokens: int, runs: int) -> dict[str, Any]:
    from vram_residency.service.executors.encoder import cupy_available
    from vram_residency.service.executors.example_model import PRESETS, file_image

    if not cupy_available():
        return {"skipped": "CuPy is not installed (pip install cupy-cuda12x or cupy-cuda13x)"}
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = PRESETS["1gib"]
    with tempfile.TemporaryDirectory() as d:
        path = split_byte_lm(file_image(cfg), cfg, world, d)[rank]
        shard = mgr.seal_file(path)
    tp = TPModel.seal(mgr, [shard], model_name="byte-lm-1gib", token=TOKEN)
    lm = TPByteLM(mgr, shard, cfg, rank=rank, world=world)
    out: dict[str, Any] = {"config": cfg.to_json(), "max_tokens": tokens, "part_bytes": shard.vram_bytes}
    try:
        lm.generate(b"warm up", 4)
        for verify in (False, True):
            rates = []
            for _ in range(runs):
                dist.barrier()
                t0 = time.perf_counter()
                if verify:
                    tp.verify()
                n = len(lm.generate(b"The quick brown fox", tokens))
                rates.append(n / (time.perf_counter() - t0))
            out["tokens_per_s_with_verify" if verify else "tokens_per_s"] = statistics.median(rates)
    finally:
        lm.close()
    return out


def _markdown(res: dict[str, Any]) -> str:
    lines = [f"# Tensor-parallel verification, {res['world_size']} GPUs ({res['date']})", ""]
    lines.append(f"Device: {res['device']}; {res['bytes_per_rank'] / 2**30:.2f} GiB sealed per rank.")
    lines += [
        "",
        "| verdict on | collective median (us) | p99 | slowest local (us) | overhead (us) | target | ok |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in res["collective"]:
        lines.append(
            f"| {c['transport']} | {c['collective_verify_median_us']:.1f} "
            f"| {c['collective_verify_p99_us']:.1f} "
            f"| {c['slowest_rank_local_median_us']:.1f} | {c['overhead_us']:.1f} | {c['target_us']:.1f} "
            f"| {c['meets_target']} |"
        )
    s = res["scaling"]
    lines += [
        "",
        f"Same {s['total_bytes'] / 2**30:.2f} GiB: one GPU {s['one_gpu_ms']:.2f} ms, "
        f"{res['world_size']} GPUs {s['all_gpus_ms']:.2f} ms: {s['speedup']:.2f}x (target >= "
        f"{speedup_target(res['world_size']):.2f}x).",
    ]
    f = res["flips"]
    lines.append(f"Flips: {f['trials']} trials, attributed correctly per rank: {f['correct_per_rank']}.")
    lines.append(f"Decoder: {json.dumps(res['decoder'])}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gib-per-rank", type=float, default=4.0)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--flips", type=int, default=100)
    ap.add_argument("--decoder-tokens", type=int, default=128)
    ap.add_argument("--decoder-runs", type=int, default=5)
    args = ap.parse_args()
    if os.environ.get("NCCL_NVLS_ENABLE") != "0":
        raise SystemExit("set NCCL_NVLS_ENABLE=0 (NVLink multicast must stay off on the lent machines)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    nbytes = int(args.gib_per_rank * 2**30)
    today = _dt.date.today().isoformat()
    res: dict[str, Any] = {"world_size": world, "date": today, "bytes_per_rank": nbytes}
    with VramManager(TOKEN, device=local, backend="cuda", worker_id=f"rank{rank}") as mgr:
        res["device"] = mgr.backend_description
        shards = _seal_part(mgr, nbytes, seed=rank)
        res["collective"] = [_collective(mgr, shards, args.iters, t) for t in ("gloo", "group")]
        # The same total bytes on one GPU: rank 0 seals the other ranks' share too and verifies
        # alone; then every rank verifies its share at once.
        extra = _seal_part(mgr, nbytes * (world - 1), seed=99) if rank == 0 else []
        dist.barrier()
        one = []
        if rank == 0:
            for _ in range(10):
                t0 = time.perf_counter_ns()
                verify_shards(mgr, shards + extra)
                one.append(time.perf_counter_ns() - t0)
        for s in extra:
            mgr.deallocate(s)
        dist.barrier()
        tp = TPModel.seal(mgr, shards, model_name="scaling", token=TOKEN)
        tp.verify()
        alls = []
        for _ in range(10):
            dist.barrier()
            t0 = time.perf_counter_ns()
            tp.verify()
            alls.append(time.perf_counter_ns() - t0)
        one_ms = statistics.median(_gather(one)[0]) / 1e6
        all_ms = statistics.median(alls) / 1e6
        res["scaling"] = {
            "total_bytes": nbytes * world,
            "one_gpu_ms": one_ms,
            "all_gpus_ms": all_ms,
            "speedup": one_ms / all_ms,
            "target_speedup": speedup_target(world),
            "meets_target": one_ms / all_ms >= speedup_target(world),
        }
        res["flips"] = _flips(mgr, shards[:2], args.flips, seed=12)
        for s in shards:
            mgr.deallocate(s)
        res["decoder"] = _decoder(mgr, args.decoder_tokens, args.decoder_runs)
    res["host"] = platform.node()
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"tp-{res['date']}-{world}gpu"
        stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        stem.with_suffix(".md").write_text(_markdown(res))
        print(_markdown(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
