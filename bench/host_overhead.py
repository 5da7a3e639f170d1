#!/usr/bin/env python3
"""Host-side (CPU) overhead of batched verification, measured without a GPU (issue 11).

On the H200, ``verify_model`` of a 149-shard Llama and ``digest_many`` of 1,000 small shards
lost to one big shard by host Python time, not by GPU time. This prints that host time:

1. ``verify_model`` beyond ``digest_many``, per shard, on the host backend with 64-byte shards
   (so that the digest itself is small): the tag checks, the model binding, lookups, locks,
   records. The backend's ``digest_many`` over the same segments is timed separately and
   subtracted; the part of the rest that runs in ``digest_many``'s ``while_running`` (the verify
   plan's tag check and the audit payloads: on a GPU it runs while the kernels do) is timed
   and the rest shown as "exposed". Then the same with a real audit log (``AuditLog`` in a
   temporary directory, flushed by size): one ``SealVerified`` record per shard, each hash-chained and MACed.
2. The CUDA backend's host work around the kernels of one ``digest_many`` call, run here on
   made-up device addresses (nothing is launched or dereferenced): checking and gathering the
   table, taking the buffers' locks, the plan-cache lookup, turning the downloaded roots into
   digests; and ``build_plan`` (a plan-cache miss). 149 segments of 13 MiB (the Llama's size)
   and 1,000 of 1 MiB.

Minimum of several repetitions (the machine may be shared); microseconds.

    .venv/bin/python bench/host_overhead.py [--reps 7]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
import timeit
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vram_residency import VramManager
from vram_residency.audit import AuditLog
from vram_residency.backends.base import Priority, Segment, WhileRunning
from vram_residency.backends.cuda import _batch
from vram_residency.backends.cuda._backend import CudaBackend, CudaBuffer
from vram_residency.backends.host import HostBackend
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1

MiB = 1 << 20
TOKEN = "bench-token-0123456789abcdef"
ALGS = (SHA256_TREE_V1, BLAKE3)


def _best_us(fn: Callable[[], Any], reps: int, number: int) -> float:
    fn()
    return min(timeit.repeat(fn, number=number, repeat=reps)) / number * 1e6


class _TimedHost(HostBackend):
    """The host backend, adding up the time its callers' ``while_running`` callbacks take: the
    host work a GPU backend runs while its kernels run (hidden behind them there)."""

    def __init__(self) -> None:
        super().__init__(0, 1 << 30)
        self.callback_s = 0.0
        self.callbacks = 0

    def digest_many(
        self,
        segments: Sequence[Segment],
        *,
        priority: Priority = "normal",
        while_running: WhileRunning | None = None,
    ) -> list[bytes]:
        if while_running is None:
            return super().digest_many(segments, priority=priority)
        inner = while_running

        def timed() -> None:
            t0 = time.perf_counter()
            try:
                inner()
            finally:
                self.callback_s += time.perf_counter() - t0
                self.callbacks += 1

        return super().digest_many(segments, priority=priority, while_running=timed)


def verify_overhead(shards: int, alg: str, reps: int, audit: bool = False) -> tuple[float, float, float]:
    """(verify_model us, digest_many us, us of it in while_running) for ``shards`` 64-byte
    tensors on the host backend; ``audit``: with a real audit log."""
    with tempfile.TemporaryDirectory() as tmp:
        if not audit:
            return _verify_overhead(shards, alg, reps, None)
        path = f"{tmp}/audit.log"
        with AuditLog(path, token=TOKEN, worker_id="bench", flush_interval=None, max_bytes=None) as log:
            return _verify_overhead(shards, alg, reps, log)


def _verify_overhead(shards: int, alg: str, reps: int, log: AuditLog | None) -> tuple[float, float, float]:
    with VramManager(TOKEN, backend="host", audit=log) as mgr:
        backend = _TimedHost()
        mgr.store.backend.close()
        mgr.store._backend = backend  # before anything is sealed: the host backend, timed
        tensors = {f"model.layers.{i}.weight": np.full(64, i % 251, dtype=np.uint8) for i in range(shards)}
        model = mgr.seal_tensors(tensors, digest_algorithm=alg)
        store = mgr.store
        segments = [store.segment(store.lookup(s)) for s in model.shards]
        number = max(1, 20_000 // shards)
        t_verify = _best_us(lambda: mgr.verify_model(model), reps, number)
        t_digest = _best_us(lambda: store.backend.digest_many(segments), reps, number)
        backend.callback_s, backend.callbacks = 0.0, 0
        for _ in range(number):
            mgr.verify_model(model)
        t_callback = backend.callback_s / max(1, backend.callbacks) * 1e6
        return t_verify, t_digest, t_callback


class _BackendStandIn:
    """What CudaBuffer's constructor reads, and the backend's own table checks: the host steps
    below run the real code on made-up addresses; no device is opened."""

    device = 0
    _check_segment = CudaBackend._check_segment
    _table_columns = getattr(CudaBackend, "_table_columns", None)


def _cuda_host_step(owner: Any, segments: Sequence[Segment], plan: _batch.Plan, out: bytes) -> None:
    """What ``CudaBackend._run_batch`` does on the host around ``lane.run`` (the launches)."""
    if owner._table_columns is not None:
        cols = owner._table_columns(segments)
        bufs_in, algs = cols.bufs, cols.algs
        key: object = (False, tuple(cols.ptrs), tuple(cols.lens), tuple(cols.algs), tuple(cols.keys))
    else:  # the code before this change: a checked 4-tuple per entry, keyed by the row tuples
        checked = [owner._check_segment(s) for s in segments]
        bufs_in, algs = [c[0] for c in checked], [c[2] for c in checked]
        key = (False, tuple((b._ptr, n, a, k) for b, n, a, k in checked))
    new = owner._table_columns is not None
    bufs = sorted(set(bufs_in), key=id) if new else sorted({id(b): b for b in bufs_in}.values(), key=id)
    held = []
    try:
        for b in bufs:
            b._lock.acquire()
            held.append(b)
            if not new or b._closed:
                b.check_open()
        set(algs)
        hash(key)  # the lane's plan-cache lookup
    finally:
        for b in reversed(held):
            b._lock.release()
    _batch.results(plan, out)


def planning(count: int, size: int, alg: str, reps: int) -> dict[str, float]:
    owner: Any = _BackendStandIn()
    bufs = [CudaBuffer(owner, (1 << 44) + i * 2 * size, size, size, owned=False) for i in range(count)]
    segments = [Segment(b, size, alg) for b in bufs]
    rows = [(b._ptr, size, alg, None) for b in bufs]
    plan = _batch.build_plan(rows, False, lambda nbytes: 1 << 40)
    out = np.random.default_rng(0).integers(0, 256, plan.download_bytes, dtype=np.uint8).tobytes()
    number = max(1, 20_000 // count)

    def first_results() -> None:
        plan_fresh = _batch.build_plan(rows, False, lambda nbytes: 1 << 40)
        _batch.results(plan_fresh, out)

    t_build = _best_us(lambda: _batch.build_plan(rows, False, lambda nbytes: 1 << 40), reps, number)
    t_first = _best_us(first_results, reps, number) - t_build
    return {
        "per_call": _best_us(lambda: _cuda_host_step(owner, segments, plan, out), reps, number),
        "build_plan": t_build,
        "results_first": max(0.0, t_first),
    }


class _Stop(Exception):
    """Raised where the nh-fast launcher would take the kernel session (the device)."""


def _stop_at_session() -> Any:
    raise _Stop


def nh_fast_before_session(reps: int) -> dict[str, float]:
    """The CUDA backend's host work of ``digest_many`` of one nh-fast-v1 segment (a
    ``verify_sealed`` of an nh-fast-v1 shard) up to the kernel session, run on a made-up
    address: the table's checks, the nh-fast split, the buffer's lock, the launcher's layout
    (and, since this change, the key schedule, derived before the session). The key schedule
    alone is timed as well: before this change the launcher derived it inside the session."""
    owner: Any = object.__new__(CudaBackend)  # no device is opened: only the host code runs
    owner.device = 0
    owner.kernel_session = _stop_at_session
    n = 1 << 30
    buf = CudaBuffer(owner, 1 << 44, n, n, owned=False)
    key = bytes(range(32))
    seg = Segment(buf, n, "nh-fast-v1", key)

    def call() -> None:
        with contextlib.suppress(_Stop):
            CudaBackend.digest_many(owner, [seg])

    from vram_residency.formats import nhfast

    return {
        "before_session": _best_us(call, reps, 20_000),
        "key_schedule": _best_us(lambda: nhfast.key_schedule(key), reps, 20_000),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)

    print("verify_model beyond digest_many, host backend, 64-byte shards")
    for shards in (149, 1000):
        for alg in ALGS:
            t_v, t_d, t_c = verify_overhead(shards, alg, args.reps)
            print(
                f"  {shards:5d} shards {alg:15s}: verify_model {t_v:8.0f} us, digest_many {t_d:8.0f} us, "
                f"overhead {(t_v - t_d) / shards:5.2f} us/shard (target <= 1); in while_running "
                f"{t_c:6.0f} us, exposed {(t_v - t_d - t_c) / shards:5.2f} us/shard"
            )
    print("  the same, with an audit log (one SealVerified record per shard)")
    for shards in (149, 1000):
        for alg in ALGS:
            t_v, t_d, t_c = verify_overhead(shards, alg, max(1, args.reps // 2), audit=True)
            print(
                f"  {shards:5d} shards {alg:15s}: verify_model {t_v:8.0f} us, digest_many {t_d:8.0f} us, "
                f"overhead {(t_v - t_d) / shards:5.2f} us/shard; in while_running {t_c:6.0f} us, "
                f"exposed {(t_v - t_d - t_c) / shards:5.2f} us/shard"
            )
    print("CUDA backend host work per digest_many call (no GPU: made-up addresses, nothing launched)")
    for count, size in ((149, 13 * MiB), (1000, MiB)):
        for alg in ALGS:
            r = planning(count, size, alg, args.reps)
            print(
                f"  {count:5d} x {size // MiB:2d} MiB {alg:15s}: per call (checks, locks, plan lookup, "
                f"digests) {r['per_call']:6.0f} us; build_plan (cache miss) {r['build_plan']:6.0f} us "
                f"(target <= 150); first digests of a plan {r['results_first']:6.0f} us"
            )
    print("nh-fast-v1, one 1 GiB segment (verify_sealed): CUDA backend host work up to the kernel session")
    r = nh_fast_before_session(args.reps)
    print(
        f"  digest_many up to the session {r['before_session']:6.1f} us "
        f"(key schedule, {r['key_schedule']:4.1f} us of it, is derived there since the overlap change; "
        f"before, inside the session)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
