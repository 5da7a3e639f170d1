"""Putting a worker together from options, and running it under uvicorn.

``build(options)`` does everything that can fail before a socket is bound: it finds and checks
the token file (creating one only for the bare default), opens the audit log, the backend and the
worker, and commits the startup model. ``serve`` then runs uvicorn in the foreground;
``ServerThread`` runs it in a thread of this process on an ephemeral loopback port (tests and
benchmarks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from vram_residency._core import DEFAULT_MAX_TENSORS
from vram_residency.errors import ConfigError, VramError
from vram_residency.manager import BackendName
from vram_residency.service.api.app import DEFAULT_MAX_BODY_BYTES, create_app
from vram_residency.service.api.errors import RETRY_AFTER_MS_BUSY, ErrorCode
from vram_residency.service.auth import (
    BearerCheck,
    TokenOrigin,
    TokenSource,
    create_token_file,
    default_state_dir,
    find_token_file,
    fingerprint,
    read_token_file,
)
from vram_residency.service.blas import set_blas_threads
from vram_residency.service.callbacks import Callbacks
from vram_residency.service.catalog import MINILM_MODEL, ModelCatalog, minilm_model_dir
from vram_residency.service.commit import load_public_keys
from vram_residency.service.config import DEFAULT_TOKEN_PATH
from vram_residency.service.executors.example_model import EXAMPLE_NAMES, PRESETS, example_provider
from vram_residency.service.lifecycle import Incident
from vram_residency.service.metrics import Metrics
from vram_residency.service.status import handle
from vram_residency.service.worker import (
    DEFAULT_MAX_MODEL_BYTES,
    DEFAULT_MAX_PROMPT_CHARS,
    DEFAULT_MAX_TOKENS_LIMIT,
    CommitSpec,
    CommittedModel,
    Worker,
    WorkerConfig,
    default_factories,
)

__all__ = ["DEFAULT_PORT", "EXIT_STOPPED", "Built", "ServeOptions", "ServerThread", "build", "serve"]

log = logging.getLogger("vram_residency.service")

DEFAULT_PORT: Final = 8321

#: ``serve --exit-on-stop``'s exit status once the worker entered Stopped (a seal failure, a
#: CUDA/driver error): the same 3 as a tensor-parallel follower's on Stopped (tp.run_follower), and
#: none of the CLI's others (0, 1, 2, 70, 130, 143), so a supervisor can tell it from a failed start.
EXIT_STOPPED: Final = 3


@dataclass(frozen=True, slots=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    model_dir: Path | None = None
    #: Committed at startup. None: the example model when there is no model directory, else none.
    model: str | None = None
    #: Which generated example model (a preset of ``example_model.PRESETS``) is built in.
    example: str = "small"
    token_file: Path | None = None
    state_dir: Path | None = None
    audit_log: Path | None = None
    backend: BackendName = "auto"
    device: int = 0
    #: GPU ordinals this worker may migrate its shard to (``--devices 0,1``); empty: ``device``
    #: only. The worker verifies and executes on one device at a time (see migrate_routes).
    devices: tuple[int, ...] = ()
    #: Seal age: seconds after which a shard's last verification is too old to execute on (0: no
    #: limit; matters only without pre-verification), and what then happens (WorkerConfig).
    max_seal_age: float = 0.0
    seal_age_policy: Literal["reverify", "refuse"] = "reverify"
    worker_id: str | None = None
    capacity_bytes: int | None = None
    scrub_interval: float = 60.0
    scrub_budget: float = 0.05
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_batch: int = 64
    metrics_auth: bool = False
    access_log: bool = False
    #: False only for the verification-overhead benchmark (see WorkerConfig.pre_verify).
    pre_verify: bool = True
    #: Threads of numpy's BLAS in this process (see ``blas.py``); 0 leaves BLAS as it is.
    blas_threads: int = 1
    on_incident: Callable[[Incident], object] | None = field(default=None, compare=False)
    pool_id: str | None = None
    #: Models held at once. None: 1 (the contract), or 2 in the newcomer mode (a bare serve with
    #: no model directory and no config: the example model, and MiniLM beside it as the README
    #: shows).
    max_models: int | None = None
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_tokens: int = DEFAULT_MAX_TOKENS_LIMIT
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    #: The most tensors a committed file's header may list (WorkerConfig.max_tensors).
    max_tensors: int = DEFAULT_MAX_TENSORS
    #: Refuse execute params other than max_tokens, temperature, seed (WorkerConfig.strict_params).
    strict_params: bool = False
    #: On entering Stopped, shut down as a drain does and exit with EXIT_STOPPED, for supervisors
    #: other than pool-managerd (systemd, Kubernetes). Off: the Stopped worker stays up (the
    #: contract's WORKER-4032: pool-managerd inspects and restarts it).
    exit_on_stop: bool = False
    drain_timeout: float = 30.0
    execution_timeout: float = 0.0
    ready_public: bool = False
    readiness_callback_url: str | None = None
    #: Committed at start by path (the spec config's model_path), instead of ``model``.
    model_path: Path | None = None
    #: Spec mode (``--config``): the token file must exist (default /etc/llorch/worker-token).
    spec_mode: bool = False
    commit_keys: tuple[Path, ...] = ()
    #: Concurrent connections before new ones get 503 (uvicorn's limit_concurrency).
    max_connections: int = 512
    #: Seconds a connection may take to send its request headers, and stay idle between requests.
    header_timeout: float = 10.0
    extra_routers: tuple[Any, ...] = field(default=(), compare=False)
    #: Builds the worker (default ``Worker``): a tensor-parallel rank 0 gives service.tp's here.
    make_worker: Callable[..., Worker] | None = field(default=None, compare=False)


@dataclass(slots=True)
class Built:
    options: ServeOptions
    token_source: TokenSource
    token_created: bool
    token_fingerprint: str
    audit_path: Path
    worker: Worker
    app: FastAPI
    startup_model: CommittedModel | None
    callbacks: Callbacks | None = None
    #: Set when the app's shutdown failed (the process must then exit non-zero).
    shutdown_error: BaseException | None = None
    #: Called (from whichever thread reported it) after each incident that stopped the worker,
    #: once the worker's own incident handling is done; ``serve --exit-on-stop`` sets it.
    on_stopped: Callable[[Incident], object] | None = field(default=None, repr=False)


def _resolve_token(opts: ServeOptions, state_dir: Path) -> tuple[TokenSource, bytes, bool]:
    if opts.spec_mode:
        # The contract: the token file is given (or the default /etc/llorch/worker-token) and
        # must exist; nothing is created (fail fast).
        source = TokenSource(opts.token_file or DEFAULT_TOKEN_PATH, TokenOrigin.ARGUMENT, False)
        return source, read_token_file(source.path), False
    source = find_token_file(opts.token_file, state_dir)
    if source.may_create and not (source.path.exists() or source.path.is_symlink()):
        return source, create_token_file(source.path), True
    return source, read_token_file(source.path), False


def check_options(opts: ServeOptions) -> None:
    """Options out of range are errors, said before anything starts (#17.12)."""
    if not 0 <= opts.port <= 65535:
        raise ConfigError(f"--port must be from 1 to 65535 (0: any free port), not {opts.port}")
    if opts.max_body_bytes < 1024:
        raise ConfigError(f"--max-body-bytes must be at least 1024, not {opts.max_body_bytes}")
    if opts.max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, not {opts.max_batch}")
    if opts.max_models is not None and opts.max_models < 1:
        raise ConfigError(f"--max-models must be at least 1, not {opts.max_models}")
    if opts.device < 0:
        raise ConfigError(f"--device must be a GPU ordinal (0, 1, ...), not {opts.device}")
    if any(d < 0 for d in opts.devices) or len(set(opts.devices)) != len(opts.devices):
        raise ConfigError("--devices must be distinct GPU ordinals (0, 1, ...)")
    if not opts.max_seal_age >= 0:
        raise ConfigError(f"--max-seal-age must be >= 0 (0: no limit), not {opts.max_seal_age}")
    if opts.scrub_interval < 0:
        raise ConfigError(f"--scrub-interval must be >= 0, not {opts.scrub_interval}")
    if not 0 < opts.scrub_budget <= 1:
        raise ConfigError("--scrub-budget must be above 0 and at most 100 (percent)")
    if opts.capacity_bytes is not None and opts.capacity_bytes < 1:
        raise ConfigError("--host-capacity-gib must be above 0")
    if opts.drain_timeout < 0 or opts.execution_timeout < 0:
        raise ConfigError("--drain-timeout and the execution timeout must be >= 0")
    if opts.max_model_bytes < 1 or opts.max_tokens < 1 or opts.max_prompt_chars < 1:
        raise ConfigError("--max-model-bytes, --max-tokens and --max-prompt-chars must be at least 1")
    if opts.max_tensors < 1:
        raise ConfigError(f"--max-tensors must be at least 1, not {opts.max_tensors}")
    if opts.max_connections < 16:
        raise ConfigError(f"--max-connections must be at least 16, not {opts.max_connections}")
    if opts.header_timeout <= 0:
        raise ConfigError("--header-timeout must be above 0")
    if opts.audit_log is not None:
        parent = opts.audit_log.parent
        try:
            parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(
                f"--audit-log {opts.audit_log}: cannot create {parent}: {exc.strerror}"
            ) from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--audit-log {opts.audit_log}: directory {parent} is not writable")
        if opts.audit_log.exists() and not os.access(opts.audit_log, os.W_OK):
            raise ConfigError(f"--audit-log {opts.audit_log} is not writable")


def _incident_hook(
    user: Callable[[Incident], object] | None, callbacks: Callbacks | None
) -> Callable[[Incident], object] | None:
    """The user's incident callback, and the pool manager's failure callback (sent at once, in
    the background: the worker is Stopped and a pool manager should route around it now)."""
    if callbacks is None:
        return user

    def hook(incident: Incident) -> None:
        # The failure callback says "Stopped": not for an incident the worker survives, and once
        # per transition to Stopped (several verifications failing at once are one stop; the
        # later detections are in the audit log and go to the user's hook).
        if incident.stopped and not incident.already_stopped:
            callbacks.failed_now(f"security incident {incident.id}: {incident.error_type}")
        if user is not None:
            user(incident)

    return hook


def build(opts: ServeOptions) -> Built:
    """Check the token, open the worker, commit the startup model, and make the app."""
    check_options(opts)
    state_dir = opts.state_dir or default_state_dir()
    source, token, created = _resolve_token(opts, state_dir)
    audit_path = opts.audit_log or state_dir / "audit.jsonl"
    if opts.example not in PRESETS:
        raise ConfigError(f"unknown example model {opts.example!r} (one of {', '.join(PRESETS)})")
    builtin: dict[str, Path] = {}
    minilm = minilm_model_dir()
    if minilm is not None:
        builtin[MINILM_MODEL] = minilm
    # The generated example is written on first use only (a bare serve: at startup), in the
    # worker's own state directory.
    example = EXAMPLE_NAMES[opts.example]
    startup = opts.model
    newcomer = opts.model_dir is None and not opts.spec_mode and opts.model_path is None
    if startup is None and newcomer:
        startup = example
    max_models = opts.max_models if opts.max_models is not None else (2 if newcomer else 1)
    worker_id = opts.worker_id or f"worker-{socket.gethostname()}-{opts.device}"
    if opts.blas_threads > 0:
        done = set_blas_threads(opts.blas_threads)
        log.debug("BLAS threads: %s", done or "no OpenBLAS found; left as it is")
    config = WorkerConfig(
        worker_id=worker_id,
        backend=opts.backend,
        device=opts.device,
        capacity_bytes=opts.capacity_bytes,
        pre_verify=opts.pre_verify,
        max_batch=opts.max_batch,
        scrub_interval=opts.scrub_interval,
        scrub_budget=opts.scrub_budget,
        pool_id=opts.pool_id,
        max_models=max_models,
        max_prompt_chars=opts.max_prompt_chars,
        max_tokens=opts.max_tokens,
        max_model_bytes=opts.max_model_bytes,
        max_tensors=opts.max_tensors,
        strict_params=opts.strict_params,
        drain_timeout=opts.drain_timeout,
        execution_timeout=opts.execution_timeout,
        max_seal_age=opts.max_seal_age,
        seal_age_policy=opts.seal_age_policy,
        spool_dir=state_dir / "spool",
        commit_keys=load_public_keys(opts.commit_keys),
    )
    callbacks = (
        Callbacks(opts.readiness_callback_url, worker_id=worker_id, pool_id=opts.pool_id)
        if opts.readiness_callback_url
        else None
    )
    provider = example_provider(state_dir / "example-models" / example, opts.example, config.digest_algorithm)
    model_dir = opts.model_dir
    if model_dir is None and opts.model_path is not None:
        model_dir = opts.model_path.parent
    catalog = ModelCatalog(
        model_dir, builtin, {example: provider}, generated_root=state_dir / "example-models"
    )
    built_ref: list[Built] = []
    incident_hook = _incident_hook(opts.on_incident, callbacks)

    def on_incident(incident: Incident) -> None:
        # The failure callback and the user's hook first (a user hook that raises is logged by
        # the worker, and must not keep --exit-on-stop from shutting the worker down).
        try:
            if incident_hook is not None:
                incident_hook(incident)
        finally:
            stopped = built_ref[0].on_stopped if built_ref else None
            if incident.stopped and stopped is not None:
                stopped(incident)

    worker = (opts.make_worker or Worker)(
        config,
        token,
        catalog,
        audit_path=audit_path,
        metrics=Metrics(),
        factories=tuple(default_factories()),
        on_incident=on_incident,
    )

    def shutdown_failed(exc: BaseException) -> None:
        if built_ref:
            built_ref[0].shutdown_error = exc

    try:
        model: CommittedModel | None = None
        if opts.model_path is not None:
            model = worker.commit_spec(CommitSpec(name=opts.model_path.name, path=opts.model_path))
        elif startup is not None:
            model = worker.commit(startup)
        app = create_app(
            worker,
            BearerCheck(token),
            max_body_bytes=opts.max_body_bytes,
            metrics_auth=opts.metrics_auth,
            ready_public=opts.ready_public,
            extra_routers=opts.extra_routers,
            on_shutdown_error=shutdown_failed,
            token=token,
            devices=(opts.device, *opts.devices),
        )
    except BaseException as exc:
        worker.close()
        if callbacks is not None and isinstance(exc, Exception):
            # WORKER-4020s: failure is reported to the pool manager like readiness, which it
            # waits for; the process then exits non-zero (fail fast). Library and service errors
            # say what failed without secrets; anything else is named by its type only.
            what = str(exc) if isinstance(exc, VramError) else type(exc).__name__
            callbacks.stopped(worker.lifecycle.state.value, f"startup failed: {what}", failed=True)
        raise
    built = Built(
        options=opts,
        token_source=source,
        token_created=created,
        token_fingerprint=fingerprint(token),
        audit_path=audit_path,
        worker=worker,
        app=app,
        startup_model=model,
        callbacks=callbacks,
    )
    built_ref.append(built)
    return built


class _AcceptErrorFilter(logging.Filter):
    """At most one asyncio "socket.accept() out of system resource" line per ``interval``: under
    fd exhaustion asyncio logs one traceback per accept attempt (about 100 MB in 15 s), enough
    to fill the disk under the audit log (#17.7)."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self._interval = interval
        self._last = -float("inf")
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("socket.accept() out of system resource"):
            return True
        now = time.monotonic()
        if now - self._last < self._interval:
            self._dropped += 1
            return False
        self._last = now
        if self._dropped:
            record.msg = f"{record.msg} ({self._dropped} more like it suppressed)"
            self._dropped = 0
        record.exc_info = None  # the traceback says nothing the message does not
        return True


_ACCEPT_FILTER: Final = _AcceptErrorFilter()


def harden_process() -> int:
    """Raise the soft open-files limit to the hard one (a worker holds a socket per client), and
    rate-limit asyncio's accept-error line. Returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, want, exc)
    aio = logging.getLogger("asyncio")
    if _ACCEPT_FILTER not in aio.filters:
        aio.addFilter(_ACCEPT_FILTER)
    return int(soft)


def _envelope(code: ErrorCode, message: str, retry_after_ms: int | None) -> bytes:
    """An error body in the API's envelope (WORKER-4950s), for the answers uvicorn itself would
    give as text/plain, which a client parsing errors cannot read; retriable when it says when."""
    body = {"code": code.value, "message": message, "retriable": retry_after_ms is not None}
    return json.dumps({**body, "retry_after_ms": retry_after_ms}, separators=(",", ":")).encode()


#: The 503 over the connection limit.
_BUSY_BODY: Final = _envelope(
    ErrorCode.WORKER_NOT_READY, "too many connections to this worker; retry later", RETRY_AFTER_MS_BUSY
)
#: The 400 for a request that is not HTTP (a bad request line, a Content-Length that is not a
#: number, a head past h11's 16 KiB).
_BAD_REQUEST_BODY: Final = _envelope(ErrorCode.INVALID_PARAMS, "invalid HTTP request", None)


#: The slowest average rate (bytes/s) a request body may come at once its first ``header_timeout``
#: seconds are over (a 256 KiB body then has 16 s more; a link slower than this is not served).
_MIN_BODY_RATE: Final = 16 * 1024


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a new connection's first request: a client that
    connects and sends nothing (or not a whole request head) is closed after ``header_timeout``,
    so half-open connections cannot pin file descriptors (#17.7). The connection limit
    (``limit_concurrency``) is checked here too, with uvicorn's rule, so that its 503 is the
    API's error envelope."""

    header_timeout: float = 10.0

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._limit: int | None = self.limit_concurrency
        self.limit_concurrency = None  # uvicorn's own check would answer text/plain
        self.app = self._gate(self.app)

    def _gate(self, app: Any) -> Any:
        async def gate(scope: Any, receive: Any, send: Any) -> None:
            # uvicorn's rule: this connection counts among the connections; this request's task
            # is already among the tasks (uvicorn checks before creating it).
            limit = self._limit
            if limit is not None and (len(self.connections) >= limit or len(self.tasks) - 1 >= limit):
                log.warning("Exceeded concurrency limit.")
                await send(
                    {
                        "type": "http.response.start",
                        "status": 503,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(_BUSY_BODY)).encode()),
                            (b"retry-after", str(max(1, -(-RETRY_AFTER_MS_BUSY // 1000))).encode()),
                            (b"connection", b"close"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": _BUSY_BODY, "more_body": False})
                return
            await app(scope, receive, send)

        return gate

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse, in the API's error envelope; as
        uvicorn's, it closes the connection (nothing after a broken request can be trusted)."""
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(_BAD_REQUEST_BODY)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=_BAD_REQUEST_BODY),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)
        self._watched: object = None
        self._body_bytes = 0
        self._body_timer: asyncio.TimerHandle = self.loop.call_later(0, lambda: None)

    def _header_deadline(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._body_bytes += len(data)
        cycle = self.cycle
        if cycle is not None and cycle is not self._watched and self.conn.their_state is h11.SEND_BODY:
            # A request whose body is still coming: it gets the head's time limit, then must keep
            # up an average of _MIN_BODY_RATE (see _watch_body).
            self._watched = cycle
            self._body_bytes = 0
            self._body_timer.cancel()
            self._body_timer = self.loop.call_later(1.0, self._watch_body, cycle, self.loop.time())

    def _watch_body(self, cycle: object, started: float) -> None:
        """A request body trickled in (a byte a second of a large Content-Length) held its
        connection for ever: the body middleware waits for all of it before anything answers,
        and after an early answer (a 401 without the token) uvicorn reads the rest to throw it
        away, each byte restarting its keep-alive timer. Enough such clients, without the token,
        kept the worker at its connection limit: 503 to everyone, /health included. So a body
        gets ``header_timeout`` seconds, then must have come at _MIN_BODY_RATE on average since
        its request began, or the connection is closed."""
        if (
            self.cycle is not cycle
            or self.transport.is_closing()
            or self.conn.their_state is not h11.SEND_BODY
        ):
            return  # the body is complete (or a later request runs): nothing to watch
        elapsed = self.loop.time() - started
        if self._body_bytes < _MIN_BODY_RATE * (elapsed - self.header_timeout):
            # Debug only: one line per such connection would be a way to flood the log.
            log.debug("closed a connection whose request body came too slowly")
            self.transport.close()
            return
        self._body_timer = self.loop.call_later(1.0, self._watch_body, cycle, started)

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_timer.cancel()
        self._body_timer.cancel()
        super().connection_lost(exc)


def _protocol(header_timeout: float) -> type[GuardedH11Protocol]:
    return type("GuardedH11", (GuardedH11Protocol,), {"header_timeout": header_timeout})


def _uvicorn_config(app: FastAPI, opts: ServeOptions, **extra: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_config=None,  # keep the process's logging setup; uvicorn never logs headers
        access_log=opts.access_log,
        lifespan="on",
        # The drain (DrainingServer) has let streams finish already; this bounds what is left.
        timeout_graceful_shutdown=5,
        server_header=False,
        http=_protocol(opts.header_timeout),
        limit_concurrency=opts.max_connections,
        timeout_keep_alive=max(1, int(opts.header_timeout)),
        h11_max_incomplete_event_size=16 * 1024,
        **extra,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn with the contract's drain on SIGTERM and SIGINT (WORKER-4960s).

    The first signal drains: the worker goes Draining (visible in /health and /worker/ready; new
    work gets 503 with retry_after_ms) while the listener stays open; in-flight streams get the
    drain timeout to end with ``end``, after which they end with an ``error`` event. Then uvicorn
    shuts down, the app's shutdown zeroes and frees every shard, and ``serve`` returns (exit 0).
    A second signal stops at once. The signal is not re-raised afterwards (uvicorn's default),
    which would make a SIGTERM drain exit with -15 instead of 0."""

    def __init__(
        self, config: uvicorn.Config, built: Built, stop_pending: Callable[[], bool] | None = None
    ) -> None:
        super().__init__(config)
        self._built = built
        # A signal (main thread) and an incident (any thread) may both start the drain: one does.
        self._drain_lock = threading.Lock()
        self._draining = False
        self._stop_pending = stop_pending
        #: ``--exit-on-stop`` took the worker's Stopped as the reason to exit (serve's status 3).
        self.exiting_stopped = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_in_background(f"signal {signal.Signals(sig).name}") is None:
            self.should_exit = True
            if sig == signal.SIGINT:
                self.force_exit = True

    def exit_on_stop(self, incident: Incident) -> None:
        """``--exit-on-stop``: the worker is Stopped; shut down as a drain does (the jobs the
        incident ended get ``drain_timeout`` to send their ``error`` events; then uvicorn stops and
        the shards are zeroed and freed) and have ``serve`` return EXIT_STOPPED. Once, however
        many failures arrive together; a drain already under way (a SIGTERM) just ends the same
        way. Never waits: it may run on a request's thread, the scheduler's or the scrubber's."""
        with self._drain_lock:
            if self.exiting_stopped:
                return
            self.exiting_stopped = True
        log.error(
            "worker Stopped by security incident %s (%s); --exit-on-stop: shutting down, then "
            "exiting with status %d",
            incident.id,
            incident.error_type,
            EXIT_STOPPED,
        )
        self.drain_in_background(f"stopped: security incident {incident.id}")

    def drain_in_background(self, reason: str) -> threading.Thread | None:
        """Start the drain on a thread of its own; None if one was started already."""
        with self._drain_lock:
            if self._draining:
                return None
            self._draining = True
        self._built.worker.begin_drain(reason)
        log.info("draining: %s", reason, extra={"human": f"Draining ({reason}): no new work, finishing jobs"})

        def run() -> None:
            try:
                self._built.worker.drain()
            finally:
                self.should_exit = True

        t = threading.Thread(target=run, name="vram-drain", daemon=True)
        t.start()
        return t

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._stop_pending is not None and self._stop_pending():
            # A SIGTERM came after the worker was built and before uvicorn took the signal over
            # (serve's caller remembered it): drain now, as if it had come just now.
            self.handle_exit(signal.SIGTERM, None)
            return
        cb = self._built.callbacks
        if self.started and cb is not None:
            w = self._built.worker
            if w.models():
                cb.ready([handle(w, m) for m in w.models()], _url(self._built.options))


def _url(opts: ServeOptions) -> str:
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    return f"http://{host}:{opts.port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is printed: a busy port is an error up front
    (#17.19), not after the banner."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    built: Built, sock: socket.socket | None = None, *, stop_pending: Callable[[], bool] | None = None
) -> int:
    """Run uvicorn in the foreground until SIGINT/SIGTERM (a drain); the worker is closed on the
    way out. Returns the exit status: 0 after a clean shutdown, 1 when the shutdown failed, and
    with ``exit_on_stop`` EXIT_STOPPED once the worker entered Stopped (never 0 then).
    ``stop_pending``: whether a SIGTERM came before uvicorn handled signals (then it drains at
    once)."""
    server = DrainingServer(_uvicorn_config(built.app, built.options), built, stop_pending)
    w = built.worker
    if built.options.exit_on_stop:
        built.on_stopped = server.exit_on_stop
        # An incident between build() and here (a scrub pass) found no hook: act on it now.
        if w.lifecycle.incidents:
            server.exit_on_stop(w.lifecycle.incidents[0])

    def committed(model: CommittedModel) -> None:
        if built.callbacks is not None and server.started:
            built.callbacks.ready([handle(w, m) for m in w.models()], _url(built.options))

    w.on_committed = committed
    status = 0
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        try:
            w.close()  # idempotent: the app's shutdown normally did it already
        except BaseException as exc:
            built.shutdown_error = built.shutdown_error or exc
        if built.shutdown_error is not None:
            log.error("shutdown failed: %s", built.shutdown_error)
            status = 1
        if built.options.exit_on_stop and w.lifecycle.incidents:
            # Stopped wins over a failed shutdown (logged above): either way a restart is due,
            # and the supervisor should see why. Also when a SIGTERM drain raced the incident.
            status = EXIT_STOPPED
        if built.callbacks is not None and built.callbacks.failure_sent:
            # The failure callback went out at the incident, on a thread of its own: give it
            # the drain timeout to be delivered before the process exits.
            built.callbacks.join(built.options.drain_timeout)
        if built.callbacks is not None and not built.callbacks.failure_sent:
            incidents = w.lifecycle.incidents
            failed = bool(incidents) or status != 0
            reason = (
                f"security incident {incidents[-1].id}: {incidents[-1].error_type}"
                if incidents
                else ("shutdown failed" if status else "shutdown")
            )
            built.callbacks.stopped(w.lifecycle.state.value, reason, failed=failed)
    return status


class ServerThread:
    """uvicorn serving ``app`` from a thread, on a loopback socket bound before it starts."""

    def __init__(
        self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, access_log: bool = False
    ) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        opts = replace(ServeOptions(), host=self.host, port=self.port, access_log=access_log)
        self.server = uvicorn.Server(_uvicorn_config(app, opts))
        self._thread = threading.Thread(target=self._run, name="uvicorn", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as exc:  # reported by start()/stop()
            self._error = exc

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout * 100)):
            if self.server.started or not self._thread.is_alive():
                break
            deadline.wait(0.01)
        if not self.server.started:
            self.stop()
            raise RuntimeError(f"uvicorn did not start: {self._error!r}")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def describe_token(built: Built) -> str:
    """Where the token is, never what it is."""
    src = built.token_source
    how = {
        TokenOrigin.ARGUMENT: "from --token-file",
        TokenOrigin.ENVIRONMENT: "from $WORKER_API_TOKEN_FILE",
        TokenOrigin.CREDENTIALS: "from systemd credentials ($CREDENTIALS_DIRECTORY)",
        TokenOrigin.STATE_DIR: "created now, mode 0600" if built.token_created else "existing, mode 0600",
    }[src.origin]
    return f"{src.path} ({how}; fingerprint {built.token_fingerprint})"
