"""Prometheus metrics of one worker, in a registry of its own.

A registry per app (not the process-global default) lets tests and benchmarks run several workers
in one process without their counters mixing. Values that are state, not events (VRAM free and
used, worker state, shards), are read from the worker at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from vram_residency.service.api.errors import ErrorCode

__all__ = ["Metrics"]

_STATES: Final = ("Starting", "Loading", "Ready", "Executing", "Draining", "Stopped")
# Verification takes microseconds on an H200 for small shards and up to seconds for a large model
# on the host emulation: buckets span both.
_VERIFY_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip
_EXEC_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.seals = Counter("vram_seals", "Shards sealed", ["backend"], registry=r)
        self.sealed_bytes = Counter("vram_sealed_bytes", "Bytes sealed into device memory", registry=r)
        self.verifications = Counter(
            "vram_verifications",
            "Seal verifications of one shard, by result and by what asked for them",
            ["result", "trigger"],
            registry=r,
        )
        self.verify_seconds = Histogram(
            "vram_verify_seconds",
            "Time to verify every shard once (one pass), by trigger",
            ["trigger"],
            buckets=_VERIFY_BUCKETS,
            registry=r,
        )
        self.executions = Counter("vram_executions", "Execute jobs, by result", ["result"], registry=r)
        self.execute_seconds = Histogram(
            "vram_execute_seconds",
            "Execute job latency inside the worker (queue, verification and run)",
            buckets=_EXEC_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vram_execute_batch_size",
            "Jobs per verified batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.run_seconds = Histogram(
            "vram_execute_run_seconds",
            "Time the executor takes to run one verified batch on the sealed weights",
            buckets=_EXEC_BUCKETS,
            registry=r,
        )
        # The metrics llama-orch's worker spec names (WORKER-4800s): jobs started, completed and
        # failed; tokens generated; CUDA errors; latency (execute_seconds above); VRAM (below).
        self.jobs_started = Counter("worker_jobs_started", "Execute jobs started", registry=r)
        self.jobs_completed = Counter("worker_jobs_completed", "Execute jobs that ended with end", registry=r)
        self.jobs_failed = Counter(
            "worker_jobs_failed", "Execute jobs that ended with error, by code", ["code"], registry=r
        )
        self.jobs_cancelled = Counter(
            "worker_jobs_cancelled", "Execute jobs cancelled, by reason", ["reason"], registry=r
        )
        # Every known label from the start, at 0: a labelled counter has no series until a label
        # is used, and a scraper would read "no data" instead of 0 until the first failure.
        for code in ErrorCode:
            self.jobs_failed.labels(code=code.value)
        for reason in ("request", "disconnect"):
            self.jobs_cancelled.labels(reason=reason)
        self.tokens_generated = Counter("worker_tokens_generated", "Tokens sent to clients", registry=r)
        self.cuda_errors = Counter("worker_cuda_errors", "CUDA or driver errors seen", registry=r)
        self.incidents = Counter("vram_security_incidents", "Security incidents raised", registry=r)
        self.scrub_passes = Counter("vram_scrub_passes", "Background scrub passes completed", registry=r)
        self.vram_free = Gauge("vram_free_bytes", "Free device memory", registry=r)
        self.vram_used = Gauge("vram_used_bytes", "Device memory in use (total minus free)", registry=r)
        self.vram_total = Gauge("vram_total_bytes", "Device memory in total", registry=r)
        self.shards = Gauge("vram_sealed_shards", "Shards sealed now", registry=r)
        self.shard_bytes = Gauge("vram_sealed_shard_bytes", "Bytes held by sealed shards now", registry=r)
        self.state = Gauge(
            "vram_worker_state", "1 for the worker's current lifecycle state", ["state"], registry=r
        )
        self.pre_verify = Gauge(
            "vram_pre_verify_enabled",
            "1 when every execute is preceded by a verification of every shard (0 only in benchmarks)",
            registry=r,
        )
        self.backend = Info("vram_backend", "Backend in use", registry=r)

    def bind(
        self,
        *,
        mem_info: Callable[[], tuple[int, int]],
        shards: Callable[[], tuple[int, int]],
        state: Callable[[], str],
    ) -> None:
        """Read state gauges from the worker at scrape time."""
        self.vram_free.set_function(lambda: float(mem_info()[0]))
        self.vram_total.set_function(lambda: float(mem_info()[1]))
        self.vram_used.set_function(lambda: float(mem_info()[1] - mem_info()[0]))
        self.shards.set_function(lambda: float(shards()[0]))
        self.shard_bytes.set_function(lambda: float(shards()[1]))
        for name in _STATES:
            self.state.labels(state=name).set_function(lambda n=name: 1.0 if state() == n else 0.0)  # type: ignore[misc]
