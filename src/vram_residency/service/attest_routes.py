"""``POST /worker/attest``: an ``attest-v1`` statement for an orchestrator's nonce.

Kept apart from ``app.py``: ``register_attest_routes(app, worker, auth)`` adds the route, its
rate limit and its metrics. The answer is the spec's JSON form, tagged under KA.

* The nonce is hex of 16 to 64 bytes; anything else is INVALID_PARAMS (400).
* A mismatch is a failed verification: the worker stops (incident, audit) exactly as a failed
  ``/worker/verify`` stops it, and the answer is still the tagged statement, verdict
  ``mismatch``, with HTTP 200: it tells the orchestrator, authentically, which shard failed.
  Later requests find the worker Stopped (503 WORKER_STOPPED).
* Rate limit per worker (a token bucket): an attestation reads every byte of every shard it
  covers, so without a limit a token holder's script could keep the GPU busy. Over the limit:
  HTTP 429, ``retry_after_ms`` in the body and ``Retry-After`` in the headers.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from typing import Any, Final, Literal

from fastapi import FastAPI
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field

from vram_residency.errors import AttestationMismatch, UnsupportedOperation, VramError
from vram_residency.service.api.errors import ErrorCode, ServiceError
from vram_residency.service.worker import Worker

__all__ = [
    "DEFAULT_ATTEST_BURST",
    "DEFAULT_ATTEST_RATE",
    "AttestRequest",
    "AttestResponse",
    "TokenBucket",
    "register_attest_routes",
]

#: Attestations per second a worker answers on average, and how many it answers back to back.
#: An orchestrator attests each worker every few seconds at most; a fleet check is one request.
DEFAULT_ATTEST_RATE: Final = 2.0
DEFAULT_ATTEST_BURST: Final = 4

_SHARD_ID = r"^shard-[0-9a-f]{32}$"
_NONCE_HEX = r"^(?:[0-9a-fA-F]{2}){16,64}$"


class AttestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nonce: str = Field(pattern=_NONCE_HEX, description="hex of 16 to 64 random bytes, never reused")
    shard_ids: list[str] | None = Field(
        None, max_length=4096, description="shards to attest, in order (default: every shard)"
    )
    probe: bool = Field(False, description="also compute each shard's BLAKE3 probe keyed by the nonce")


class AttestedShardBody(BaseModel):
    shard_id: str
    seal_signature: str
    digest_now: str
    probe: str | None
    verified_at_ns: int


class AttestResponse(BaseModel):
    format: Literal["attest-v1"]
    nonce: str
    worker_id: str
    attested_at_ns: int
    shards: list[AttestedShardBody]
    verdict: Literal["ok", "mismatch"]
    tag: str


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; ``take`` spends one or says how
    long until one is there. Monotonic clock, thread-safe."""

    def __init__(self, rate: float, burst: int) -> None:
        if not (rate > 0 and math.isfinite(rate)) or burst < 1:
            raise ValueError("rate must be positive and finite, burst at least 1")
        self._rate, self._burst = rate, float(burst)
        self._tokens = float(burst)
        self._t = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0.0 when a token was spent, else the seconds to wait before one is available."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._t) * self._rate)
            self._t = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self._rate


class _AttestMetrics:
    def __init__(self, registry: CollectorRegistry, worker: Worker) -> None:
        self.attestations = Counter(
            "vram_attestations", "attest-v1 statements, by verdict or refusal", ["result"], registry=registry
        )
        ref = weakref.ref(worker)

        def oldest_age() -> float:
            # The oldest shard's time since its last successful verification (seal, verify or
            # attest), seconds; 0 without shards. No shard ids here: /metrics may be public.
            w = ref()
            if w is None:
                return 0.0
            try:
                last = w.manager.last_verified_ns()
            except VramError:
                return 0.0
            return max(((time.time_ns() - t) / 1e9 for t in last.values()), default=0.0)

        self.seal_age = Gauge(
            "vram_seal_age_max_seconds",
            "Seconds since the least recently verified shard was last verified",
            registry=registry,
        )
        self.seal_age.set_function(oldest_age)


# One set of collectors per registry: create_app may be called more than once for one worker.
_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, _AttestMetrics] = weakref.WeakKeyDictionary()


def attest_on_worker(
    worker: Worker, nonce: bytes, shard_ids: list[str] | None, probe: bool
) -> dict[str, Any]:
    """The worker's side: refuse unless it may work, attest, and stop it on a mismatch (returning
    the mismatch statement) or on any other fatal error (re-raised)."""
    worker.lifecycle.ensure_can_work()
    try:
        return worker.manager.attest(nonce, shard_ids, probe)
    except UnsupportedOperation as exc:
        # A backend whose kernels have no keyed BLAKE3 yet: the request cannot be served as asked,
        # which is the client's to know (ask without the probe), not a worker failure.
        raise ServiceError(400, ErrorCode.INVALID_PARAMS, f"probe not available here: {exc}") from None
    except AttestationMismatch as exc:
        # The same path as a failed /worker/verify: Stopped, security incident, audit. The
        # manager has already written SealVerificationFailed and AttestationIssued.
        worker.lifecycle.report_failure(exc)
        return exc.attestation
    except VramError as exc:
        worker.lifecycle.report_failure(exc)  # only fatal errors stop the worker
        raise


def register_attest_routes(
    app: FastAPI,
    worker: Worker,
    auth: list[Depends],
    *,
    rate: float = DEFAULT_ATTEST_RATE,
    burst: int = DEFAULT_ATTEST_BURST,
) -> None:
    """Add ``POST /worker/attest`` (behind ``auth``) and the attestation metrics."""
    bucket = TokenBucket(rate, burst)
    registry = worker.metrics.registry
    metrics = _METRICS.get(registry)
    if metrics is None:
        metrics = _METRICS[registry] = _AttestMetrics(registry, worker)
    m = metrics

    def attest(req: AttestRequest) -> Any:
        """A nonce-bound statement of what every shard (or the ones named) is now, recomputed from
        device memory, optionally with the BLAKE3 probes keyed by the nonce (attest-v1)."""
        wait = bucket.take()
        if wait > 0:
            m.attestations.labels(result="rate_limited").inc()
            retry_ms = max(1, math.ceil(wait * 1000))
            return JSONResponse(
                {
                    "code": "RATE_LIMITED",
                    "message": "too many attestation requests for this worker",
                    "retriable": True,
                    "retry_after_ms": retry_ms,
                },
                status_code=429,
                headers={"Retry-After": str(math.ceil(retry_ms / 1000))},
            )
        doc = attest_on_worker(worker, bytes.fromhex(req.nonce), req.shard_ids, req.probe)
        m.attestations.labels(result=doc["verdict"]).inc()
        return doc

    app.add_api_route(
        "/worker/attest",
        attest,
        methods=["POST"],
        dependencies=auth,
        tags=["worker"],
        response_model=AttestResponse,
        responses={
            429: {"description": "rate limited (RATE_LIMITED, retry_after_ms)"},
            400: {"description": "INVALID_PARAMS"},
            401: {"description": "AUTH_FAILED"},
            404: {"description": "a named shard is not sealed here"},
            413: {"description": "request body too large"},
            503: {"description": "worker not ready or stopped"},
        },
        summary="Nonce-bound attestation of the shards (attest-v1)",
    )
