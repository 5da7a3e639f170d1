#!/usr/bin/env python3
"""Audit-log throughput on this machine's disk, with the hash chain and HMACs on.

    .venv/bin/python bench/audit_bench.py [--dir DIR] [--events N] [--critical N] [--repeat R]

Measures (each the best of ``--repeat`` runs, with the median alongside):

* non-critical events/s: one thread emitting ``VramSealed`` events (batched writes), including
  the final ``close()`` that writes and syncs the tail; target >= 20,000/s;
* SealVerified events/s written as the store's verify path writes them: ``emit_many`` batches
  of 149 records (one per shard), for information;
* critical events/s: one thread emitting ``SealVerificationFailed`` events, each written and
  synced (fdatasync) before ``emit`` returns; target >= 500/s;
* critical events/s from 8 threads at once (group commit shares syncs), for information;
* verification speed of the non-critical log, and the disk's raw append+sync rate for context.

Every log written is verified afterwards (chain, hashes, HMACs), so the numbers are for a chain
that really holds. Results go to ``bench/results/audit-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vram_residency.audit import (
    SEAL_VERIFICATION_FAILED,
    SEAL_VERIFIED,
    VRAM_SEALED,
    AuditLog,
    rotated_paths,
    verify_log,
)

TOKEN = "audit-bench-token-0123456789abcdef"
HERE = Path(__file__).resolve().parent
TARGET_NON_CRITICAL = 20_000.0
TARGET_CRITICAL = 500.0


def _files(path: Path) -> list[Path]:
    return [*rotated_paths(path), path]


def _check(path: Path, expected: int) -> None:
    report = verify_log(_files(path), TOKEN)
    if not report.ok or report.records != expected:
        raise SystemExit(f"benchmark log does not verify: {report.first_break} ({report.records} records)")


def bench_non_critical(d: Path, n: int) -> dict[str, float]:
    path = d / "noncritical.jsonl"
    log = AuditLog(path, token=TOKEN, worker_id="bench-worker")
    digest = "ab" * 32
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        log.emit(
            VRAM_SEALED,
            shard_id=f"shard-{i}",
            gpu_device=0,
            vram_bytes=1 << 30,
            digest_algorithm="sha256-tree-v1",
            digest=digest,
            model_ref="llama-3-8b/shard-00001",
        )
    log.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    size = sum(p.stat().st_size for p in _files(path))
    t1 = time.perf_counter()
    _check(path, n)
    verify_s = time.perf_counter() - t1
    return {
        "events_per_s": n / wall,
        "cpu_events_per_s": n / cpu,
        "bytes_per_event": size / n,
        "verify_records_per_s": n / verify_s,
    }


def bench_verified_batches(d: Path, n: int, batch: int = 149) -> dict[str, float]:
    """SealVerified records the way the store's verify path writes them: ``emit_many`` of one
    record per shard (149: a Llama's shards), the shared fields passed once as ``common``."""
    path = d / "verified.jsonl"
    log = AuditLog(path, token=TOKEN, worker_id="bench-worker")
    batches = max(1, n // batch)
    t0 = time.perf_counter()
    for b in range(batches):
        log.emit_many(
            SEAL_VERIFIED,
            [
                {"shard_id": f"shard-{b}-{i}", "vram_bytes": 13 << 20, "digest_algorithm": "sha256-tree-v1"}
                for i in range(batch)
            ],
            common={"check": "full", "duration_ns": 1_234_567, "batch_shards": batch},
        )
    log.close()
    wall = time.perf_counter() - t0
    _check(path, batches * batch)
    return {"events_per_s": batches * batch / wall, "us_per_event": 1e6 * wall / (batches * batch)}


def _critical_event(log: AuditLog, i: int) -> None:
    log.emit(
        SEAL_VERIFICATION_FAILED,
        shard_id=f"shard-{i}",
        expected_digest="ab" * 32,
        actual_digest="cd" * 32,
        corrupted_ranges=[[4096, 8192]],
        corrupted_tensors=["model.layers.3.mlp.down_proj.weight"],
    )


def bench_critical(d: Path, n: int) -> dict[str, float]:
    path = d / "critical.jsonl"
    log = AuditLog(path, token=TOKEN, worker_id="bench-worker")
    t0 = time.perf_counter()
    for i in range(n):
        _critical_event(log, i)
    wall = time.perf_counter() - t0
    log.close()
    _check(path, n)
    return {"events_per_s": n / wall, "mean_latency_ms": 1000 * wall / n}


def bench_critical_threads(d: Path, n: int, threads: int) -> dict[str, float]:
    path = d / "critical-mt.jsonl"
    log = AuditLog(path, token=TOKEN, worker_id="bench-worker")
    per = n // threads
    start = threading.Barrier(threads + 1)

    def run() -> None:
        start.wait()
        for i in range(per):
            _critical_event(log, i)

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    log.close()
    _check(path, per * threads)
    return {"events_per_s": per * threads / wall, "threads": float(threads)}


def bench_raw_sync(d: Path, n: int) -> dict[str, float]:
    """The disk's own append + fdatasync rate: the ceiling for one-thread critical events."""
    fd = os.open(d / "raw", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    line = b"x" * 400 + b"\n"
    sync = getattr(os, "fdatasync", os.fsync)
    t0 = time.perf_counter()
    for _ in range(n):
        os.write(fd, line)
        sync(fd)
    wall = time.perf_counter() - t0
    os.close(fd)
    return {"syncs_per_s": n / wall}


def _repeat(fn: Callable[[Path], dict[str, float]], root: Path, repeat: int, key: str) -> dict[str, Any]:
    runs = []
    for r in range(repeat):
        d = root / f"{fn.__name__}-{r}"
        d.mkdir()
        runs.append(fn(d))
        shutil.rmtree(d)
    best = max(runs, key=lambda x: x[key])
    return {"best": best, "median": statistics.median(x[key] for x in runs), "runs": [x[key] for x in runs]}


def _filesystem(path: Path) -> dict[str, str]:
    best = ("", "", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if str(path).startswith(mnt) and len(mnt) > len(best[1]):
                    best = (dev, mnt, fstype)
    except OSError:
        pass
    return {"device": best[0], "mount": best[1], "type": best[2]}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _machine(root: Path) -> dict[str, Any]:
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory": mem,
        "python": sys.version.split()[0],
        "filesystem": _filesystem(root),
    }


def _markdown(res: dict[str, Any]) -> str:
    m, r = res["machine"], res["results"]
    fs = m["filesystem"]
    nc, cr, mt = r["non_critical"], r["critical"], r["critical_8_threads"]
    vb = r["verified_batches"]

    def ok(v: float, target: float) -> str:
        return "yes" if v >= target else "**NO**"

    return "\n".join(
        [
            f"# Audit log benchmark, {res['date']}",
            "",
            f"Machine: `{m['hostname']}`, {m['cpu']} ({m['cpus']} CPUs), {m['memory']} RAM, "
            f"{m['platform']}, Python {m['python']}.",
            f"Disk: {fs['type']} on `{fs['device']}` (mounted at `{fs['mount']}`); "
            f"raw append+fdatasync: {r['raw_sync']['best']['syncs_per_s']:,.0f}/s.",
            f"Load average before / after: {res['load_before']} / {res['load_after']}.",
            "",
            "Hash chain (SHA-256) and HMAC-SHA256 on for every record; every log verified afterwards.",
            f"Best of {res['config']['repeat']} runs (median in brackets).",
            "",
            "| measure | result | target | met |",
            "|---|---|---|---|",
            f"| non-critical events/s (1 thread, batched, {res['config']['events']:,} events) "
            f"| {nc['best']['events_per_s']:,.0f} ({nc['median']:,.0f}) | >= 20,000 "
            f"| {ok(nc['best']['events_per_s'], TARGET_NON_CRITICAL)} |",
            f"| SealVerified events/s (emit_many, batches of 149, as verify writes them) "
            f"| {vb['best']['events_per_s']:,.0f} ({vb['median']:,.0f}); "
            f"{vb['best']['us_per_event']:.2f} us/event | - | - |",
            f"| critical events/s (1 thread, each synced, {res['config']['critical']:,} events) "
            f"| {cr['best']['events_per_s']:,.0f} ({cr['median']:,.0f}) | >= 500 "
            f"| {ok(cr['best']['events_per_s'], TARGET_CRITICAL)} |",
            f"| critical events/s (8 threads, group commit) | {mt['best']['events_per_s']:,.0f} "
            f"({mt['median']:,.0f}) | - | - |",
            f"| mean critical emit latency (1 thread) | {cr['best']['mean_latency_ms']:.2f} ms | - | - |",
            f"| non-critical CPU-time rate | {nc['best']['cpu_events_per_s']:,.0f} events/s | - | - |",
            f"| bytes per non-critical record | {nc['best']['bytes_per_event']:.0f} | - | - |",
            f"| verify_log speed | {nc['best']['verify_records_per_s']:,.0f} records/s | - | - |",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=HERE, help="directory on the disk to measure")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--critical", type=int, default=3_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix=".audit-bench-", dir=args.dir))
    try:
        load_before = [round(x, 2) for x in os.getloadavg()]
        results = {
            "raw_sync": _repeat(lambda d: bench_raw_sync(d, args.critical), root, args.repeat, "syncs_per_s"),
            "non_critical": _repeat(
                lambda d: bench_non_critical(d, args.events), root, args.repeat, "events_per_s"
            ),
            "verified_batches": _repeat(
                lambda d: bench_verified_batches(d, args.events), root, args.repeat, "events_per_s"
            ),
            "critical": _repeat(
                lambda d: bench_critical(d, args.critical), root, args.repeat, "events_per_s"
            ),
            "critical_8_threads": _repeat(
                lambda d: bench_critical_threads(d, args.critical, 8), root, args.repeat, "events_per_s"
            ),
        }
        load_after = [round(x, 2) for x in os.getloadavg()]
        machine = _machine(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    now = dt.datetime.now(dt.UTC)
    res: dict[str, Any] = {
        "benchmark": "audit-log",
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
        "config": {
            "events": args.events,
            "critical": args.critical,
            "repeat": args.repeat,
            "dir": str(args.dir),
        },
        "load_before": load_before,
        "load_after": load_after,
        "targets": {
            "non_critical_events_per_s": TARGET_NON_CRITICAL,
            "critical_events_per_s": TARGET_CRITICAL,
        },
        "results": results,
        "met": {
            "non_critical": results["non_critical"]["best"]["events_per_s"] >= TARGET_NON_CRITICAL,
            "critical": results["critical"]["best"]["events_per_s"] >= TARGET_CRITICAL,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"audit-{now:%Y-%m-%d}"
    Path(f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = _markdown(res)
    Path(f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {stem}.json and {stem}.md")
    return 0 if all(res["met"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
