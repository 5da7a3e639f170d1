"""The worker API's routers: public (health, metrics), worker (plan, commit, ready, verify,
deallocate, cancel) and execute (the SSE stream). Each route is thin: it turns a request into a
call on the worker and the result into the response shape; errors are raised as domain errors
and mapped to HTTP in ``api.errors`` (through the app's exception handlers).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path as FsPath
from typing import Any, Literal

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vram_residency.audit.errors import AuditWriteFailed
from vram_residency.errors import InvalidInput
from vram_residency.service.api.errors import ErrorCode, ServiceError, from_exception
from vram_residency.service.api.schemas import (
    SSE_EVENT_SCHEMA,
    AuditHeadMismatchInfo,
    AuditHeadResponse,
    CancelRequest,
    CancelResponse,
    CommitRequest,
    CommitResponse,
    DeallocateResponse,
    ErrorBody,
    ExecuteRequest,
    HealthResponse,
    PlanRequest,
    PlanResponse,
    ReadyResponse,
    VerifyRequest,
    VerifyResponse,
)
from vram_residency.service.commit import decode_model_bytes
from vram_residency.service.executor import JobOutput, Sampling, Token
from vram_residency.service.lifecycle import WorkerState
from vram_residency.service.scheduler import ExecuteJob
from vram_residency.service.status import handle, head_mismatch, worker_status
from vram_residency.service.worker import CommitSpec, VerifyPass, Worker

__all__ = ["execute_router", "public_router", "worker_router"]

log = logging.getLogger("vram_residency.service")

_SHARD_PATH = r"^[A-Za-z0-9._:\-]{1,128}$"


def _unplannable(worker: Worker, model_ref: str, reason: str) -> dict[str, Any]:
    """A plan for a model this worker does not have: not feasible, nothing required, the reason;
    the memory figures as any plan gives them (a tensor-parallel group's least free rank)."""
    out = worker.plan(None, 1)
    return {
        **out,
        "feasible": False,
        "vram_required": 0,
        "shard_plan": [],
        "reason": reason,
        "executable": None,
        "model": model_ref,
        "model_bytes": 0,
        "needed_bytes": 0,
        "fits": False,
    }


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody, "description": "error (see code)"} for s in statuses}


_COMMON = (400, 401, 413, 500, 503)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _cid(request: Request) -> str:
    return str(request.scope.get("state", {}).get("correlation_id", ""))


# -- public ------------------------------------------------------------------------------------
def public_router(worker: Worker, *, metrics_auth: bool, auth: list[Any]) -> APIRouter:
    router = APIRouter()

    @router.get("/health", response_model=HealthResponse, tags=["public"])
    async def health() -> HealthResponse:
        # On the event loop, never in the thread pool, and without waiting for any lock: liveness
        # probes must get their answer while every request thread waits for the worker (commits
        # queued behind a long load, deallocations behind a long generation).
        state = worker.lifecycle.state_snapshot
        status: Literal["ok", "degraded", "draining", "stopped"]
        if state is WorkerState.STOPPED:
            status = "stopped"
        elif state is WorkerState.DRAINING:
            status = "draining"
        elif state in (WorkerState.READY, WorkerState.EXECUTING):
            status = "ok"
        else:
            status = "degraded"
        return HealthResponse(
            status=status,
            state=state.value,
            backend=worker.backend,
            emulated=worker.emulated,
            pre_verify=worker.config.pre_verify,
            audit_head_mismatch=AuditHeadMismatchInfo(**info) if (info := head_mismatch(worker)) else None,
        )

    # HEAD as well (load balancers and uptime checkers often probe with it): HeadMiddleware serves
    # HEAD as GET on every path, keeping it out of the API's schema.

    # Scrapes run on a thread of their own, not in the pool that serves plain requests: when
    # every thread of that pool waits for the worker (commits behind a long load), a scrape
    # there would time out, and the graphs would have a gap exactly where they are needed.
    scraper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vram-metrics")

    async def metrics_endpoint() -> Response:
        body = await asyncio.get_running_loop().run_in_executor(
            scraper, generate_latest, worker.metrics.registry
        )
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    router.add_api_route(
        "/metrics",
        metrics_endpoint,
        methods=["GET"],
        tags=["public"] if not metrics_auth else ["worker"],
        dependencies=auth if metrics_auth else None,
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
        summary="Prometheus metrics",
    )
    return router


