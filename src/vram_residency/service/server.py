"""Putting a worker together from options, and running it under uvicorn.

``build(options)`` does everything that can fail before a socket is bound: it finds and checks
the token file (creating one only for the bare default), opens the audit log, the backend and the
worker, and commits the startup model. ``serve`` then runs uvicorn in the foreground;
``ServerThread`` runs it in a thread of this process on an ephemeral loopback port (tests and
benchmarks).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import uvicorn
from fastapi import FastAPI

from vram_residency.errors import ConfigError
from vram_residency.manager import BackendName
from vram_residency.service.api.app import DEFAULT_MAX_BODY_BYTES, create_app
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
from vram_residency.service.catalog import MINILM_MODEL, ModelCatalog, minilm_model_dir
from vram_residency.service.executors.example_model import EXAMPLE_NAMES, PRESETS, example_provider
from vram_residency.service.lifecycle import Incident
from vram_residency.service.metrics import Metrics
from vram_residency.service.worker import CommittedModel, Worker, WorkerConfig, default_factories

__all__ = ["DEFAULT_PORT", "Built", "ServeOptions", "ServerThread", "build", "serve"]

log = logging.getLogger("vram_residency.service")

DEFAULT_PORT: Final = 8321


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


def _resolve_token(opts: ServeOptions, state_dir: Path) -> tuple[TokenSource, bytes, bool]:
    source = find_token_file(opts.token_file, state_dir)
    if source.may_create and not (source.path.exists() or source.path.is_symlink()):
        return source, create_token_file(source.path), True
    return source, read_token_file(source.path), False


def build(opts: ServeOptions) -> Built:
    """Check the token, open the worker, commit the startup model, and make the app."""
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
    if startup is None and opts.model_dir is None:
        startup = example
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
    )
    provider = example_provider(state_dir / "example-models" / example, opts.example, config.digest_algorithm)
    catalog = ModelCatalog(opts.model_dir, builtin, {example: provider})
    worker = Worker(
        config,
        token,
        catalog,
        audit_path=audit_path,
        metrics=Metrics(),
        factories=tuple(default_factories()),
        on_incident=opts.on_incident,
    )
    try:
        model = worker.commit(startup) if startup is not None else None
        app = create_app(
            worker, BearerCheck(token), max_body_bytes=opts.max_body_bytes, metrics_auth=opts.metrics_auth
        )
    except BaseException:
        worker.close()
        raise
    return Built(
        options=opts,
        token_source=source,
        token_created=created,
        token_fingerprint=fingerprint(token),
        audit_path=audit_path,
        worker=worker,
        app=app,
        startup_model=model,
    )


def _uvicorn_config(app: FastAPI, opts: ServeOptions, **extra: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_config=None,  # keep the process's logging setup; uvicorn never logs headers
        access_log=opts.access_log,
        lifespan="on",
        timeout_graceful_shutdown=10,
        server_header=False,
        **extra,
    )


def serve(built: Built) -> None:
    """Run uvicorn in the foreground until SIGINT/SIGTERM; the worker is closed on the way out."""
    server = uvicorn.Server(_uvicorn_config(built.app, built.options))
    try:
        server.run()
    finally:
        built.worker.close()  # idempotent: the app's shutdown normally did it already


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
