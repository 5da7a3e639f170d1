"""The FastAPI application of the worker API.

Authentication: every path needs ``Authorization: Bearer <worker token>`` except

* ``/health``: liveness probes (systemd, Kubernetes, load balancers) cannot hold the token, and
  the answer holds no secret: status, lifecycle state, backend, whether pre-verification is on;
* ``/metrics``: Prometheus scrapers are usually configured without credentials, and the metrics
  are counts and sizes only (no shard ids, digests or model names). ``metrics_auth=True``
  (``serve --metrics-auth``) puts it behind the token as well;
* ``/openapi.json``: the API's contract, the same for every worker.

The interactive docs pages are off: they load scripts from a CDN, which a worker must not do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, Literal

from fastapi import Depends, FastAPI, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from vram_residency import __version__
from vram_residency.audit.lifecycle import WorkerState
from vram_residency.errors import VramError
from vram_residency.service.attest_routes import register_attest_routes
from vram_residency.service.auth import BearerCheck
from vram_residency.service.errors import ErrorCode, ServiceError, from_exception
from vram_residency.service.executor import JobOutput, Token
from vram_residency.service.middleware import AuthMiddleware, BodyLimitMiddleware
from vram_residency.service.schemas import (
    SSE_EVENT_SCHEMA,
    CommitRequest,
    CommitResponse,
    DeallocateResponse,
    ErrorBody,
    ExecuteRequest,
    HealthResponse,
    PlanForModel,
    PlanRequest,
    PlanResponse,
    ReadyResponse,
    VerifyRequest,
    VerifyResponse,
)
from vram_residency.service.worker import ExecuteJob, VerifyPass, Worker

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]

log = logging.getLogger("vram_residency.service")

DEFAULT_MAX_BODY_BYTES: Final = 256 * 1024
_SHARD_ID_PATTERN: Final = r"^shard-[0-9a-f]{32}$"


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody, "description": "error (see code)"} for s in statuses}


_COMMON: Final = (400, 401, 413, 500, 503)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def create_app(
    worker: Worker,
    bearer: BearerCheck,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics_auth: bool = False,
    close_worker_on_shutdown: bool = True,
) -> FastAPI:
    """The worker API over ``worker``; the app closes the worker when it shuts down."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if close_worker_on_shutdown:
                # Closing zeroes device memory and syncs the audit log: not on the event loop.
                await asyncio.to_thread(worker.close)

    app = FastAPI(
        title="vram-residency worker",
        version=__version__,
        description="Worker API (llama-orch style): seal models into device memory, verify the seals "
        "before every execution, serve the execution as Server-Sent Events.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    bearer_scheme = HTTPBearer(auto_error=False, description="the worker token")

    def require_token(creds: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)) -> None:  # noqa: B008
        # AuthMiddleware already refused requests without the token; this check documents the
        # scheme in OpenAPI and keeps these routes closed if they are ever mounted without it.
        if creds is None or not bearer.check_header(f"{creds.scheme} {creds.credentials}"):
            raise ServiceError(401, ErrorCode.AUTH_FAILED, "")

    auth = [Depends(require_token)]

    # -- error handling -------------------------------------------------------------------------
    def error_response(err: ServiceError) -> JSONResponse:
        if err.code is ErrorCode.AUTH_FAILED:
            return JSONResponse(
                {"code": "AUTH_FAILED"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors()[:8]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
        return error_response(
            ServiceError(400, ErrorCode.INVALID_PARAMS, "; ".join(problems) or "invalid request")
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"code": ErrorCode.INVALID_PARAMS.value, "message": str(exc.detail), "retriable": False},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(VramError)
    async def _library_error(_: Request, exc: VramError) -> JSONResponse:
        err = from_exception(exc)
        if err.code is ErrorCode.INTERNAL:
            log.error("request failed: %s: %s", type(exc).__name__, exc)
        return error_response(err)

    @app.exception_handler(Exception)
    async def _any_error(_: Request, exc: Exception) -> JSONResponse:
        # A bug. Starlette answers with this and then re-raises, so uvicorn logs the traceback.
        return error_response(from_exception(exc))

    # -- public endpoints -----------------------------------------------------------------------
    @app.get("/health", response_model=HealthResponse, tags=["public"])
    def health() -> HealthResponse:
        state = worker.state
        status: Literal["ok", "degraded", "stopped"]
        if state is WorkerState.STOPPED:
            status = "stopped"
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
        )

    def metrics_endpoint() -> Response:
        return Response(generate_latest(worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route(
        "/metrics",
        metrics_endpoint,
        methods=["GET"],
        tags=["public"] if not metrics_auth else ["worker"],
        dependencies=auth if metrics_auth else None,
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
        summary="Prometheus metrics",
    )

    # -- worker endpoints -----------------------------------------------------------------------
    @app.post(
        "/worker/plan",
        response_model=PlanResponse,
        dependencies=auth,
        tags=["worker"],
        responses=_errors(*_COMMON, 404),
    )
    def plan(req: PlanRequest) -> dict[str, Any]:
        """VRAM needed for a model (or a size) against VRAM available."""
        if isinstance(req, PlanForModel):
            return worker.plan(req.model, None)
        return worker.plan(None, req.vram_bytes)

    @app.post(
        "/worker/commit",
        response_model=CommitResponse,
        dependencies=auth,
        tags=["worker"],
        responses=_errors(*_COMMON, 404, 409, 422, 507),
    )
    def commit(req: CommitRequest) -> CommitResponse:
        """Seal a model from the model directory, verify it, and make it executable."""
        m = worker.commit(req.model, req.expected_digest)
        return CommitResponse(
            model=m.name,
            shard_id=m.shard.shard_id,
            vram_bytes=m.shard.vram_bytes,
            digest=m.shard.digest,
            digest_algorithm=m.shard.digest_algorithm,
            executable=m.executor is not None,
            executor=m.executor_note,
            seal_ms=_ms(m.seal_seconds),
            verify_ms=_ms(m.verify_seconds),
            seal=m.shard.record(),  # type: ignore[arg-type]
        )

    @app.get(
        "/worker/ready",
        response_model=ReadyResponse,
        dependencies=auth,
        tags=["worker"],
        responses=_errors(401, 500),
    )
    def ready() -> dict[str, Any]:
        """Lifecycle state, committed models and their seal records."""
        return worker.status()

    @app.post(
        "/worker/verify",
        response_model=VerifyResponse,
        dependencies=auth,
        tags=["worker"],
        responses=_errors(*_COMMON, 404),
    )
    def verify(req: VerifyRequest | None = None) -> VerifyResponse:
        """Verify every shard (or one) now, from device memory."""
        result = worker.verify(req.shard_id if req is not None else None)
        return VerifyResponse(
            verified=True, shards=result.shards, bytes=result.bytes, duration_ms=_ms(result.seconds)
        )

    register_attest_routes(app, worker, auth)  # POST /worker/attest (attest-v1, rate-limited)

    @app.delete(
        "/worker/shards/{shard_id}",
        response_model=DeallocateResponse,
        dependencies=auth,
        tags=["worker"],
        responses=_errors(*_COMMON, 404),
    )
    def deallocate(shard_id: str = Path(pattern=_SHARD_ID_PATTERN, max_length=64)) -> DeallocateResponse:
        """Zero and free a shard's device memory (its model is no longer executable)."""
        shard = worker.deallocate(shard_id)
        return DeallocateResponse(shard_id=shard.shard_id, vram_bytes=shard.vram_bytes, deallocated=True)

    @app.post(
        "/worker/execute",
        dependencies=auth,
        tags=["worker"],
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "Server-Sent Events: started; token (a generator: each token as it is "
                "produced; an encoder: its input tokens, after the run); metrics; end (the generated text, "
                "or the embedding); or error",
                "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
            },
            **_errors(*_COMMON, 404),
        },
    )
    async def execute(req: ExecuteRequest) -> StreamingResponse:
        """Verify every shard, then run the model on the sealed weights; stream the result."""
        worker.lifecycle.ensure_can_work()
        model = worker.model_for(req.model)
        executor = model.executor
        if executor is None:
            raise ServiceError(
                400,
                ErrorCode.INVALID_PARAMS,
                f"model {model.name!r} is not executable: {model.executor_note}",
            )
        job_input = executor.prepare(req.prompt, req.max_tokens)
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

        job_id = req.job_id or f"job-{secrets.token_hex(8)}"
        job = ExecuteJob(
            job_id, model.name, job_input, on_verified, from_worker_thread, on_token=from_worker_thread
        )
        t0 = time.perf_counter()
        worker.submit(job)
        v = await verified
        if isinstance(v, BaseException):
            worker.metrics.executions.labels(result="refused").inc()
            raise v
        info: VerifyPass | None = v
        t_verified = time.perf_counter()

        async def events() -> AsyncIterator[str]:
            yield _sse(
                "started",
                {
                    "job_id": job_id,
                    "model": model.name,
                    "kind": executor.kind,
                    "executor": executor.description,
                    "backend": worker.backend,
                    "emulated": worker.emulated,
                    "verified": None
                    if info is None
                    else {"shards": info.shards, "bytes": info.bytes, "verify_ms": _ms(info.seconds)},
                    "pre_verify": worker.config.pre_verify,
                },
            )
            n = 0
            t_first: float | None = None
            out: JobOutput | BaseException | None = None
            while out is None:
                # Everything that arrived while the last chunk was sent goes out as one chunk:
                # one write per wake-up, not one per token, when the client reads slowly.
                items = [await stream.get()]
                while not stream.empty():
                    items.append(stream.get_nowait())
                chunk = []
                for item in items:
                    if isinstance(item, Token):
                        chunk.append(_sse("token", {"t": item.text, "i": n, "id": item.id}))
                        n += 1
                        if t_first is None:
                            t_first = time.perf_counter()
                    else:
                        out = item
                if chunk:
                    yield "".join(chunk)
            t_end = time.perf_counter()
            if isinstance(out, BaseException):
                err = from_exception(out)
                worker.metrics.executions.labels(result="error").inc()
                yield _sse("error", err.body())
                return
            worker.metrics.executions.labels(result="ok").inc()
            worker.metrics.execute_seconds.observe(t_end - t0)
            # An encoder's tokens are its input, known at once: one chunk, after the run.
            if job_input.tokens:
                yield "".join(_sse("token", {"t": t, "i": i}) for i, t in enumerate(job_input.tokens))
            yield _sse(
                "metrics",
                {
                    "tokens_in": out.end.get("tokens_in", len(job_input.tokens)),
                    "tokens_out": n,
                    "batch_size": job.batch_size,
                    "queue_and_verify_ms": _ms(t_verified - t0),
                    "verify_ms": None if info is None else _ms(info.seconds),
                    "first_token_ms": None if t_first is None else _ms(t_first - t0),
                    "run_ms": _ms(t_end - t_verified),
                    "total_ms": _ms(t_end - t0),
                    "pre_verify": worker.config.pre_verify,
                },
            )
            yield _sse("end", {"job_id": job_id, "tokens_out": 0, "stop_reason": "complete", **out.end})

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # Outermost first: authentication, then the size limit, then FastAPI.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    public = {"/health", "/openapi.json"} | (set() if metrics_auth else {"/metrics"})
    app.add_middleware(AuthMiddleware, check=bearer, public=public)
    return app
