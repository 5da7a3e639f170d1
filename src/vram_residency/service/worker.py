"""The worker: its committed models, and the pieces that act on them.

* commit (``commit.py`` for what a model is and what digest it must have): seal, verify, build
  the executor; a failed first commit returns the worker to Starting, a retry can leave it;
  committed models keep serving while another one loads;
* the scheduler (``scheduler.py``): queue, batching, cancel, drain; this module's ``_run_batch``
  verifies every shard before each batch runs;
* the scrubber (``scrubber.py``); the status as the API shows it (``status.py``).

Failure
    A seal failure (before an execution, in the scrubber, or on ``/worker/verify``) moves the
    lifecycle to Stopped and raises a security incident; the manager has already written the
    critical ``SealVerificationFailed`` audit event. Every running job then ends at its next token
    with an error (no token produced after the detection reaches a client), and a Stopped worker
    refuses every later job.

Errors
    Everything here raises domain errors (``service.errors``, ``service.lifecycle``, the
    library's); ``service.api.errors`` alone maps them to HTTP.

Locks
    ``_commit_lock`` serializes commits and deallocations; ``_exec_lock`` is held by the
    execution thread for one batch, and by commit/deallocate only while they change the set of
    models or close an executor's views (never while a model streams in). Order: ``_commit_lock``
    before ``_exec_lock``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from vram_residency._core import CHECKS, DEFAULT_MAX_TENSORS, Check
from vram_residency.audit.errors import AuditWriteFailed
from vram_residency.audit.log import AuditLog
from vram_residency.backends.base import ALIGNMENT
from vram_residency.errors import (
    ConfigError,
    CudaAllocationFailed,
    InvalidInput,
    NotSealed,
    SealVerificationFailed,
    VramError,
)
from vram_residency.formats.tree import SHA256_TREE_V1, check_algorithm
from vram_residency.manager import BackendName, VramManager
from vram_residency.scrub import DEFAULT_FULL_EVERY_S
from vram_residency.service.catalog import ModelCatalog
from vram_residency.service.commit import (
    DigestCheck,
    Sha256Observer,
    bytes_to_file,
    files_for_path,
    parse_expected_digest,
    verify_signature,
)
from vram_residency.service.context import CorrelatedAuditLog, reset_correlation_id, set_correlation_id
from vram_residency.service.errors import (
    JobTimedOut,
    ModelAlreadyCommitted,
    ModelLoadFailed,
    ModelNotCommitted,
    ModelNotExecutable,
    ResourcesExhausted,
    WorkerBusy,
    out_of_descriptors,
)
from vram_residency.service.executor import (
    DeviceMemory,
    Executor,
    ExecutorFactory,
    ModelFiles,
    SealedWeights,
    StreamingExecutor,
    Token,
    TokenSink,
)
from vram_residency.service.executors.encoder import cupy_available
from vram_residency.service.lifecycle import (
    Incident,
    WorkerLifecycle,
    WorkerNotReady,
    WorkerState,
    WorkerStopped,
)
from vram_residency.service.metrics import Metrics
from vram_residency.service.scheduler import ExecuteJob, Scheduler
from vram_residency.service.scrubber import Scrubber, scrub_delay
from vram_residency.shard import SealedShard

__all__ = [
    "CommitSpec",
    "CommittedModel",
    "ExecuteJob",
    "VerifyPass",
    "Worker",
    "WorkerConfig",
    "default_factories",
    "scrub_delay",
]

log = logging.getLogger("vram_residency.service")

_SIDE_FILE_LIMIT: Final = 64 << 20
#: The contract's defaults (WORKER-4240s): a prompt of at most 100,000 characters, at most 4,096
#: tokens generated per request.
DEFAULT_MAX_PROMPT_CHARS: Final = 100_000
DEFAULT_MAX_TOKENS_LIMIT: Final = 4096
#: llama-orch's MAX_MODEL_SIZE default: 100 GB.
DEFAULT_MAX_MODEL_BYTES: Final = 100 * 10**9


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
    #: Seconds in-flight jobs get to finish when the worker drains (then they end with an error).
    drain_timeout: float = 30.0
    pool_id: str | None = None
    #: Models committed at once. The contract says one model per process; more only when asked.
    max_models: int = 1
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_tokens: int = DEFAULT_MAX_TOKENS_LIMIT
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    #: A job running longer than this ends with an error (0: no limit).
    execution_timeout: float = 0.0
    #: Where model bytes sent in a commit request are spooled (a private directory).
    spool_dir: Path | None = None
    commit_keys: tuple[Any, ...] = field(default=(), repr=False)
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
    #: Refuse an execute whose params name something other than max_tokens, temperature and seed
    #: (400 INVALID_PARAMS, by name). Off by default: the contract's params are open ("etc."),
    #: so other names are accepted, not used, and named in the started event.
    strict_params: bool = False
    #: The most tensors one model file's header may list (``VramManager(max_tensors=...)``): a
    #: commit of a file listing more is refused before any device memory is touched.
    max_tensors: int = DEFAULT_MAX_TENSORS

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
        if self.drain_timeout < 0:
            raise ConfigError("drain_timeout must be >= 0")
        if self.max_models < 1:
            raise ConfigError("max_models must be at least 1")
        if self.max_prompt_chars < 1 or self.max_tokens < 1 or self.max_model_bytes < 1:
            raise ConfigError("max_prompt_chars, max_tokens and max_model_bytes must be at least 1")
        if self.execution_timeout < 0:
            raise ConfigError("execution_timeout must be >= 0 (0: no limit)")
        if not self.max_seal_age >= 0:
            raise ConfigError("max_seal_age must be >= 0 (0: no limit)")
        if self.seal_age_policy not in ("reverify", "refuse"):
            raise ConfigError("seal_age_policy must be 'reverify' or 'refuse'")
        if not isinstance(self.strict_params, bool):
            raise ConfigError("strict_params must be true or false")
        tensors = self.max_tensors
        if isinstance(tensors, bool) or not isinstance(tensors, int) or tensors < 1:
            raise ConfigError(f"max_tensors must be at least 1, not {self.max_tensors!r}")


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
    #: The id clients name it by: the commit's ``shard_id`` (caller-chosen), else the seal's.
    handle_id: str = ""
    shard_index: int = 0
    total_shards: int = 1
    #: SHA-256 of the model bytes, when the commit asked for it (computed as they streamed).
    sha256: str | None = None
    last_verified_ns: int = 0


@dataclass(frozen=True, slots=True)
class CommitSpec:
    """What to commit. Exactly one of ``name`` (in the catalog), ``path`` (a file inside the
    catalog's roots) or ``data`` (the bytes)."""

    name: str
    path: Path | None = None
    data: bytes | None = None
    expected_digest: str | None = None
    signature: str | None = None
    handle_id: str | None = None
    shard_index: int = 0
    correlation_id: str = ""


@dataclass(frozen=True, slots=True)
class VerifyPass:
    shards: int
    bytes: int
    seconds: float
    trigger: str


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


def _sniff_suffix(data: bytes) -> str:
    if data[:4] == b"GGUF":
        return ".gguf"
    if len(data) > 9 and data[8:9] == b"{":
        return ".safetensors"
    return ".bin"


class Worker:
    """One worker process's models, lifecycle, audit trail, scheduler and scrubber."""

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
                self._audit = CorrelatedAuditLog(audit_path, worker_id=config.worker_id, token=token)
            self.lifecycle = WorkerLifecycle(self._audit, config.worker_id, on_incident=self._on_incident)
            self._manager = VramManager(
                token,
                config.device,
                backend=config.backend,
                worker_id=config.worker_id,
                capacity_bytes=config.capacity_bytes,
                audit=self._audit,
                fast_check=config.fast_check,
                max_tensors=config.max_tensors,
            )
        except BaseException:
            self._close_audit()
            raise
        # Kept as plain facts: /health must answer after the manager is closed, too.
        self._backend_name = self._manager.backend
        self._backend_description = self._manager.backend_description
        self._emulated = self._manager.capabilities.emulated
        self._models: dict[str, CommittedModel] = {}
        self._loading: list[str] = []
        self._commit_lock = threading.Lock()
        self._exec_lock = threading.Lock()
        self._closing = False
        self._closed = False
        self._last_scrub: VerifyPass | None = None
        self._last_verify_seconds = 0.0
        #: Called after each successful commit (the server sends the pool manager's callback).
        self.on_committed: Callable[[CommittedModel], object] | None = None
        self._emit(
            "ServiceStarted",
            backend=self.backend,
            backend_description=self.backend_description,
            pre_verify=config.pre_verify,
            scrub_interval_s=config.scrub_interval,
            scrub_budget=config.scrub_budget,
            pool_id=config.pool_id,
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
        self.scheduler = Scheduler(
            self._run_batch, max_batch=config.max_batch, last_verify_seconds=lambda: self._last_verify_seconds
        )
        self._scrubber: Scrubber | None = None
        if config.scrub_interval > 0:
            self._scrubber = Scrubber(self.scrub_once, config.scrub_interval, config.scrub_budget)
        #: An audit head mismatch found when the log was opened (records removed, or the head file
        #: replaced or unsigned): an incident the worker survives (see ``_report_head_mismatch``).
        self.audit_head_incident: Incident | None = None
        if self._audit is not None and self._audit.head_mismatch is not None:
            self._report_head_mismatch(self._audit)

    # -- facts ----------------------------------------------------------------------------------
    @property
    def manager(self) -> VramManager:
        if self._manager is None:
            raise WorkerStopped("worker is closed")
        return self._manager

    @property
    def audit(self) -> AuditLog | None:
        return self._audit

    # -- moving shards (main's service/migrate_routes.py) ------------------------------------------
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The commit and execution locks, without waiting behind a running execute: WorkerBusy
        (retriable) instead, so that a move never queues behind inference."""
        with self._commit_lock:
            if not self._exec_lock.acquire(blocking=False):
                raise WorkerBusy("shard in use by a running execute; retry")
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

    @property
    def loading(self) -> list[str]:
        return list(self._loading)

    def models(self) -> list[CommittedModel]:
        return list(self._models.values())

    # -- tensor parallelism (service/tp.py's TPWorker overrides these) ------------------------------
    @property
    def tp_degree(self) -> int:
        """Ranks this worker's model is split over: 1, one process on one device."""
        return 1

    def tp_devices(self) -> list[int]:
        """The device of each rank, in rank order."""
        return [self.config.device]

    def group_id(self) -> str | None:
        """The tensor-parallel group's id (/worker/ready's ``nccl_group_id``); None without one."""
        return None

    def rank_handles(self, m: CommittedModel) -> list[dict[str, Any]] | None:
        """Every rank's handles of ``m`` in a tensor-parallel group; None: the one local handle."""
        return None

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
            self._audit.emit(event, **{k: v for k, v in fields.items() if v is not None})

    def _on_incident(self, incident: Incident) -> None:
        self.metrics.incidents.inc()
        # Stopped ends every running job at its next token (and every queued one before it runs).
        self.scheduler.abort_all(
            WorkerStopped(
                f"worker stopped: {incident.error_type} (incident {incident.id})", reason="incident"
            ),
            running_only=True,
        )
        if self._user_on_incident is not None:
            self._user_on_incident(incident)

    def _report_head_mismatch(self, audit: AuditLog) -> None:
        """The log found its signed head not vouching for it, and has already written the
        critical AuditHeadMismatch and SecurityIncident records (it continues by design: refusing
        would keep the evidence out of the log and let anyone who can delete a file keep the
        worker down). The worker keeps serving too; the incident goes to the incident callback,
        the metrics and /health, so that someone looks at the log."""
        mm = audit.head_mismatch
        if mm is None:
            return
        incident = Incident(
            id=audit.head_mismatch_incident_id or "",
            worker_id=self.config.worker_id,
            time_ns=time.time_ns(),
            error_type=type(mm).__name__,
            message=str(mm),
            shard_id="",
            state_before=self.lifecycle.state,
            details=MappingProxyType(
                {"kind": mm.kind, "head_seq": mm.head_seq, "log_last_seq": mm.log_last_seq}
            ),
            stopped=False,
        )
        self.audit_head_incident = incident
        self.metrics.incidents.inc()
        if self._user_on_incident is not None:
            try:
                self._user_on_incident(incident)
            except Exception:
                # As for any incident: logged, and never a reason to fail the start.
                log.exception("on_incident callback failed for incident %s", incident.id)

    # -- plan -----------------------------------------------------------------------------------
    def plan(self, model: str | None, vram_bytes: int | None) -> dict[str, Any]:
        """The project's own plan: VRAM needed for a model (or a size) against VRAM available."""
        if (model is None) == (vram_bytes is None):
            raise InvalidInput("give exactly one of model or vram_bytes")
        if model is not None:
            files = self.catalog.resolve(model)
            size = files.weights.stat().st_size
        else:
            assert vram_bytes is not None
            size = vram_bytes
        free, total = self.manager.available_vram(), self.manager.total_vram()
        needed = self.needed_bytes(size)
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

    @staticmethod
    def needed_bytes(size: int) -> int:
        # Allocations are rounded up to the backend's alignment; plan with what will be taken.
        return -(-size // ALIGNMENT) * ALIGNMENT if size else 0

    def capability(self, files: ModelFiles) -> tuple[bool, str]:
        """Can this worker execute the model (the spec's capability check: architecture, format,
        an executor present)? Reads only the model's config, never its weights."""
        import json

        if files.format != "safetensors":
            return False, f"no executor here runs {files.format} models (sealing alone would work)"
        if files.config is None:
            return False, "the model has no config.json: its architecture is unknown"
        try:
            cfg = json.loads(files.config.read_text(encoding="utf-8"))
            model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
        except (OSError, ValueError):
            return False, "config.json cannot be read"
        from vram_residency.service.executors.decoder import MODEL_TYPE, ByteLMConfig

        if model_type == MODEL_TYPE:
            c = ByteLMConfig.from_file(files.config)
            return True, f"byte-level decoder, context {c.max_position} tokens, float32"
        if model_type == "bert" and files.tokenizer is not None:
            return True, "BERT sentence encoder (embeddings), float32"
        return False, f"architecture {model_type!r} has no executor on this worker"

    # -- commit ---------------------------------------------------------------------------------
    def commit(self, name: str, expected_digest: str | None = None) -> CommittedModel:
        """Seal the model ``name`` from the catalog, verify it, build its executor."""
        return self.commit_spec(CommitSpec(name=name, expected_digest=expected_digest))

    def commit_spec(self, spec: CommitSpec) -> CommittedModel:
        """Commit a model given by name, path or bytes (see ``commit.py`` for the digest forms)."""
        check = parse_expected_digest(spec.expected_digest)
        if spec.signature is not None:
            # WORKER-4222: verified before anything is read or allocated.
            verify_signature(spec.signature, check, self.config.commit_keys)
        handle_id = spec.handle_id or None
        with self._commit_lock:
            if self._closing:
                raise WorkerNotReady("worker is draining and takes no new work", state="Draining")
            state = self.lifecycle.state
            if state is WorkerState.STOPPED:
                self.lifecycle.ensure_can_work()  # raises WorkerStopped with the reason
            if state is WorkerState.DRAINING:
                raise WorkerNotReady("worker is draining and takes no new work", state=state.value)
            if spec.name in self._models or (handle_id is not None and self._by_handle(handle_id)):
                raise ModelAlreadyCommitted(
                    f"model {spec.name!r} (handle {handle_id or spec.name!r}) is already committed "
                    "(DELETE its shard to replace it)"
                )
            if len(self._models) >= self.config.max_models:
                raise ModelAlreadyCommitted(
                    f"this worker holds at most {self.config.max_models} model(s) "
                    f"({', '.join(self._models)} committed); DELETE a shard first, or start it with "
                    "--max-models"
                )
            # The first model: Starting -> Loading. Later ones load beside the committed models,
            # which keep serving (the worker stays Ready); /worker/ready lists what is loading.
            first = not self._models
            if first and state is WorkerState.STARTING:
                self.lifecycle.begin_loading(f"committing model {spec.name}")
            self._loading.append(spec.name)
            log.info(
                "loading %s",
                spec.name,
                extra={
                    "human": f"Loading model {spec.name}",
                    "model_ref": spec.name,
                    "worker_id": self.config.worker_id,
                    "gpu_device": self.config.device,
                    "correlation_id": spec.correlation_id,
                },
            )
            try:
                with contextlib.ExitStack() as stack:
                    if spec.data is not None:
                        if self.config.spool_dir is None:
                            raise InvalidInput("this worker takes model bytes by path only")
                        try:
                            path = stack.enter_context(
                                bytes_to_file(spec.data, self.config.spool_dir, _sniff_suffix(spec.data))
                            )
                        except OSError as exc:
                            if not out_of_descriptors(exc):
                                raise
                            # The spool file could not be opened: no descriptor free (a flood
                            # of connections). Retriable; a raw OSError would be a 500 "internal
                            # error" with a traceback in the log.
                            raise ResourcesExhausted(
                                f"cannot spool the model bytes now: {exc.strerror}; retry later"
                            ) from None
                        files = ModelFiles(
                            name=spec.name, weights=path, format=_format(path), root=path.parent
                        )
                    elif spec.path is not None:
                        files = files_for_path(spec.name, spec.path, self.catalog.path_roots())
                    else:
                        files = self.catalog.resolve(spec.name)
                    model = self._commit_files(files, check, spec)
            except BaseException as exc:
                log.warning(
                    "commit of %s failed: %s",
                    spec.name,
                    exc,
                    extra={
                        "human": f"Could not load {spec.name}: {type(exc).__name__}",
                        "model_ref": spec.name,
                        "worker_id": self.config.worker_id,
                        "correlation_id": spec.correlation_id,
                    },
                )
                if isinstance(exc, VramError):
                    self.lifecycle.report_failure(exc)  # only fatal errors stop the worker
                if first and not self._models:
                    # Back to Starting: a retry can leave it (a worker stuck in Loading cannot).
                    with contextlib.suppress(VramError):
                        self.lifecycle.abort_loading(f"commit of {spec.name} failed")
                raise
            finally:
                self._loading.remove(spec.name)
            with self._exec_lock:
                self._models[model.name] = model
            if self.lifecycle.state is WorkerState.LOADING:
                self.lifecycle.mark_ready(True, f"{len(self._models)} model(s) sealed and verified")
        if self.on_committed is not None:
            try:
                self.on_committed(model)
            except Exception:
                log.exception("commit callback failed")
        log.info(
            "committed %s as %s",
            model.name,
            model.handle_id,
            extra={
                "human": f"Sealed {model.name} ({model.shard.vram_bytes} bytes) in device memory, verified",
                "model_ref": model.name,
                "worker_id": self.config.worker_id,
                "gpu_device": self.config.device,
                "correlation_id": spec.correlation_id,
            },
        )
        return model

    def _stop_load_when_draining(self, _copied: int) -> None:
        """Called as each chunk of a commit is copied: a drain (SIGTERM) stops the load there,
        with nothing left allocated (WORKER-4960s: no new work). Loading on would hold the exit
        for as long as the model takes to load (minutes for a large one) for a model the worker
        frees at once, past uvicorn's graceful timeout, which drops the commit's answer."""
        if self._closing:
            raise WorkerNotReady(
                "worker is draining and takes no new work: the commit was stopped", state="Draining"
            )

    def _commit_files(self, files: ModelFiles, check: DigestCheck, spec: CommitSpec) -> CommittedModel:
        mgr = self.manager
        side: dict[str, str] = {}
        t0 = time.perf_counter()
        try:
            size = files.weights.stat().st_size
            if size > self.config.max_model_bytes:
                raise ModelLoadFailed(
                    f"model is {size} bytes, above this worker's limit of {self.config.max_model_bytes}"
                )
            for p in (files.config, files.tokenizer, files.sentence_config, files.pooling_config):
                if p is not None:
                    side[str(p.relative_to(files.root))] = _sha256_file(p)
            observer = Sha256Observer(check.sha256, size) if check.sha256 is not None else None
            algorithm = check.seal_algorithm or self.config.digest_algorithm
            # A generated model comes with the digest of what was generated: bytes changed on disk
            # after generation fail the seal instead of being sealed as the model.
            expected = check.seal_digest
            if expected is None and algorithm == self.config.digest_algorithm:
                expected = files.expected_digest
            shard = mgr.seal_file(
                files.weights,
                format=files.format,  # type: ignore[arg-type]  # one of "safetensors", "gguf", "raw"
                model_ref=files.name,
                shard_index=spec.shard_index,
                total_shards=1,
                expected_digest=expected,
                digest_algorithm=algorithm,
                observe=observer,
                progress=self._stop_load_when_draining,
            )
        except OSError as exc:
            if out_of_descriptors(exc):
                # A flood of connections holds every descriptor: retriable (503), not a model
                # that cannot be loaded (422, which a client would not retry).
                raise ResourcesExhausted(
                    f"cannot open the model files now: {exc.strerror}; retry later"
                ) from None
            raise ModelLoadFailed(f"cannot read model files: {exc.strerror}") from None
        except ModelLoadFailed:
            raise
        except InvalidInput as exc:
            # Unreadable file, corrupt header, or bytes that do not match expected_digest: the
            # model could not be loaded as asked, and nothing was left allocated.
            raise ModelLoadFailed(str(exc)) from None
        t1 = time.perf_counter()
        executor: Executor | None = None
        try:
            self.metrics.seals.labels(backend=mgr.backend).inc()
            self.metrics.sealed_bytes.inc(shard.vram_bytes)
            # Read back from device memory before anything uses it: the commit ends verified.
            self._verify_shards([shard], "commit")
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
                handle_id=spec.handle_id or shard.shard_id,
                shard_index=spec.shard_index,
                sha256=observer.hexdigest if observer is not None else None,
                last_verified_ns=time.time_ns(),
            )
            self._emit(
                "ModelCommitted",
                model=files.name,
                shard_id=shard.shard_id,
                handle_id=model.handle_id,
                digest=shard.digest,
                sha256=model.sha256,
                vram_bytes=shard.vram_bytes,
                file_format=files.format,
                side_files=side,
                executor=note,
                correlation_id=spec.correlation_id or None,
            )
        except BaseException:
            if executor is not None:
                executor.close()
            with contextlib.suppress(VramError):
                mgr.deallocate(shard)
            raise
        return model

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
            raise ModelLoadFailed(f"model {files.name!r}: {exc}") from None
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
    def _verify_shards(
        self, shards: Sequence[SealedShard], trigger: str, check: Check = "full"
    ) -> VerifyPass:
        """Verify ``shards``; raises SealVerificationFailed on the first failure. ``check="fast"``:
        the keyed fast digests, the seal's digest every ``full_every`` s."""
        mgr = self.manager
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
            except CudaAllocationFailed:
                self.metrics.cuda_errors.inc()
                raise
            self.metrics.verifications.labels(result="passed", trigger=trigger).inc()
            total += s.vram_bytes
        dt = time.perf_counter() - t0
        self.metrics.verify_seconds.labels(trigger=trigger).observe(dt)
        now = time.time_ns()
        verified = {s.shard_id for s in shards}
        for m in list(self._models.values()):
            if m.shard.shard_id in verified:
                m.last_verified_ns = now
        return VerifyPass(shards=len(shards), bytes=total, seconds=dt, trigger=trigger)

    def _verify_all(self, trigger: str, shard_id: str | None = None, check: Check = "full") -> VerifyPass:
        """Verify every shard (or one); raises SealVerificationFailed on the first failure."""
        shards = self.manager.shards()
        if shard_id is not None:
            shards = [s for s in shards if s.shard_id == shard_id]
            if not shards:
                raise NotSealed(f"shard {shard_id!r} is not sealed on this worker")
        return self._verify_shards(shards, trigger, check)

    def verify(self, shard_id: str | None = None) -> VerifyPass:
        """``/worker/verify``: verify now; a failure stops the worker with an incident."""
        self.lifecycle.ensure_can_work()
        try:
            return self._verify_all("api", shard_id)
        except VramError as exc:
            self.lifecycle.report_failure(exc)
            raise

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

    # -- execution ------------------------------------------------------------------------------
    def _by_handle(self, handle_id: str) -> CommittedModel | None:
        for m in self._models.values():
            if handle_id in (m.handle_id, m.shard.shard_id):
                return m
        return None

    def model_for(self, name: str | None = None, handle_id: str | None = None) -> CommittedModel:
        """The model a job names: by handle id (the contract), by name (an addition), or, with
        neither, the first model committed (the startup model of a bare ``serve``)."""
        if handle_id is not None:
            m = self._by_handle(handle_id) or self._models.get(handle_id)
            if m is None:
                raise ModelNotCommitted(f"no committed model has handle {handle_id!r}")
            if name is not None and m.name != name:
                raise InvalidInput(f"handle {handle_id!r} is model {m.name!r}, not {name!r}")
            return m
        if name is None:
            models = list(self._models.values())
            if not models:
                raise ModelNotCommitted("no model is committed on this worker (POST /worker/commit)")
            return models[0]
        model = self._models.get(name)
        if model is None:
            raise ModelNotCommitted(f"model {name!r} is not committed on this worker")
        return model

    def executor_for(self, model: CommittedModel) -> Executor:
        if model.executor is None:
            raise ModelNotExecutable(f"model {model.name!r} is not executable: {model.executor_note}")
        return model.executor

    def submit(self, job: ExecuteJob) -> None:
        self.lifecycle.ensure_can_work()
        if self._closing:
            raise WorkerNotReady("worker is draining and takes no new work", state="Draining")
        self.scheduler.submit(job)
        self.metrics.jobs_started.inc()

    def _sink(self, group: Sequence[ExecuteJob]) -> TokenSink:
        """Tokens of a streaming run, by job index, to the jobs of ``group``; False stops a job."""
        lifecycle = self.lifecycle
        timeout = self.config.execution_timeout

        def emit(index: int, tok: Token) -> bool:
            job = group[index]
            if lifecycle.stopped:
                # A seal failure was detected: this token (produced after it) never leaves.
                job.cancel(WorkerStopped("worker stopped while the job ran", reason="stopped"))
                return False
            if timeout and time.perf_counter() - job.queued_at > timeout:
                job.cancel(JobTimedOut(f"execution took longer than {timeout:g} s"))
                return False
            return job.token(tok)

        return emit

    def _run_batch(self, jobs: list[ExecuteJob]) -> None:
        for j in jobs:
            j.batch_size = len(jobs)
        self.metrics.batch_size.observe(len(jobs))
        pending = list(jobs)
        # The batch's audit records (its verification pass) and log lines carry the correlation
        # ids of every request in it.
        cid = set_correlation_id(",".join(sorted({j.correlation_id for j in jobs if j.correlation_id})))
        try:
            self._run_batch_locked(jobs, pending)
        finally:
            reset_correlation_id(cid)

    def _run_batch_locked(self, jobs: list[ExecuteJob], pending: list[ExecuteJob]) -> None:
        with self._exec_lock:
            try:
                # Every job of the batch was accepted by submit(): it runs even if a drain
                # began while it waited (begin_drain: queued jobs go on).
                with self.lifecycle.executing(accepted=True):
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
                            outputs = model.executor.run_streaming(inputs, self._sink(group))
                        else:
                            outputs = model.executor.run(inputs)
                        self.metrics.run_seconds.observe(time.perf_counter() - t_run)
                        for j, out in zip(group, outputs, strict=True):
                            pending.remove(j)
                            j.finish(out)
            except BaseException as exc:
                # executing() has already reported a fatal error (Stopped + incident).
                if not isinstance(exc, VramError):
                    log.exception("executor failed")
                for j in pending:
                    j.fail(exc)

    # -- release --------------------------------------------------------------------------------
    def deallocate(self, shard_id: str) -> SealedShard:
        with self._commit_lock, self._exec_lock:
            model = self._by_handle(shard_id)
            if model is None:
                raise NotSealed(f"shard {shard_id!r} is not sealed on this worker")
            if model.executor is not None:
                model.executor.close()
                model.executor = None
            del self._models[model.name]
            self.manager.deallocate(model.shard)
            log.info("deallocated %s (%s)", model.shard.shard_id, model.name)
            return model.shard

    def begin_drain(self, reason: str = "drain requested") -> None:
        """Take no new work from now on (Draining); running and queued jobs go on."""
        self._closing = True
        with contextlib.suppress(VramError):
            self.lifecycle.drain(reason)

    def drain(self, timeout: float | None = None) -> bool:
        """Drain: no new work; in-flight jobs get ``timeout`` seconds (default the config's) to
        end with ``end``; the rest then end with an error. True when all finished in time."""
        self.begin_drain("drain")
        t = self.config.drain_timeout if timeout is None else timeout
        if self.scheduler.wait_idle(t):
            return True
        n = self.scheduler.abort_all(
            WorkerStopped(f"drain timeout ({t:g} s) expired", reason="drain timeout")
        )
        log.warning("drain timeout expired: %d job(s) ended with an error", n)
        self.scheduler.wait_idle(5.0)
        return False

    def close(self) -> None:
        """Drain, stop the threads, zero and free every shard, stop the lifecycle, close the log."""
        if self._closed:
            return
        self.begin_drain("shutdown")
        self.scheduler.close(self.config.drain_timeout)
        if self._scrubber is not None:
            self._scrubber.stop(self.config.drain_timeout)
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
                stop_error: VramError | None = None
                try:
                    self.lifecycle.stop("shutdown")
                except VramError as exc:
                    stop_error = exc
                self._close_audit()
                # A shutdown whose last records did not reach the audit log failed (#17.8): the
                # trail is incomplete, and the exit status must say so.
                if stop_error is not None:
                    raise stop_error
                if self._audit is not None and self._audit.failed:
                    raise AuditWriteFailed("the audit log failed: records of this run were lost")
            if executor_errors:
                raise executor_errors[0]

    def _close_audit(self) -> None:
        if self._audit is not None:
            self._audit.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _format(path: Path) -> str:
    return {".safetensors": "safetensors", ".gguf": "gguf"}.get(path.suffix, "raw")


def default_factories() -> Iterable[ExecutorFactory]:
    from vram_residency.service.executors.decoder import byte_lm_factory
    from vram_residency.service.executors.encoder import bert_factory

    return (byte_lm_factory, bert_factory)
