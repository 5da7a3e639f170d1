"""The worker: sealed models, verification before every execution, the scrubber, the lifecycle.

Execution model
    Execute jobs go into one queue. A single execution thread takes every job waiting (up to
    ``max_batch``), verifies **every** shard of the worker, and then runs the batch on the sealed
    weights in place. Each job is therefore preceded by a full verification that started after
    the job was queued, with nothing between that verification and the use of the memory but the
    hand-over inside one thread. Batching is what makes this affordable: one pass over the
    weights is shared by all jobs that were waiting for it (as a database shares one fsync among
    the transactions of a group commit), instead of one pass per job.

Failure
    A seal failure (before an execution, in the scrubber, or on ``/worker/verify``) moves the
    lifecycle to Stopped and raises a security incident; the manager has already written the
    critical ``SealVerificationFailed`` audit event. A Stopped worker refuses every later job.

Locks
    ``_commit_lock`` serializes commits and deallocations; ``_exec_lock`` is held by the
    execution thread for one batch and by commit/deallocate while they change the set of models
    or close an executor's views. Order: ``_commit_lock`` before ``_exec_lock``.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from vram_residency._core import CHECKS, Check
from vram_residency.audit.errors import WorkerNotReady, WorkerStopped
from vram_residency.audit.lifecycle import Incident, WorkerLifecycle, WorkerState
from vram_residency.audit.log import AuditLog
from vram_residency.backends.base import ALIGNMENT
from vram_residency.errors import (
    ConfigError,
    InvalidInput,
    NotSealed,
    SealVerificationFailed,
    VramError,
)
from vram_residency.formats.tree import SHA256_TREE_V1, check_algorithm
from vram_residency.manager import BackendName, VramManager
from vram_residency.scrub import DEFAULT_FULL_EVERY_S
from vram_residency.service.bert import cupy_available
from vram_residency.service.catalog import ModelCatalog
from vram_residency.service.errors import ErrorCode, ServiceError
from vram_residency.service.executor import (
    DeviceMemory,
    Executor,
    ExecutorFactory,
    JobInput,
    JobOutput,
    ModelFiles,
    SealedWeights,
    StreamingExecutor,
    Token,
    TokenSink,
)
from vram_residency.service.metrics import Metrics
from vram_residency.shard import SealedShard

__all__ = ["CommittedModel", "ExecuteJob", "VerifyPass", "Worker", "WorkerConfig"]

log = logging.getLogger("vram_residency.service")

_MAX_QUEUE: Final = 4096
# Gathering a batch (see _take_batch), as multiples of the last verification pass's duration.
_GAP_FRACTION: Final = 0.1
_WINDOW_FRACTION: Final = 2.0
_MAX_GAP: Final = 0.02
_MAX_WINDOW: Final = 0.2
_SIDE_FILE_LIMIT: Final = 64 << 20


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    worker_id: str
    backend: BackendName = "auto"
    device: int = 0
    #: Host backend only: the emulated capacity (None: half of physical RAM).
    capacity_bytes: int | None = None
    digest_algorithm: str = SHA256_TREE_V1
    #: False ONLY for the verification-overhead benchmark: executions then run without the
    #: verification pass. It is shown in /health, /worker/ready, /metrics and the audit log.
    pre_verify: bool = True
    max_batch: int = 64
    #: Seconds between scrub passes (0 disables the scrubber).
    scrub_interval: float = 60.0
    #: Most of the wall time the scrubber may spend verifying (0 < budget <= 1).
    scrub_budget: float = 0.05
    drain_timeout: float = 30.0
    #: Seal age (#14): seconds after which a shard's last successful verification is too old
    #: for an execution (0: no limit). Only matters with pre_verify off: pre-verification makes
    #: every shard fresh before each batch anyway.
    max_seal_age: float = 0.0
    #: "reverify": verify the stale shards before the batch runs; "refuse": fail the batch with
    #: StaleSeal (503, retriable) until something verifies them (the scrubber, /worker/verify).
    seal_age_policy: Literal["reverify", "refuse"] = "reverify"
    #: Keep a keyed nh-fast-v1 digest of every shard at seal time (None: on for a real GPU, off
    #: for the host emulation); see ``VramManager(fast_check=...)``.
    fast_check: bool | None = None
    #: Which digest the scrubber compares: "fast" (the keyed fast digest; the seal's own digest
    #: every ``full_every`` seconds per shard) or "full" (the seal's digest every pass).
    scrub_check: Check = "fast"
    #: Which digest the check before each execution compares (same choices as scrub_check).
    pre_verify_check: Check = "full"
    #: Seconds a shard may go on fast checks alone before its seal's digest is re-checked.
    full_every: float = DEFAULT_FULL_EVERY_S

    def check(self) -> None:
        if not self.worker_id:
            raise ConfigError("worker_id must not be empty")
        check_algorithm(self.digest_algorithm, keyed=True)
        if self.scrub_check not in CHECKS or self.pre_verify_check not in CHECKS:
            raise ConfigError(f"scrub_check and pre_verify_check must be one of {CHECKS}")
        if self.fast_check is not None and not isinstance(self.fast_check, bool):
            raise ConfigError("fast_check must be true, false or unset")
        if not 0 <= self.full_every < float("inf"):
            raise ConfigError("full_every must be a finite number of seconds >= 0")
        if self.max_batch < 1:
            raise ConfigError("max_batch must be at least 1")
        if self.scrub_interval < 0:
            raise ConfigError("scrub_interval must be >= 0 (0 disables scrubbing)")
        if not 0 < self.scrub_budget <= 1:
            raise ConfigError("scrub_budget must be in (0, 1]")
        if not self.max_seal_age >= 0:
            raise ConfigError("max_seal_age must be >= 0 (0: no limit)")
        if self.seal_age_policy not in ("reverify", "refuse"):
            raise ConfigError("seal_age_policy must be 'reverify' or 'refuse'")


@dataclass(slots=True)
class CommittedModel:
    name: str
    files: ModelFiles
    shard: SealedShard
    executor: Executor | None
    executor_note: str  # the executor's description, or why there is none
    side_files: dict[str, str]  # file name -> SHA-256 of the side file read at commit
    seal_seconds: float
    verify_seconds: float


@dataclass(frozen=True, slots=True)
class VerifyPass:
    shards: int
    bytes: int
    seconds: float
    trigger: str


class ExecuteJob:
    """One queued execution. The worker calls ``on_verified`` once (a VerifyPass, or None when
    pre-verification is disabled, or an exception), then ``on_token`` for each token a generator
    produces, then ``on_done`` once (JobOutput or an exception) unless verification failed."""

    __slots__ = (
        "_verified",
        "batch_size",
        "input",
        "job_id",
        "model",
        "on_done",
        "on_token",
        "on_verified",
        "queued_at",
    )

    def __init__(
        self,
        job_id: str,
        model: str,
        job_input: JobInput,
        on_verified: Callable[[VerifyPass | BaseException | None], None],
        on_done: Callable[[JobOutput | BaseException], None],
        on_token: Callable[[Token], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.model = model
        self.input = job_input
        self.on_verified = on_verified
        self.on_done = on_done
        self.on_token = on_token
        self.queued_at = time.perf_counter()
        self.batch_size = 0
        self._verified = False

    def verified(self, info: VerifyPass | None) -> None:
        self._verified = True
        self.on_verified(info)

    def token(self, tok: Token) -> None:
        if self.on_token is None:
            return
        try:
            self.on_token(tok)
        except Exception:
            # One client's stream going away must not fail the batch the others share.
            log.debug("token callback of %s failed", self.job_id, exc_info=True)

    def fail(self, exc: BaseException) -> None:
        if self._verified:
            self.on_done(exc)
        else:
            self._verified = True
            self.on_verified(exc)


def _sink(group: Sequence[ExecuteJob]) -> TokenSink:
    """Tokens of a streaming run, by job index, to the jobs of ``group``."""

    def emit(index: int, tok: Token) -> None:
        group[index].token(tok)

    return emit


def scrub_delay(spent: float, interval: float, budget: float) -> float:
    """Rest after a scrub pass of ``spent`` seconds: at least ``interval``, and long enough that
    verification takes at most ``budget`` of wall time (spent / (spent + rest) <= budget)."""
    return max(interval, spent * (1.0 / budget - 1.0))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        remaining = _SIDE_FILE_LIMIT
        while chunk := f.read(1 << 20):
            remaining -= len(chunk)
            if remaining < 0:
                raise InvalidInput(f"{path.name} is larger than {_SIDE_FILE_LIMIT} bytes")
            h.update(chunk)
    return h.hexdigest()


class Worker:
    """One worker process's models, lifecycle, audit trail and execution thread."""

    def __init__(
        self,
        config: WorkerConfig,
        token: bytes,
        catalog: ModelCatalog,
        *,
        audit_path: Path | None,
        metrics: Metrics | None = None,
        factories: Sequence[ExecutorFactory] = (),
        on_incident: Callable[[Incident], object] | None = None,
    ) -> None:
        config.check()
        self.config = config
        self.catalog = catalog
        self.metrics = metrics or Metrics()
        self._factories = tuple(factories)
        self._user_on_incident = on_incident
        self._audit: AuditLog | None = None
        self._manager: VramManager | None = None
        try:
            if audit_path is not None:
                audit_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._audit = AuditLog(audit_path, worker_id=config.worker_id, token=token)
            self.lifecycle = WorkerLifecycle(self._audit, config.worker_id, on_incident=self._on_incident)
            self._manager = VramManager(
                token,
                config.device,
                backend=config.backend,
                worker_id=config.worker_id,
                capacity_bytes=config.capacity_bytes,
                audit=self._audit,
                fast_check=config.fast_check,
            )
        except BaseException:
            self._close_audit()
            raise
        # Kept as plain facts: /health must answer after the manager is closed, too.
        self._backend_name = self._manager.backend
        self._backend_description = self._manager.backend_description
        self._emulated = self._manager.capabilities.emulated
        self._models: dict[str, CommittedModel] = {}
        self._commit_lock = threading.Lock()
        self._exec_lock = threading.Lock()
        self._queue: collections.deque[ExecuteJob] = collections.deque()
        self._queue_cond = threading.Condition()
        self._closing = False
        self._closed = False
        self._stop_event = threading.Event()
        self._last_scrub: VerifyPass | None = None
        self._last_verify_seconds = 0.0
        self._last_batch_size = 1
        self._emit(
            "ServiceStarted",
            backend=self.backend,
            backend_description=self.backend_description,
            pre_verify=config.pre_verify,
            scrub_interval_s=config.scrub_interval,
            scrub_budget=config.scrub_budget,
        )
        if not config.pre_verify:
            log.warning(
                "BENCHMARK MODE: executions run WITHOUT verifying the seals first "
                "(--benchmark-skip-pre-verify); never serve real traffic like this"
            )
        m = self.metrics
        m.backend.info({"backend": self.backend, "emulated": str(self.emulated).lower()})
        m.pre_verify.set(1 if config.pre_verify else 0)
        m.bind(mem_info=self._mem_info, shards=self._shard_totals, state=lambda: self.lifecycle.state.value)
        self._exec_thread = threading.Thread(target=self._exec_loop, name="vram-execute", daemon=True)
        self._exec_thread.start()
        self._scrub_thread: threading.Thread | None = None
        if config.scrub_interval > 0:
            self._scrub_thread = threading.Thread(target=self._scrub_loop, name="vram-scrub", daemon=True)
            self._scrub_thread.start()

    # -- facts ----------------------------------------------------------------------------------
    @property
    def manager(self) -> VramManager:
        if self._manager is None:
            raise WorkerStopped("worker is closed")
        return self._manager

    @property
    def audit(self) -> AuditLog | None:
        return self._audit

    # -- moving shards (service/migrate_routes.py) ----------------------------------------------
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The commit and execution locks, without waiting behind a running execute: a 409
        (retriable) instead, so that a move never queues behind inference."""
        with self._commit_lock:
            if not self._exec_lock.acquire(blocking=False):
                busy = "shard in use by a running execute; retry"
                raise ServiceError(409, ErrorCode.WORKER_NOT_READY, busy, retriable=True)
            try:
                yield
            finally:
                self._exec_lock.release()

    def rebuild_executor(self, model: CommittedModel) -> None:
        """Build ``model``'s executor again on its (moved or restored, verified) shard. Hold
        :meth:`exclusive`."""
        model.executor, model.executor_note = self._build_executor(model.files, model.shard)

    def switch_manager(self, manager: VramManager) -> None:
        """Verify and execute on ``manager`` from now on (its shard migrated there). Hold
        :meth:`exclusive`."""
        self._manager = manager

    @property
    def backend(self) -> str:
        return self._backend_name

    @property
    def backend_description(self) -> str:
        return self._backend_description

    @property
    def emulated(self) -> bool:
        return self._emulated

    @property
    def state(self) -> WorkerState:
        return self.lifecycle.state

    @property
    def last_scrub(self) -> VerifyPass | None:
        return self._last_scrub

    def models(self) -> list[CommittedModel]:
        return list(self._models.values())

    def _mem_info(self) -> tuple[int, int]:
        mgr = self._manager
        if mgr is None or self._closed:
            return (0, 0)
        return mgr.available_vram(), mgr.total_vram()

    def _shard_totals(self) -> tuple[int, int]:
        mgr = self._manager
        if mgr is None or self._closed:
            return (0, 0)
        shards = mgr.shards()
        return len(shards), sum(s.vram_bytes for s in shards)

    def _emit(self, event: str, **fields: Any) -> None:
        if self._audit is not None:
            self._audit.emit(event, **fields)

    def _on_incident(self, incident: Incident) -> None:
        self.metrics.incidents.inc()
        if self._user_on_incident is not None:
            self._user_on_incident(incident)

    # -- plan -----------------------------------------------------------------------------------
    def plan(self, model: str | None, vram_bytes: int | None) -> dict[str, Any]:
        if (model is None) == (vram_bytes is None):
            raise InvalidInput("give exactly one of model or vram_bytes")
        if model is not None:
            files = self.catalog.resolve(model)
            size = files.weights.stat().st_size
        else:
            assert vram_bytes is not None
            size = vram_bytes
        free, total = self.manager.available_vram(), self.manager.total_vram()
        # Allocations are rounded up to the backend's alignment; plan with what will be taken.
        needed = -(-size // ALIGNMENT) * ALIGNMENT if size else 0
        return {
            "model": model,
            "model_bytes": size,
            "needed_bytes": needed,
            "available_bytes": free,
            "total_bytes": total,
            "fits": 0 < needed <= free and size <= self.manager.max_model_bytes,
            "backend": self.backend,
            "emulated": self.emulated,
        }

    # -- commit ---------------------------------------------------------------------------------
    def commit(self, name: str, expected_digest: str | None = None) -> CommittedModel:
        """Seal the model ``name`` from the model directory, verify it, build its executor."""
        files = self.catalog.resolve(name)
        with self._commit_lock:
            if self._closing:
                raise WorkerStopped("worker is shutting down")
            if self.lifecycle.stopped:
                self.lifecycle.ensure_can_work()  # raises WorkerStopped with the reason
            if name in self._models:
                raise ServiceError(
                    409,
                    ErrorCode.INVALID_PARAMS,
                    f"model {name!r} is already committed (DELETE its shard to replace it)",
                )
            with self._exec_lock:
                state = self.lifecycle.state
                if state is WorkerState.STOPPED:
                    self.lifecycle.ensure_can_work()  # raises WorkerStopped with the reason
                if state in (WorkerState.STARTING, WorkerState.READY):
                    self.lifecycle.begin_loading(f"committing model {name}")
                elif state is not WorkerState.LOADING:
                    raise WorkerNotReady(f"worker is {state.value}; cannot commit now", state=state.value)
                try:
                    model = self._commit_locked(files, expected_digest)
                except VramError as exc:
                    self.lifecycle.report_failure(exc)  # only fatal errors stop the worker
                    raise
                finally:
                    if self.lifecycle.state is WorkerState.LOADING and self._models:
                        self.lifecycle.mark_ready(True, f"{len(self._models)} model(s) sealed and verified")
        return model

    def _commit_locked(self, files: ModelFiles, expected_digest: str | None) -> CommittedModel:
        mgr = self.manager
        side: dict[str, str] = {}
        t0 = time.perf_counter()
        try:
            for p in (files.config, files.tokenizer, files.sentence_config, files.pooling_config):
                if p is not None:
                    side[str(p.relative_to(files.root))] = _sha256_file(p)
            # A generated model comes with the digest of what was generated: bytes changed on disk
            # after generation fail the seal instead of being sealed as the model.
            shard = self._seal_file(files, expected_digest or files.expected_digest)
        except OSError as exc:
            msg = f"cannot read model files: {exc.strerror}"
            raise ServiceError(422, ErrorCode.MODEL_LOAD_FAILED, msg) from None
        except InvalidInput as exc:
            # Unreadable file, corrupt header, or bytes that do not match expected_digest: the
            # model could not be loaded as asked, and nothing was left allocated.
            raise ServiceError(422, ErrorCode.MODEL_LOAD_FAILED, str(exc)) from None
        t1 = time.perf_counter()
        executor: Executor | None = None
        try:
            self.metrics.seals.labels(backend=mgr.backend).inc()
            self.metrics.sealed_bytes.inc(shard.vram_bytes)
            # Read back from device memory before anything uses it: the commit ends verified.
            self._verify_all("commit")
            t2 = time.perf_counter()
            executor, note = self._build_executor(files, shard)
            model = CommittedModel(
                name=files.name,
                files=files,
                shard=shard,
                executor=executor,
                executor_note=note,
                side_files=side,
                seal_seconds=t1 - t0,
                verify_seconds=t2 - t1,
            )
            self._emit(
                "ModelCommitted",
                model=files.name,
                shard_id=shard.shard_id,
                digest=shard.digest,
                vram_bytes=shard.vram_bytes,
                file_format=files.format,
                side_files=side,
                executor=note,
            )
        except BaseException:
            if executor is not None:
                executor.close()
            with contextlib.suppress(VramError):
                mgr.deallocate(shard)
            raise
        self._models[files.name] = model
        log.info("committed %s as %s (%d bytes): %s", files.name, shard.shard_id, shard.vram_bytes, note)
        return model

    def _seal_file(self, files: ModelFiles, expected_digest: str | None) -> SealedShard:
        # The streaming file sealer: bounded host memory, the whole file (header included) in one
        # shard, and tensor names recorded so that a failed verification names what changed.
        return self.manager.seal_file(
            files.weights,
            format=files.format,  # type: ignore[arg-type]  # one of "safetensors", "gguf", "raw"
            model_ref=files.name,
            expected_digest=expected_digest,
            digest_algorithm=self.config.digest_algorithm,
        )

    def _build_executor(self, files: ModelFiles, shard: SealedShard) -> tuple[Executor | None, str]:
        mgr = self.manager
        buf = mgr.device_buffer(shard)
        caps = mgr.capabilities
        memory = buf.host_view() if caps.host_view else None
        device: DeviceMemory | None = None
        ptr = buf.device_pointer if caps.device_pointer else 0
        if ptr:
            device = DeviceMemory(ptr=ptr, size=shard.vram_bytes, device=mgr.device, owner=buf)
        weights = SealedWeights(
            files=files, backend=mgr.backend, size=shard.vram_bytes, host_memory=memory, device_memory=device
        )
        try:
            for factory in self._factories:
                executor = factory(weights)
                if executor is not None:
                    return executor, executor.description
        except InvalidInput as exc:
            if memory is not None:
                memory.release()
            raise ServiceError(422, ErrorCode.MODEL_LOAD_FAILED, f"model {files.name!r}: {exc}") from None
        except BaseException:
            if memory is not None:
                memory.release()
            raise
        if memory is not None:
            memory.release()
        if device is not None and not cupy_available():
            return None, "sealed and verified; not executable here: the CUDA executor needs CuPy installed"
        return None, "sealed and verified; no built-in executor runs this model (not executable)"

    # -- verification ---------------------------------------------------------------------------
    def _verify_all(self, trigger: str, shard_id: str | None = None, check: Check = "full") -> VerifyPass:
        """Verify every shard (or one); raises SealVerificationFailed on the first failure.
        ``check="fast"``: the keyed fast digests, the seal's digest every ``full_every`` s."""
        mgr = self.manager
        shards = mgr.shards()
        if shard_id is not None:
            shards = [s for s in shards if s.shard_id == shard_id]
            if not shards:
                raise NotSealed(f"shard {shard_id!r} is not sealed on this worker")
        t0 = time.perf_counter()
        total = 0
        for s in shards:
            try:
                mgr.store.verify_many([s], check=check, full_every_s=self.config.full_every)
            except NotSealed:
                continue  # deallocated while a scrub pass ran; nothing left to check
            except SealVerificationFailed:
                self.metrics.verifications.labels(result="failed", trigger=trigger).inc()
                raise
            self.metrics.verifications.labels(result="passed", trigger=trigger).inc()
            total += s.vram_bytes
        dt = time.perf_counter() - t0
        self.metrics.verify_seconds.labels(trigger=trigger).observe(dt)
        return VerifyPass(shards=len(shards), bytes=total, seconds=dt, trigger=trigger)

    def verify(self, shard_id: str | None = None) -> VerifyPass:
        """``/worker/verify``: verify now; a failure stops the worker with an incident."""
        self.lifecycle.ensure_can_work()
        try:
            return self._verify_all("api", shard_id)
        except VramError as exc:
            self.lifecycle.report_failure(exc)
            raise

    # -- scrubber -------------------------------------------------------------------------------
    def scrub_once(self) -> VerifyPass | None:
        """One background pass over every shard. None when there is nothing to do."""
        if self.lifecycle.stopped or self._closing or not self.manager.shards():
            return None
        try:
            result = self._verify_all("scrub", check=self.config.scrub_check)
        except VramError as exc:
            self.lifecycle.report_failure(exc)
            raise
        self._last_scrub = result
        self.metrics.scrub_passes.inc()
        return result

    def _scrub_loop(self) -> None:
        interval, budget = self.config.scrub_interval, self.config.scrub_budget
        delay = interval
        while not self._stop_event.wait(delay):
            try:
                result = self.scrub_once()
            except VramError:
                return  # the worker is Stopped; the incident is raised and audited
            except Exception:
                log.exception("scrub pass failed unexpectedly")
                result = None
            delay = scrub_delay(result.seconds if result is not None else 0.0, interval, budget)

    # -- execution ------------------------------------------------------------------------------
    def model_for(self, name: str | None) -> CommittedModel:
        if name is None:
            models = list(self._models.values())
            if len(models) != 1:
                raise InvalidInput(f"name the model to run: {len(models)} models are committed")
            return models[0]
        model = self._models.get(name)
        if model is None:
            raise ServiceError(
                404, ErrorCode.INVALID_PARAMS, f"model {name!r} is not committed on this worker"
            )
        return model

    def submit(self, job: ExecuteJob) -> None:
        self.lifecycle.ensure_can_work()
        with self._queue_cond:
            if self._closing:
                raise WorkerStopped("worker is shutting down")
            if len(self._queue) >= _MAX_QUEUE:
                raise ServiceError(503, ErrorCode.WORKER_NOT_READY, "execution queue is full", retriable=True)
            self._queue.append(job)
            self._queue_cond.notify()

    def _take_batch(self) -> list[ExecuteJob]:
        cfg = self.config
        with self._queue_cond:
            while not self._queue and not self._closing:
                self._queue_cond.wait()
            # Let jobs that are arriving right now join this batch: a job that just misses it
            # pays for a whole verification pass of its own, and a loaded worker would otherwise
            # settle into several smaller batches per round of its clients, each verifying every
            # shard. The clients of the last batch are the ones expected back: wait for as many
            # jobs as that batch had, while they keep arriving less than a gap apart, within a
            # window. Gap and window scale with what a pass costs (V): V/10 and 2V (at most 20
            # and 200 ms). A lone client does not wait at all (its last batch had one job), and
            # with pre-verification off (V = 0) nothing waits.
            v = self._last_verify_seconds
            gap, window = min(_GAP_FRACTION * v, _MAX_GAP), min(_WINDOW_FRACTION * v, _MAX_WINDOW)
            expected = min(self._last_batch_size, cfg.max_batch)
            deadline = time.monotonic() + window
            seen = len(self._queue)
            while seen < expected and not self._closing and gap > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._queue_cond.wait(min(gap, remaining))
                if len(self._queue) == seen:
                    break  # a quiet gap: nobody else is coming right now
                seen = len(self._queue)
            n = min(len(self._queue), cfg.max_batch)
            self._last_batch_size = n
            return [self._queue.popleft() for _ in range(n)]

    def _exec_loop(self) -> None:
        while True:
            jobs = self._take_batch()
            if not jobs:
                return  # closing and the queue is empty
            try:
                self._run_batch(jobs)
            except BaseException as exc:  # never let the thread die with jobs waiting
                log.exception("execution batch failed")
                for j in jobs:
                    with contextlib.suppress(Exception):
                        j.fail(exc)

    def _run_batch(self, jobs: list[ExecuteJob]) -> None:
        for j in jobs:
            j.batch_size = len(jobs)
        self.metrics.batch_size.observe(len(jobs))
        pending = list(jobs)
        with self._exec_lock:
            try:
                with self.lifecycle.executing():
                    info = (
                        self._verify_all("execute", check=self.config.pre_verify_check)
                        if self.config.pre_verify
                        else None
                    )
                    if info is None and self.config.max_seal_age > 0:
                        self.manager.check_seal_age(
                            int(self.config.max_seal_age * 1e9), policy=self.config.seal_age_policy
                        )
                    if info is not None:
                        self._last_verify_seconds = info.seconds
                    for j in jobs:
                        j.verified(info)
                    by_model: dict[str, list[ExecuteJob]] = {}
                    for j in jobs:
                        by_model.setdefault(j.model, []).append(j)
                    for name, group in by_model.items():
                        model = self._models.get(name)
                        if model is None or model.executor is None:
                            for j in group:
                                j.fail(NotSealed(f"model {name!r} was removed before it ran"))
                                pending.remove(j)
                            continue
                        t_run = time.perf_counter()
                        inputs = [j.input for j in group]
                        if isinstance(model.executor, StreamingExecutor):
                            outputs = model.executor.run_streaming(inputs, _sink(group))
                        else:
                            outputs = model.executor.run(inputs)
                        self.metrics.run_seconds.observe(time.perf_counter() - t_run)
                        for j, out in zip(group, outputs, strict=True):
                            pending.remove(j)
                            j.on_done(out)
            except BaseException as exc:
                # executing() has already reported a fatal error (Stopped + incident).
                if not isinstance(exc, VramError):
                    log.exception("executor failed")
                for j in pending:
                    j.fail(exc)

    # -- release --------------------------------------------------------------------------------
    def deallocate(self, shard_id: str) -> SealedShard:
        with self._commit_lock, self._exec_lock:
            model = next((m for m in self._models.values() if m.shard.shard_id == shard_id), None)
            if model is None:
                raise NotSealed(f"shard {shard_id!r} is not sealed on this worker")
            if model.executor is not None:
                model.executor.close()
                model.executor = None
            del self._models[model.name]
            self.manager.deallocate(model.shard)
            log.info("deallocated %s (%s)", model.shard.shard_id, model.name)
            return model.shard

    def close(self) -> None:
        """Drain, stop the threads, zero and free every shard, stop the lifecycle, close the log."""
        if self._closed:
            return
        with self._queue_cond:
            self._closing = True
            self._queue_cond.notify_all()
        self._stop_event.set()
        with contextlib.suppress(VramError):
            self.lifecycle.drain("shutdown")
        self._exec_thread.join(self.config.drain_timeout)
        if self._scrub_thread is not None:
            self._scrub_thread.join(self.config.drain_timeout)
        with self._queue_cond:
            leftover = list(self._queue)
            self._queue.clear()
        for j in leftover:
            j.fail(WorkerStopped("worker shut down before the job ran"))
        with self._commit_lock, self._exec_lock:
            self._closed = True
            executor_errors: list[Exception] = []
            for model in self._models.values():
                if model.executor is not None:
                    # One executor failing to close must not keep the shards resident: free them
                    # all first, report afterwards.
                    try:
                        model.executor.close()
                    except Exception as exc:
                        executor_errors.append(exc)
                    model.executor = None
            self._models.clear()
            try:
                if self._manager is not None:
                    self._manager.close()
            finally:
                with contextlib.suppress(VramError):
                    self.lifecycle.stop("shutdown")
                self._close_audit()
            if executor_errors:
                raise executor_errors[0]

    def _close_audit(self) -> None:
        if self._audit is not None:
            self._audit.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        state = self.lifecycle.state
        incidents = self.lifecycle.incidents
        last = incidents[-1] if incidents else None
        models = self.models()
        mgr = self._manager
        last_verified = mgr.last_verified_ns() if mgr is not None and not self._closed else {}
        return {
            "ready": state in (WorkerState.READY, WorkerState.EXECUTING) and bool(models),
            "state": state.value,
            "worker_id": self.config.worker_id,
            "backend": self.backend,
            "backend_description": self.backend_description,
            "emulated": self.emulated,
            "pre_verify": self.config.pre_verify,
            "models": [
                {
                    "name": m.name,
                    "shard_id": m.shard.shard_id,
                    "vram_bytes": m.shard.vram_bytes,
                    "digest_algorithm": m.shard.digest_algorithm,
                    "digest": m.shard.digest,
                    "format": m.files.format,
                    "executable": m.executor is not None,
                    "kind": m.executor.kind if m.executor is not None else None,
                    "executor": m.executor_note,
                    "side_files_sha256": m.side_files,
                    "last_verified_ns": last_verified.get(m.shard.shard_id),
                }
                for m in models
            ],
            "seals": [m.shard.record() for m in models],
            "last_scrub": None
            if self._last_scrub is None
            else {"shards": self._last_scrub.shards, "seconds": self._last_scrub.seconds},
            "incident": None
            if last is None
            else {
                "id": last.id,
                "error_type": last.error_type,
                "message": last.message,
                "shard_id": last.shard_id,
                "time_ns": last.time_ns,
                "audit_record_id": last.audit_record_id,
            },
        }


def default_factories() -> Iterable[ExecutorFactory]:
    from vram_residency.service.bert import bert_factory
    from vram_residency.service.decoder import byte_lm_factory

    return (byte_lm_factory, bert_factory)
