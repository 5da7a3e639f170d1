"""The FastAPI application of the worker API: routers, dependencies, error handlers, middleware.

Authentication: every path needs ``Authorization: Bearer <worker token>`` except

* ``/health``: liveness probes (systemd, Kubernetes, load balancers) cannot hold the token, and
  the answer holds no secret: status, lifecycle state, backend, whether pre-verification is on;
* ``/metrics``: Prometheus scrapers are usually configured without credentials, and the metrics
  are counts and sizes only (no shard ids, digests or model names). ``metrics_auth=True``
  (``serve --metrics-auth``) puts it behind the token as well;
* ``/worker/ready`` only when ``ready_public=True`` (WORKER-4233: configurable, off by default).

``/openapi.json`` needs the token like every endpoint the contract does not name as open
(WORKER-4200): it holds no secret, but the contract's rule has exactly two exceptions. The
interactive docs pages are off: they load scripts from a CDN, which a worker must not do.

Registered here as well, behind the token: ``POST /worker/attest`` (``attest_routes``, always)
and the shard moves ``POST /worker/shards/{id}/migrate|offload|restore`` (``migrate_routes``),
when ``token`` is given: a manager for another device needs the worker token itself, which the
worker does not keep. ``serve`` always gives it, with the devices of ``serve --devices 0,1``
(default: the worker's own ``--device`` only, so a migration has nowhere to go but offload and
restore still work). ``extra_routers`` are included behind the token too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vram_residency import __version__
from vram_residency.errors import VramError
from vram_residency.service.api.errors import AUTH_FAILED_BODY, ErrorCode, ServiceError, from_exception
from vram_residency.service.api.routes import execute_router, public_router, worker_router
from vram_residency.service.attest_routes import register_attest_routes
from vram_residency.service.auth import BearerCheck
from vram_residency.service.context import CorrelationMiddleware
from vram_residency.service.errors import out_of_descriptors
from vram_residency.service.middleware import AuthMiddleware, BodyLimitMiddleware, HeadMiddleware
from vram_residency.service.migrate_routes import register_migrate_routes
from vram_residency.service.worker import Worker

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]

log = logging.getLogger("vram_residency.service")

DEFAULT_MAX_BODY_BYTES: Final = 256 * 1024
#: The most bytes one prompt character can take in a JSON body: an astral character escaped as a
#: surrogate pair (``\\ud83d\\ude00``, what Python's json.dumps writes by default).
JSON_BYTES_PER_CHAR: Final = 12
#: Room for an execute body's other fields (handle id, params, job id) beside the prompt.
EXECUTE_BODY_SLACK: Final = 16 * 1024


def create_app(
    worker: Worker,
    bearer: BearerCheck,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics_auth: bool = False,
    ready_public: bool = False,
    close_worker_on_shutdown: bool = True,
    extra_routers: Sequence[APIRouter] = (),
    on_shutdown_error: Callable[[BaseException], None] | None = None,
    token: bytes | None = None,
    devices: Sequence[int] = (),
) -> FastAPI:
    """The worker API over ``worker``; the app closes the worker when it shuts down.

    ``token`` (the worker token) adds the migrate/offload/restore routes, over ``devices`` (the
    GPU ordinals a shard may move to; the worker's own device is always one of them)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # anyio imports its event-loop backend on the first call into the thread pool, which
        # every synchronous route makes. Were that first call made during a flood of
        # connections, the import's open() would fail with EMFILE and the request (a
        # /worker/ready, a commit) would end as a 500 with a traceback. Made here, at startup,
        # the import is done before any client can take the descriptors.
        await run_in_threadpool(lambda: None)
        try:
            yield
        finally:
            if close_worker_on_shutdown:
                # Closing zeroes device memory and syncs the audit log: not on the event loop.
                try:
                    await asyncio.to_thread(worker.close)
                except BaseException as exc:
                    # Remembered for the exit status (a failed shutdown must not exit 0).
                    if on_shutdown_error is not None:
                        on_shutdown_error(exc)
                    raise

    app = FastAPI(
        title="vram-residency worker",
        version=__version__,
        description="Worker API (llama-orch's worker-orcd contract, plus additions): plan, seal models "
        "into device memory, verify the seals before every execution, serve the execution as "
        "Server-Sent Events.",
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

    auth: list[Any] = [Depends(require_token)]

    # -- the one place errors become HTTP -------------------------------------------------------
    def error_response(err: ServiceError) -> JSONResponse:
        if err.code is ErrorCode.AUTH_FAILED:
            return JSONResponse(
                dict(AUTH_FAILED_BODY), status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

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
            {
                "code": ErrorCode.INVALID_PARAMS.value,
                "message": str(exc.detail),
                "retriable": False,
                "retry_after_ms": None,
            },
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(VramError)
    async def _library_error(_: Request, exc: VramError) -> JSONResponse:
        err = from_exception(exc)
        if err.code is ErrorCode.INTERNAL:
            log.error("request failed: %s: %s", type(exc).__name__, exc)
        return error_response(err)

    @app.exception_handler(OSError)
    async def _os_error(_: Request, exc: OSError) -> JSONResponse:
        if not out_of_descriptors(exc):
            raise exc  # a bug, handled as any other below (500, traceback in the log)
        # No descriptor free (a flood of connections): a retriable 503, one line in the log, and
        # the connection kept (an unhandled error would close it, and a new one cannot be
        # accepted while no descriptor is free).
        log.warning("request failed: out of file descriptors: %s", exc.strerror)
        return error_response(from_exception(exc))

    @app.exception_handler(Exception)
    async def _any_error(_: Request, exc: Exception) -> JSONResponse:
        # A bug. Starlette answers with this and then re-raises, so uvicorn logs the traceback.
        return error_response(from_exception(exc))

    # -- routers --------------------------------------------------------------------------------
    app.include_router(public_router(worker, metrics_auth=metrics_auth, auth=auth))
    app.include_router(worker_router(worker, auth=auth, ready_public=ready_public))
    app.include_router(execute_router(worker), dependencies=auth)
    register_attest_routes(app, worker, auth)  # POST /worker/attest (attest-v1, rate-limited)
    if token is not None:
        register_migrate_routes(app, worker, token, devices=tuple(devices) or (worker.config.device,))
    for router in extra_routers:  # behind the token
        app.include_router(router, dependencies=auth)

    # The worker's own limits, in the schema (they are configurable, so not in the models).
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            comps = schema.get("components", {}).get("schemas", {})
            cfg = worker.config
            comps.get("ExecuteRequest", {}).get("properties", {}).get("prompt", {})["maxLength"] = (
                cfg.max_prompt_chars
            )
            for name in ("ExecuteRequest", "ExecuteParams"):
                mt = comps.get(name, {}).get("properties", {}).get("max_tokens", {})
                for alt in mt.get("anyOf", [mt]):
                    if alt.get("type") == "integer":
                        alt["maximum"] = cfg.max_tokens
            params = comps.get("ExecuteParams", {})
            if cfg.strict_params:
                # This worker refuses other names: the schema says so.
                params["additionalProperties"] = False
                params.pop("propertyNames", None)
                params["description"] = (
                    "max_tokens, temperature, seed; any other name is refused (strict_params)"
                )
            else:
                params["additionalProperties"] = True
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # Outermost first: correlation id, authentication, then the size limit, HEAD as GET, then
    # FastAPI.
    # WORKER-4242: a prompt within the worker's character limit is never refused for the size of
    # its JSON (100,000 astral characters, escaped, are 1.2 MB): execute takes at least that.
    prompt_body = JSON_BYTES_PER_CHAR * worker.config.max_prompt_chars + EXECUTE_BODY_SLACK
    execute_max = max(max_body_bytes, prompt_body)
    app.add_middleware(HeadMiddleware)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=max_body_bytes, path_max={"/worker/execute": execute_max}
    )
    public = {"/health"} | (set() if metrics_auth else {"/metrics"})
    if ready_public:
        public.add("/worker/ready")
    app.add_middleware(AuthMiddleware, check=bearer, public=public, refusal=AUTH_FAILED_BODY)
    app.add_middleware(CorrelationMiddleware)
    return app