# -- worker ------------------------------------------------------------------------------------
def worker_router(worker: Worker, *, auth: list[Any], ready_public: bool = False) -> APIRouter:
    """Routes that need the token (the router's dependency); ``/worker/ready`` may be opened for
    health checks (``ready_public``, WORKER-4233)."""
    router = APIRouter(tags=["worker"])

    @router.post(
        "/worker/plan", dependencies=auth, response_model=PlanResponse, responses=_errors(*_COMMON, 404)
    )
    def plan(req: PlanRequest) -> dict[str, Any]:
        """Can this worker hold and run the model? (WORKER-4210: VRAM and capabilities.)"""
        name = req.model_ref or req.model
        if req.model_ref is not None:
            # The contract's model_ref is any reference the orchestrator uses (its bytes come
            # with the commit): one this worker cannot find or name is a plan that is not
            # feasible, with the reason, never an error for the request's shape. The ``model``
            # addition keeps answering 404 / 400.
            try:
                worker.catalog.resolve(req.model_ref)
            except InvalidInput:  # not a name here, or not found (ModelNotFound)
                return _unplannable(
                    worker,
                    req.model_ref,
                    f"model_ref {req.model_ref!r} is not a model in this worker's model directory; "
                    "commit it with model_bytes (a path or the bytes)",
                )
        out = worker.plan(name, req.vram_bytes)
        feasible = out["fits"]
        reason: str | None = None
        executable: bool | None = None
        if not feasible:
            # A tensor-parallel group holds about 1/degree of the model per rank (TPWorker.plan).
            part = -(-out["model_bytes"] // worker.tp_degree)
            reason = (
                f"needs {out['needed_bytes']} bytes of device memory, {out['available_bytes']} free"
                if part <= worker.manager.max_model_bytes
                else "the model is larger than this worker's largest allocation"
                + (" per rank" if worker.tp_degree > 1 else "")
            )
        if name is not None:
            executable, why = worker.capability(worker.catalog.resolve(name))
            if not executable and feasible:
                feasible, reason = False, why
        degree = worker.tp_degree
        if req.shard_layout == "tensor_parallel":
            if req.tp_degree is None:
                feasible, reason = False, "tp_degree is required for shard_layout tensor_parallel"
            elif req.tp_degree != degree and (req.tp_degree > 1 or degree > 1):
                feasible, reason = (
                    False,
                    (
                        f"this worker runs as a tensor-parallel group of {degree} rank(s), not "
                        f"{req.tp_degree} (start it under torchrun with --nproc-per-node {req.tp_degree})"
                        if degree > 1
                        else "this worker is one process on one GPU; start it under torchrun with "
                        f"--nproc-per-node {req.tp_degree} for a tensor-parallel group"
                    ),
                )
        elif degree > 1:
            feasible, reason = (
                False,
                (
                    f"this worker is a tensor-parallel group of {degree} ranks: plan with "
                    f'shard_layout "tensor_parallel" and tp_degree {degree}'
                ),
            )
        state = worker.lifecycle.state
        if feasible and state in (WorkerState.DRAINING, WorkerState.STOPPED):
            # WORKER-4960s: no new work while draining (nor ever after Stopped); a plan that said
            # feasible would send the orchestrator to a commit this worker refuses.
            feasible, reason = False, f"worker is {state.value} and takes no new work"
        # Each rank holds about 1/degree of the model (its slice of every split weight).
        split = -(-out["model_bytes"] // degree)
        per_rank = worker.needed_bytes(split) if degree > 1 else out["needed_bytes"]
        shard_plan = (
            [
                {"shard_index": r, "vram_bytes": per_rank, "gpu_device": d}
                for r, d in enumerate(worker.tp_devices())
            ]
            if feasible
            else []
        )
        return {
            "feasible": feasible,
            "vram_required": out["needed_bytes"],
            "shard_plan": shard_plan,
            "reason": reason,
            "executable": executable,
            **out,
        }

    @router.post(
        "/worker/commit",
        dependencies=auth,
        response_model=CommitResponse,
        responses=_errors(*_COMMON, 404, 409, 422, 507),
    )
    def commit(req: CommitRequest, request: Request) -> dict[str, Any]:
        """Seal a model (by name, path or bytes), verify it, make it executable."""
        name = req.model_ref or req.model
        assert name is not None  # the schema's validator
        path: FsPath | None = None
        data: bytes | None = None
        if isinstance(req.model_bytes, str):
            path = FsPath(req.model_bytes)
        elif req.model_bytes is not None:
            data = decode_model_bytes(req.model_bytes.base64).data
        m = worker.commit_spec(
            CommitSpec(
                name=name,
                path=path,
                data=data,
                expected_digest=req.expected_digest,
                signature=req.signature,
                handle_id=req.shard_id,
                shard_index=req.shard_index,
                correlation_id=_cid(request),
            )
        )
        return {
            "handle": handle(worker, m),
            "sealed": True,
            "model": m.name,
            "shard_id": m.shard.shard_id,
            "vram_bytes": m.shard.vram_bytes,
            "digest": m.shard.digest,
            "digest_algorithm": m.shard.digest_algorithm,
            "executable": m.executor is not None,
            "executor": m.executor_note,
            "seal_ms": _ms(m.seal_seconds),
            "verify_ms": _ms(m.verify_seconds),
            "seal": m.shard.record(),
        }

    def ready() -> dict[str, Any]:
        """Ready (a model sealed and verified, no seal failed), the handles, and this worker's facts."""
        return worker_status(worker)

    router.add_api_route(
        "/worker/ready",
        ready,
        methods=["GET"],
        response_model=ReadyResponse,
        dependencies=None if ready_public else auth,
        responses=_errors(401, 500),
        openapi_extra={"security": []} if ready_public else None,
    )

    @router.post(
        "/worker/verify", dependencies=auth, response_model=VerifyResponse, responses=_errors(*_COMMON, 404)
    )
    def verify(req: VerifyRequest | None = None) -> VerifyResponse:
        """Verify every shard (or one) now, from device memory."""
        result = worker.verify(req.shard_id if req is not None else None)
        return VerifyResponse(
            verified=True, shards=result.shards, bytes=result.bytes, duration_ms=_ms(result.seconds)
        )

    @router.delete(
        "/worker/shards/{shard_id}",
        dependencies=auth,
        response_model=DeallocateResponse,
        responses=_errors(*_COMMON, 404),
    )
    def deallocate(shard_id: str = Path(pattern=_SHARD_PATH, max_length=128)) -> DeallocateResponse:
        """Zero and free a shard's device memory (by handle id or seal shard id)."""
        shard = worker.deallocate(shard_id)
        return DeallocateResponse(shard_id=shard.shard_id, vram_bytes=shard.vram_bytes, deallocated=True)

    @router.get(
        "/worker/audit/head",
        dependencies=auth,
        response_model=AuditHeadResponse,
        responses=_errors(401, 404, 500, 503),
    )
    def audit_head() -> dict[str, Any]:
        """The audit log's signed head, made durable first: an orchestrator keeps it as an anchor
        and later runs ``audit verify --anchor`` with it, which fails unless the log still holds
        that record and extends it (a rollback of the log and its head file shows)."""
        audit = worker.audit
        if audit is None:
            raise ServiceError(404, ErrorCode.INVALID_PARAMS, "this worker keeps no audit log")
        try:
            head = audit.signed_head()
        except AuditWriteFailed as exc:
            # As everywhere: a worker that cannot keep its audit trail stops (fail closed), and
            # the answer is the usual audit failure (500 INTERNAL, "audit trail failed").
            worker.lifecycle.report_failure(exc)
            raise
        return {"worker_id": worker.config.worker_id, "head": head.to_json()}

    @router.post(
        "/worker/cancel", dependencies=auth, response_model=CancelResponse, responses=_errors(*_COMMON)
    )
    def cancel(req: CancelRequest) -> CancelResponse:
        """Cancel a queued or running job: its stream ends with an ``error`` event (CANCELLED) and
        no token after this returns. ``cancelled`` is false when no such job is live."""
        ok = worker.scheduler.cancel(req.job_id)
        if ok:
            worker.metrics.jobs_cancelled.labels(reason="request").inc()
        return CancelResponse(job_id=req.job_id, cancelled=ok)

    return router


# -- execute -----------------------------------------------------------------------------------
def execute_router(worker: Worker) -> APIRouter:
    router = APIRouter(tags=["worker"])

    @router.post(
        "/worker/execute",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "Server-Sent Events: started {job_id, ..., ignored_params: the names "
                "of params accepted and not used}; token {t, i} (a generator: each token as it is "
                "produced; an encoder: its input tokens, after the run); metrics; end {tokens_out, "
                "decode_time_ms, ...}; or error {code, message, retriable, retry_after_ms}. Nothing "
                "follows end or error.",
                "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
            },
            **_errors(*_COMMON, 404),
        },
    )
    async def execute(req: ExecuteRequest, request: Request) -> StreamingResponse:
        """Verify every shard, then run the model on the sealed weights; stream the result."""
        cfg = worker.config
        ignored = req.params.ignored
        if ignored and cfg.strict_params:
            raise InvalidInput(
                f"params: {', '.join(ignored)} not used by this worker (strict_params refuses "
                "params other than max_tokens, temperature and seed)"
            )
        if len(req.prompt) > cfg.max_prompt_chars:
            raise InvalidInput(f"prompt is longer than {cfg.max_prompt_chars} characters")
        if "\x00" in req.prompt:
            raise InvalidInput("prompt contains a NUL character")
        max_tokens = req.effective_max_tokens
        if max_tokens is not None and max_tokens > cfg.max_tokens:
            raise InvalidInput(f"max_tokens must be at most {cfg.max_tokens}")
        worker.lifecycle.ensure_can_work()
        model = worker.model_for(req.model, req.handle_id)
        executor = worker.executor_for(model)
        sampling = Sampling(temperature=req.params.temperature, seed=req.params.seed)
        job_input = executor.prepare(req.prompt, max_tokens, sampling)
        loop = asyncio.get_running_loop()
        verified: asyncio.Future[Any] = loop.create_future()
        # Tokens and then the job's result, in the order the execution thread produced them
        # (call_soon_threadsafe runs callbacks in order): the stream never ends before a token.
        stream: asyncio.Queue[Token | JobOutput | BaseException] = asyncio.Queue()

        def from_worker_thread(value: Any) -> None:
            loop.call_soon_threadsafe(stream.put_nowait, value)

        def on_verified(value: Any) -> None:
            def _set() -> None:
                if not verified.done():
                    verified.set_result(value)  # exceptions travel as values: nothing goes unretrieved

            loop.call_soon_threadsafe(_set)

        cid = _cid(request)
        job_id = req.job_id or f"job-{secrets.token_hex(8)}"
        job = ExecuteJob(
            job_id,
            model.name,
            job_input,
            on_verified,
            from_worker_thread,
            on_token=from_worker_thread,
            correlation_id=cid,
        )
        t0 = time.perf_counter()
        worker.submit(job)

        async def client_left() -> None:
            # The body is read: what can come now is the client going away. Nothing else reads
            # it before the stream starts (StreamingResponse watches for it from then on).
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(client_left())
        try:
            await asyncio.wait({verified, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not verified.done() and job.cancel():
                # WORKER-4253: the client left while the job waited in the queue; the scheduler
                # skips a cancelled queued job before any verification (a running one stops at
                # its next token).
                worker.metrics.jobs_cancelled.labels(reason="disconnect").inc()
                log.info("job %s cancelled: client disconnected", job_id, extra={"correlation_id": cid})
            v = await verified
        except BaseException:
            job.cancel()  # the client left while the job waited
            worker.scheduler.done(job)
            raise
        finally:
            watch.cancel()
        if isinstance(v, BaseException):
            worker.scheduler.done(job)
            worker.metrics.executions.labels(result="refused").inc()
            worker.metrics.jobs_failed.labels(code=from_exception(v).code.value).inc()
            raise v
        info: VerifyPass | None = v
        t_verified = time.perf_counter()
        fields = {
            "job_id": job_id,
            "model_ref": model.name,
            "worker_id": cfg.worker_id,
            "gpu_device": cfg.device,
            "correlation_id": cid,
        }
        # The names of params not used, never their values (a stop list, a logit bias: the
        # client's text). The names are identifiers (ExecuteParams checked them): nothing to forge.
        log.info(
            "job %s started%s",
            job_id,
            f"; params not used: {', '.join(ignored)}" if ignored else "",
            extra={**fields, "human": f"Started inference on {model.name}"},
        )
        return StreamingResponse(
            _events(
                worker,
                job,
                info,
                model.name,
                executor.kind,
                executor.description,
                t0,
                t_verified,
                stream,
                fields,
                ignored,
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return router


async def _events(
    worker: Worker,
    job: ExecuteJob,
    info: VerifyPass | None,
    model_name: str,
    kind: str,
    description: str,
    t0: float,
    t_verified: float,
    stream: asyncio.Queue[Token | JobOutput | BaseException],
    fields: dict[str, Any],
    ignored_params: list[str],
) -> AsyncIterator[str]:
    """The job's SSE stream. Before each token leaves, the job's cancel flag and the worker's
    Stopped state are checked: no token produced after a cancel or a detected seal failure
    reaches the client. A client that goes away cancels the job (the generator is closed)."""
    ended = False
    try:
        yield _sse(
            "started",
            {
                "job_id": job.job_id,
                "model": model_name,
                "kind": kind,
                "executor": description,
                "backend": worker.backend,
                "emulated": worker.emulated,
                "verified": None
                if info is None
                else {"shards": info.shards, "bytes": info.bytes, "verify_ms": _ms(info.seconds)},
                "pre_verify": worker.config.pre_verify,
                # Params the request named that this worker accepted and did not use (sorted).
                "ignored_params": ignored_params,
            },
        )
        n = 0
        t_first: float | None = None
        out: JobOutput | BaseException | None = None
        stopped: Callable[[], bool] = lambda: worker.lifecycle.stopped  # noqa: E731
        while out is None:
            # Everything that arrived while the last chunk was sent goes out as one chunk:
            # one write per wake-up, not one per token, when the client reads slowly.
            items = [await stream.get()]
            while not stream.empty():
                items.append(stream.get_nowait())
            chunk = []
            for item in items:
                if isinstance(item, Token):
                    if job.cancelled or stopped():
                        continue  # produced, but after the job was stopped: never sent
                    chunk.append(_sse("token", {"t": item.text, "i": n, "id": item.id}))
                    n += 1
                    if t_first is None:
                        t_first = time.perf_counter()
                else:
                    out = item
            if chunk:
                yield "".join(chunk)
        t_end = time.perf_counter()
        if isinstance(out, JobOutput) and stopped():
            from vram_residency.service.lifecycle import WorkerStopped

            out = WorkerStopped("worker stopped while the job ran", reason="stopped")
        worker.metrics.tokens_generated.inc(n)
        if isinstance(out, BaseException):
            err = from_exception(out)
            worker.metrics.executions.labels(result="error").inc()
            worker.metrics.jobs_failed.labels(code=err.code.value).inc()
            log.warning(
                "job %s ended with %s",
                job.job_id,
                err.code.value,
                extra={**fields, "tokens_out": n, "human": f"Job ended with an error: {err.message}"},
            )
            ended = True
            yield _sse("error", err.body())
            return
        worker.metrics.executions.labels(result="ok").inc()
        worker.metrics.jobs_completed.inc()
        worker.metrics.execute_seconds.observe(t_end - t0)
        decode_ms = _ms(t_end - t_verified)
        # An encoder's tokens are its input, known at once: one chunk, after the run.
        if job.input.tokens:
            yield "".join(_sse("token", {"t": t, "i": i}) for i, t in enumerate(job.input.tokens))
        tokens_in = out.end.get("tokens_in", len(job.input.tokens))
        yield _sse(
            "metrics",
            {
                "tokens_in": tokens_in,
                "tokens_out": n,
                "batch_size": job.batch_size,
                "queue_and_verify_ms": _ms(t_verified - t0),
                "verify_ms": None if info is None else _ms(info.seconds),
                "first_token_ms": None if t_first is None else _ms(t_first - t0),
                "run_ms": decode_ms,
                "total_ms": _ms(t_end - t0),
                "pre_verify": worker.config.pre_verify,
            },
        )
        log.info(
            "job %s ended",
            job.job_id,
            extra={
                **fields,
                "tokens_in": tokens_in,
                "tokens_out": n,
                "decode_time_ms": decode_ms,
                "human": f"Finished inference: {n} tokens in {decode_ms:.1f} ms",
            },
        )
        ended = True
        yield _sse(
            "end",
            {
                "job_id": job.job_id,
                "stop_reason": "complete",
                **out.end,
                "tokens_out": out.end.get("tokens_out", 0) if kind != "generation" else n,
                "decode_time_ms": decode_ms,
            },
        )
    finally:
        if not ended and job.cancel():
            # The client went away (the stream was closed before its end): the job stops.
            worker.metrics.jobs_cancelled.labels(reason="disconnect").inc()
            log.info("job %s cancelled: client disconnected", job.job_id, extra=fields)
        worker.scheduler.done(job)
