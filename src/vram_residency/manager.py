"""``VramManager``: seal model bytes into device memory and verify them where they are."""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from typing_extensions import Buffer

from vram_residency.backends.base import Backend, Capabilities, DeviceBuffer, Segment
from vram_residency.errors import (
    AttestationMismatch,
    ConfigError,
    CudaAllocationFailed,
    InsufficientVram,
    IntegrityViolation,
    InvalidInput,
    NotSealed,
    PolicyViolation,
    SealVerificationFailed,
    StaleSeal,
    VramError,
)
from vram_residency.formats.attest import (
    AttestedShard,
    Statement,
    attest_key,
    attest_tag,
    check_nonce,
    probe_key,
    statement_to_json,
)
from vram_residency.formats.keys import SecretKey
from vram_residency.formats.seal import SealFields, seal_key, seal_message, verify_tag
from vram_residency.formats.tree import SHA256_TREE_V1, UNIT_SIZE, HashResult, check_algorithm
from vram_residency.shard import SealedShard

if TYPE_CHECKING:
    from vram_residency.sources.layout import FileFormat
    from vram_residency.sources.manifest import Manifest
    from vram_residency.sources.model import SealedModel
    from vram_residency.sources.repair import RepairReport

__all__ = ["AuditSink", "TensorSpan", "VramManager"]

log = logging.getLogger("vram_residency")

BackendName = Literal["auto", "cuda", "host"]
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_DEFAULT_MAX_MODEL_BYTES = 100 * 2**30


class AuditSink(Protocol):
    """What the manager needs of an audit log (``vram_residency.audit.AuditLog`` is one)."""

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class TensorSpan:
    """A named byte range of a shard (a tensor of a safetensors/GGUF file or a framework)."""

    name: str
    start: int
    end: int


@dataclass(slots=True)
class _Entry:
    shard: SealedShard
    buf: DeviceBuffer
    tag: bytes
    unit_digests: bytes
    tensors: tuple[TensorSpan, ...] = ()
    lock: threading.Lock = field(default_factory=threading.Lock)
    source: Any = None
    #: When the device memory last matched the seal (time.time_ns): set at seal and at every
    #: successful verify or attestation. The seal-age policy (``check_seal_age``) reads it.
    last_verified_ns: int = 0


def _open_backend(
    backend: str, device: int, capacity_bytes: int | None, allow_integrated: bool
) -> Backend:
    from vram_residency.backends.host import HostBackend

    if backend == "host":
        return HostBackend(device, capacity_bytes)
    if backend not in ("auto", "cuda"):
        raise ConfigError(f"backend must be 'auto', 'cuda' or 'host', not {backend!r}")
    try:
        from vram_residency.backends.cuda import open_backend as open_cuda
    except ImportError as exc:
        if backend == "cuda":
            raise ConfigError(f"backend='cuda' requested but the CUDA backend cannot load: {exc}") from None
        return HostBackend(device, capacity_bytes)
    try:
        return open_cuda(device, allow_integrated=allow_integrated)
    except ConfigError as exc:
        if backend == "cuda":
            raise
        log.info("no usable GPU (%s); using the host emulation backend", exc)
        return HostBackend(device, capacity_bytes)


def _merge_ranges(units: Sequence[int], n: int) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for u in units:
        start, end = u * UNIT_SIZE, min((u + 1) * UNIT_SIZE, n)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    if n == 0 and not ranges and units:
        ranges.append((0, 0))
    return ranges


def _check_opt_int(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InvalidInput(f"{name} must be a non-negative integer or None")


class VramManager:
    """Seals model shards into device memory and verifies them on the device.

    ``backend`` is ``"auto"`` (CUDA when a usable GPU is present, else the host emulation),
    ``"cuda"`` or ``"host"``; ``.backend`` says which is in use. The manager is a context manager;
    ``close()`` zeroes and frees every shard.
    """

    def __init__(
        self,
        worker_token: str | bytes,
        device: int = 0,
        *,
        backend: BackendName = "auto",
        worker_id: str = "",
        capacity_bytes: int | None = None,
        max_model_bytes: int = _DEFAULT_MAX_MODEL_BYTES,
        audit: AuditSink | None = None,
        allow_integrated: bool = False,
    ) -> None:
        # Derive the key first: a bad token must fail before any device is touched.
        self._key: SecretKey = seal_key(worker_token)
        self._attest_key: SecretKey = attest_key(worker_token)
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise ConfigError("device must be a non-negative integer")
        if not isinstance(worker_id, str):
            raise ConfigError("worker_id must be a string")
        try:
            worker_id.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError("worker_id is not encodable as UTF-8") from None
        if isinstance(max_model_bytes, bool) or not isinstance(max_model_bytes, int) or max_model_bytes <= 0:
            raise ConfigError("max_model_bytes must be a positive integer")
        if capacity_bytes is not None and backend == "cuda":
            raise ConfigError("capacity_bytes applies to the host backend only")
        self._device = device
        self._worker_id = worker_id
        self._max_model_bytes = max_model_bytes
        self._audit = audit
        try:
            self._backend: Backend = _open_backend(backend, device, capacity_bytes, allow_integrated)
        except InvalidInput as exc:
            raise ConfigError(str(exc)) from None
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        # Seals in flight: close() waits for them, so that none frees its buffer after the
        # backend (on CUDA, the context) is gone.
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        self._closed = False

    # -- properties ---------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """``"cuda"`` or ``"host"``: the backend in use."""
        return self._backend.name

    @property
    def capabilities(self) -> Capabilities:
        """What the backend in use can do (emulated memory, host views, device pointers, ...)."""
        return self._backend.capabilities

    @property
    def backend_description(self) -> str:
        return self._backend.describe()

    @property
    def device(self) -> int:
        return self._device

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def max_model_bytes(self) -> int:
        return self._max_model_bytes

    def __repr__(self) -> str:
        return (
            f"VramManager(backend={self.backend!r}, device={self._device}, "
            f"worker_id={self._worker_id!r}, shards={len(self._entries)})"
        )

    # -- audit --------------------------------------------------------------------------------
    def _emit(self, event: str, **fields: Any) -> None:
        if self._audit is not None:
            self._audit.emit(event, **fields)

    # -- capacity -----------------------------------------------------------------------------
    def available_vram(self) -> int:
        self._check_open()
        return self._backend.mem_info()[0]

    def total_vram(self) -> int:
        self._check_open()
        return self._backend.mem_info()[1]

    def shards(self) -> list[SealedShard]:
        with self._lock:
            return [e.shard for e in self._entries.values()]

    # -- sealing ------------------------------------------------------------------------------
    def seal_model(
        self,
        model_bytes: Buffer,
        device: int | None = None,
        *,
        model_ref: str | None = None,
        shard_index: int | None = None,
        total_shards: int | None = None,
        expected_digest: str | None = None,
        digest_algorithm: str = SHA256_TREE_V1,
    ) -> SealedShard:
        """Copy ``model_bytes`` into device memory, digest what landed there, and seal it."""
        if isinstance(model_bytes, str):
            raise InvalidInput("model_bytes must be bytes-like, not str")
        try:
            view = memoryview(model_bytes).cast("B")
        except TypeError:
            raise InvalidInput(
                f"model_bytes must support the buffer protocol, not {type(model_bytes).__name__}"
            ) from None
        except ValueError as exc:  # e.g. a non-contiguous buffer
            raise InvalidInput(f"model_bytes must be a contiguous buffer: {exc}") from None
        try:
            return self._seal_into(
                len(view),
                lambda buf: self._backend.write_and_hash(buf, view, digest_algorithm),
                device=device,
                model_ref=model_ref,
                shard_index=shard_index,
                total_shards=total_shards,
                expected_digest=expected_digest,
                digest_algorithm=digest_algorithm,
            )
        finally:
            view.release()

    def _validate_seal_args(
        self,
        size: int,
        device: int | None,
        model_ref: str | None,
        shard_index: int | None,
        total_shards: int | None,
        expected_digest: str | None,
        digest_algorithm: str,
    ) -> str | None:
        self._check_open()
        if size <= 0:
            raise InvalidInput("model is empty: nothing to seal")
        if size > self._max_model_bytes:
            raise InvalidInput(f"model of {size} bytes exceeds max_model_bytes ({self._max_model_bytes})")
        if device is not None and (isinstance(device, bool) or device != self._device):
            raise InvalidInput(f"device {device!r} is not this manager's device ({self._device})")
        if model_ref is not None and (not isinstance(model_ref, str) or not model_ref):
            raise InvalidInput("model_ref must be a non-empty string or None")
        _check_opt_int("shard_index", shard_index)
        _check_opt_int("total_shards", total_shards)
        if (shard_index is None) != (total_shards is None):
            raise InvalidInput("shard_index and total_shards must be given together")
        if shard_index is not None and total_shards is not None and shard_index >= total_shards:
            raise InvalidInput(f"shard_index {shard_index} must be < total_shards {total_shards}")
        check_algorithm(digest_algorithm)
        if expected_digest is None:
            return None
        if not isinstance(expected_digest, str) or not _HEX64.fullmatch(expected_digest):
            raise InvalidInput("expected_digest must be 64 hex characters")
        return expected_digest.lower()

    def _seal_into(
        self,
        size: int,
        fill: Callable[[DeviceBuffer], HashResult | None],
        *,
        device: int | None = None,
        model_ref: str | None = None,
        shard_index: int | None = None,
        total_shards: int | None = None,
        expected_digest: str | None = None,
        digest_algorithm: str = SHA256_TREE_V1,
        tensors: Sequence[TensorSpan] = (),
        source: Any = None,
        buffer: DeviceBuffer | None = None,
    ) -> SealedShard:
        """The one sealing path: allocate (or take ``buffer``), ``fill`` it, digest the device
        memory, compare, tag, register. Any failure frees what was allocated.

        ``fill`` may return the digests of the device memory it filled (a backend that hashes
        chunks as they land, see ``Backend.write_and_hash``); otherwise they are computed here."""
        expected = self._validate_seal_args(
            size, device, model_ref, shard_index, total_shards, expected_digest, digest_algorithm
        )
        with self._lock:
            self._check_open()
            self._inflight += 1
        try:
            return self._seal_counted(
                size, fill, expected, buffer, model_ref, shard_index, total_shards,
                digest_algorithm, tensors, source,
            )
        finally:
            with self._lock:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.notify_all()

    def _seal_counted(
        self,
        size: int,
        fill: Callable[[DeviceBuffer], HashResult | None],
        expected: str | None,
        buffer: DeviceBuffer | None,
        model_ref: str | None,
        shard_index: int | None,
        total_shards: int | None,
        digest_algorithm: str,
        tensors: Sequence[TensorSpan],
        source: Any,
    ) -> SealedShard:
        buf = buffer if buffer is not None else self._allocate(size)
        try:
            self._backend.check_policy(buf)
            result = fill(buf)
            if result is None:
                result = self._backend.hash(buf, digest_algorithm, size)
            actual = result.digest.hex()
            if expected is not None and not hmac.compare_digest(actual, expected):
                raise InvalidInput(
                    f"digest of the bytes in device memory ({actual}) does not match expected_digest "
                    f"({expected}); nothing was sealed"
                )
            fields = SealFields(
                shard_id=f"shard-{secrets.token_hex(16)}",
                gpu_device=self._device,
                vram_bytes=size,
                digest_algorithm=digest_algorithm,
                digest=actual,
                sealed_at_ns=time.time_ns(),
                worker_id=self._worker_id,
                model_ref=model_ref,
                shard_index=shard_index,
                total_shards=total_shards,
            )
            tag = self._key.tag(seal_message(fields))
            shard = SealedShard._from_fields(fields, tag)
            entry = _Entry(
                shard, buf, tag, result.unit_digests, tuple(tensors), source=source,
                last_verified_ns=time.time_ns(),
            )
            with self._lock:
                self._check_open()
                self._entries[shard.shard_id] = entry
            try:
                self._emit(
                    "VramSealed",
                    shard_id=shard.shard_id,
                    vram_bytes=size,
                    digest=shard.digest,
                    digest_algorithm=digest_algorithm,
                    model_ref=model_ref,
                    backend=self.backend,
                )
            except BaseException:
                # The caller never gets this shard: it must not stay registered (and resident).
                with self._lock:
                    if self._entries.get(shard.shard_id) is entry:
                        del self._entries[shard.shard_id]
                raise
        except BaseException as exc:
            buf.close()
            if isinstance(exc, PolicyViolation):
                self._emit("PolicyViolation", critical=True, reason=str(exc), vram_bytes=size)
            raise
        return shard

    def _allocate(self, size: int) -> DeviceBuffer:
        free = self._backend.mem_info()[0]
        try:
            if size > free:
                raise InsufficientVram(size, free)
            buf = self._backend.allocate(size)
        except (InsufficientVram, CudaAllocationFailed) as exc:
            self._emit("VramAllocationFailed", requested_bytes=size, reason=str(exc), backend=self.backend)
            raise
        try:
            self._emit("VramAllocated", vram_bytes=size, backend=self.backend)
        except BaseException:
            buf.close()  # the caller never gets the buffer: free it here
            raise
        return buf

    # -- files, tensors, repair (implemented in vram_residency.sources) ------------------------
    def seal_file(
        self,
        path: str | os.PathLike[str],
        device: int | None = None,
        *,
        format: FileFormat = "auto",
        model_ref: str | None = None,
        shard_index: int | None = None,
        total_shards: int | None = None,
        expected_digest: str | None = None,
        manifest: Manifest | str | os.PathLike[str] | None = None,
        digest_algorithm: str = SHA256_TREE_V1,
        progress: Callable[[int], None] | None = None,
        staging_bytes: int | None = None,
        staging_buffers: int | None = None,
    ) -> SealedShard:
        """Stream a file (raw, safetensors or GGUF) into device memory and seal it as one shard.

        Host memory stays bounded (``staging_bytes``, 128 MiB by default, 256 MiB at most). The
        shard's tensor index maps tensor names to their byte ranges in the file. A file that
        cannot be opened or parsed, or whose digest differs from ``expected_digest`` or the
        ``manifest``, raises ``InvalidInput`` with nothing left allocated. ``progress`` is called
        with each number of bytes copied."""
        from vram_residency.sources.files import seal_file

        return seal_file(
            self,
            path,
            device=device,
            format=format,
            model_ref=model_ref,
            shard_index=shard_index,
            total_shards=total_shards,
            expected_digest=expected_digest,
            manifest=manifest,
            digest_algorithm=digest_algorithm,
            progress=progress,
            staging_bytes=staging_bytes,
            staging_buffers=staging_buffers,
        )

    def seal_files(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        device: int | None = None,
        *,
        model_name: str | None = None,
        format: FileFormat = "auto",
        manifest: Manifest | str | os.PathLike[str] | None = None,
        digest_algorithm: str = SHA256_TREE_V1,
        progress: Callable[[int], None] | None = None,
        staging_bytes: int | None = None,
        staging_buffers: int | None = None,
    ) -> SealedModel:
        """Seal a multi-file model (a directory or ``*.safetensors.index.json`` of a sharded
        checkpoint, or a list of files in order) as one ``vram-model-v1`` model: one shard per
        file, all bound to a model_ref that covers every file's name, size and digest in order.
        All or nothing."""
        from vram_residency.sources.files import seal_files

        return seal_files(
            self,
            paths,
            device=device,
            model_name=model_name,
            format=format,
            manifest=manifest,
            digest_algorithm=digest_algorithm,
            progress=progress,
            staging_bytes=staging_bytes,
            staging_buffers=staging_buffers,
        )

    def seal_tensors(
        self,
        tensors: Any,
        device: int | None = None,
        *,
        model_name: str | None = None,
        digest_algorithm: str = SHA256_TREE_V1,
    ) -> SealedModel:
        """Seal tensors where they already are, without copying: an ``nn.Module``'s parameters and
        buffers, a mapping of names to tensors, or a sequence of tensors (CUDA array interface or
        DLPack; CPU memory on the host backend). The framework keeps owning that memory; see
        :mod:`vram_residency.sources.tensors` for what adopting cannot promise."""
        from vram_residency.sources.tensors import seal_tensors

        return seal_tensors(
            self, tensors, device=device, model_name=model_name, digest_algorithm=digest_algorithm
        )

    def verify_model(self, model: SealedModel) -> None:
        """Check that ``model``'s parts still bind to its model_ref, then verify every shard."""
        model.check_binding()
        for shard in model.shards:
            self.verify_sealed(shard)

    def repair(
        self, shard: SealedShard, source: str | os.PathLike[str] | Buffer | None = None
    ) -> RepairReport:
        """Re-copy only the damaged 1 MiB units of ``shard`` from ``source`` (by default the file
        it was sealed from), each checked against its sealed unit digest before it is written,
        then verify the shard against its original seal and audit ``ShardRepaired``."""
        from vram_residency.sources.repair import repair

        return repair(self, shard, source)

    # -- verification -------------------------------------------------------------------------
    def _entry(self, shard: SealedShard) -> _Entry:
        if not isinstance(shard, SealedShard):
            raise InvalidInput(f"expected a SealedShard, not {type(shard).__name__}")
        with self._lock:
            self._check_open()
            entry = self._entries.get(shard.shard_id)
        if entry is None:
            raise NotSealed(f"shard {shard.shard_id!r} is not sealed by this manager")
        return entry

    def verify_sealed(self, shard: SealedShard) -> None:
        """Check the seal's tag, then recompute the digest from device memory.

        Raises ``SealVerificationFailed`` (with ``corrupted_ranges`` and, where known,
        ``corrupted_tensors``) on any mismatch; ``NotSealed`` for an unknown shard."""
        entry = self._entry(shard)
        with entry.lock:
            if entry.buf.closed:
                raise NotSealed(f"shard {shard.shard_id!r} was deallocated")
            self._verify_entry(shard, entry)

    def _verify_entry(self, shard: SealedShard, entry: _Entry) -> None:
        fields = shard.fields()
        # Both the presented shard and our own record must carry the tag of these exact fields:
        # a shard object edited in memory fails here, before any device work.
        tag_ok = verify_tag(self._key, fields, entry.tag) and hmac.compare_digest(shard._signature, entry.tag)
        if not tag_ok:
            exc = SealVerificationFailed(
                f"seal tag of shard {shard.shard_id} does not match its fields",
                shard_id=shard.shard_id,
                tag_valid=False,
            )
            self._emit(
                "SealVerificationFailed",
                critical=True,
                shard_id=shard.shard_id,
                reason="tag mismatch",
                expected_digest=entry.shard.digest,
                actual_digest="",
                corrupted_ranges=[],
            )
            raise exc
        sealed = entry.shard
        start = time.perf_counter_ns()
        # The fast path computes the digest alone; unit digests are only needed to locate a change.
        actual = self._backend.digest(entry.buf, sealed.digest_algorithm, sealed.vram_bytes).hex()
        elapsed_ns = time.perf_counter_ns() - start
        if not hmac.compare_digest(actual, sealed.digest):
            result = self._backend.hash(entry.buf, sealed.digest_algorithm, sealed.vram_bytes)
            ranges = self._locate(entry, result)
            tensors = [
                t.name for t in entry.tensors if any(t.start < e and s < t.end for s, e in ranges)
            ]
            self._emit(
                "SealVerificationFailed",
                critical=True,
                shard_id=sealed.shard_id,
                reason="digest mismatch",
                expected_digest=sealed.digest,
                actual_digest=actual,
                corrupted_ranges=[list(r) for r in ranges],
                corrupted_tensors=tensors,
            )
            where = ", ".join(f"[{s}, {e})" for s, e in ranges[:8]) + (" ..." if len(ranges) > 8 else "")
            named = f"; tensors: {', '.join(tensors[:8])}" if tensors else ""
            raise SealVerificationFailed(
                f"shard {sealed.shard_id}: digest of device memory changed "
                f"(expected {sealed.digest}, got {actual}); changed bytes in {where}{named}",
                shard_id=sealed.shard_id,
                expected_digest=sealed.digest,
                actual_digest=actual,
                corrupted_ranges=ranges,
                corrupted_tensors=tensors,
            )
        entry.last_verified_ns = time.time_ns()
        self._emit(
            "SealVerified",
            shard_id=sealed.shard_id,
            vram_bytes=sealed.vram_bytes,
            digest_algorithm=sealed.digest_algorithm,
            duration_ns=elapsed_ns,
        )

    @staticmethod
    def _locate(entry: _Entry, result: HashResult) -> list[tuple[int, int]]:
        old, new = entry.unit_digests, result.unit_digests
        if len(old) != len(new):
            raise IntegrityViolation("unit digest count changed between seal and verify")
        changed = [i for i in range(len(old) // 32) if old[32 * i : 32 * i + 32] != new[32 * i : 32 * i + 32]]
        return _merge_ranges(changed, entry.shard.vram_bytes)

    # -- attestation (attest-v1) and seal age ----------------------------------------------------
    def attest(
        self,
        nonce: bytes,
        shards: Sequence[SealedShard | str] | None = None,
        probe: bool = False,
    ) -> dict[str, Any]:
        """The ``attest-v1`` statement (JSON form, tagged under KA) for ``nonce``: each shard's
        digest recomputed from device memory now, in one batched pass (``digest_many``), and with
        ``probe`` its BLAKE3 keyed hash under KP in the same pass.

        ``shards``: shards or shard ids, in the statement's order (default: every shard, in the
        order they were sealed). On a match every shard's ``last_verified_ns`` moves to now.

        A mismatch is a failed verification: the manager audits ``SealVerificationFailed`` for
        each shard that changed (with the changed ranges), audits ``AttestationIssued`` with
        verdict ``mismatch``, and raises ``AttestationMismatch`` (a ``SealVerificationFailed``,
        so every caller stops the worker exactly as on a failed verify) carrying the tagged
        statement, which the worker still sends: it tells the orchestrator which shard failed."""
        nonce = check_nonce(nonce)
        if not isinstance(probe, bool):
            raise InvalidInput("probe must be a bool")
        entries = self._attest_entries(shards)
        # Lock in shard-id order: two attestations over overlapping sets never wait on each other
        # in a cycle (every other path holds one entry lock at a time).
        with contextlib.ExitStack() as stack:
            for e in sorted(entries, key=lambda e: e.shard.shard_id):
                stack.enter_context(e.lock)
            return self._attest_locked(nonce, entries, probe)

    def _attest_entries(self, shards: Sequence[SealedShard | str] | None) -> list[_Entry]:
        with self._lock:
            self._check_open()
            if shards is None:
                return list(self._entries.values())
            if isinstance(shards, (str, SealedShard)):
                raise InvalidInput("shards must be a sequence of shards or shard ids")
            out: list[_Entry] = []
            for s in shards:
                sid = s.shard_id if isinstance(s, SealedShard) else s
                if not isinstance(sid, str):
                    raise InvalidInput(f"expected a SealedShard or shard id, not {type(s).__name__}")
                entry = self._entries.get(sid)
                if entry is None:
                    raise NotSealed(f"shard {sid!r} is not sealed by this manager")
                if isinstance(s, SealedShard) and not hmac.compare_digest(s._signature, entry.tag):
                    raise InvalidInput(f"shard {sid!r} does not carry this manager's seal")
                if any(e is entry for e in out):
                    raise InvalidInput(f"shard {sid!r} is listed twice")
                out.append(entry)
            return out

    def _attest_locked(self, nonce: bytes, entries: list[_Entry], probe: bool) -> dict[str, Any]:
        for e in entries:
            if e.buf.closed:
                raise NotSealed(f"shard {e.shard.shard_id!r} was deallocated")
            # Our own record must still carry its tag: an edited record fails as verify fails.
            if not verify_tag(self._key, e.shard.fields(), e.tag):
                self._emit(
                    "SealVerificationFailed", critical=True, shard_id=e.shard.shard_id,
                    reason="tag mismatch", expected_digest=e.shard.digest, actual_digest="",
                    corrupted_ranges=[],
                )
                raise SealVerificationFailed(
                    f"seal tag of shard {e.shard.shard_id} does not match its fields",
                    shard_id=e.shard.shard_id, tag_valid=False,
                )
        kp = probe_key(self._attest_key, nonce) if probe else None
        segments = [Segment(e.buf, e.shard.vram_bytes, e.shard.digest_algorithm) for e in entries]
        if kp is not None:
            segments += [Segment(e.buf, e.shard.vram_bytes, "blake3", key=kp) for e in entries]
        start = time.perf_counter_ns()
        # One batched pass: every shard's digest (and probe) with one synchronization at the end.
        # Every recomputation of the batch finishes at that synchronization, so each shard's
        # verified_at_ns is the batch's end.
        digests = self._backend.digest_many(segments) if segments else []
        done_ns = time.time_ns()
        elapsed_ns = time.perf_counter_ns() - start
        n = len(entries)
        rows: list[AttestedShard] = []
        failed: list[_Entry] = []
        for i, e in enumerate(entries):
            now = digests[i]
            if not hmac.compare_digest(now.hex(), e.shard.digest):
                failed.append(e)
            rows.append(
                AttestedShard(
                    shard_id=e.shard.shard_id,
                    seal_signature=e.tag,
                    digest_now=now,
                    probe=digests[n + i] if kp is not None else None,
                    verified_at_ns=done_ns,
                )
            )
        statement = Statement(
            nonce=nonce,
            worker_id=self._worker_id,
            attested_at_ns=done_ns,
            shards=tuple(rows),
            verdict="mismatch" if failed else "ok",
        )
        doc = statement_to_json(statement, attest_tag(self._attest_key, statement))
        if not failed:
            for e in entries:
                e.last_verified_ns = done_ns
        for e in failed:
            result = self._backend.hash(e.buf, e.shard.digest_algorithm, e.shard.vram_bytes)
            ranges = self._locate(e, result)
            tensors = [t.name for t in e.tensors if any(t.start < b and a < t.end for a, b in ranges)]
            self._emit(
                "SealVerificationFailed", critical=True, shard_id=e.shard.shard_id,
                reason="digest mismatch (attestation)", expected_digest=e.shard.digest,
                actual_digest=result.digest.hex(), corrupted_ranges=[list(r) for r in ranges],
                corrupted_tensors=tensors,
            )
        self._emit(
            "AttestationIssued",
            critical=bool(failed),
            nonce=nonce.hex(),
            verdict=statement.verdict,
            shard_ids=[e.shard.shard_id for e in entries],
            probe=kp is not None,
            failed_shard_ids=[e.shard.shard_id for e in failed],
            duration_ns=elapsed_ns,
        )
        if failed:
            first = failed[0].shard
            raise AttestationMismatch(
                f"attestation: digest of device memory changed for shard(s) "
                f"{', '.join(e.shard.shard_id for e in failed)}",
                attestation=doc,
                shard_id=first.shard_id,
                expected_digest=first.digest,
                actual_digest=rows[entries.index(failed[0])].digest_now.hex(),
            )
        return doc

    def last_verified_ns(self) -> dict[str, int]:
        """Each shard's last successful verification (seal, verify or attest), ns since the epoch."""
        with self._lock:
            return {sid: e.last_verified_ns for sid, e in self._entries.items()}

    def check_seal_age(
        self,
        max_age_ns: int,
        *,
        policy: Literal["reverify", "refuse"] = "reverify",
        now_ns: int | None = None,
    ) -> list[str]:
        """Enforce a maximum seal age: every shard whose last successful verification is older
        than ``max_age_ns`` is verified now (``"reverify"``; a mismatch raises as verify does),
        or the call raises ``StaleSeal`` naming them (``"refuse"``). Returns the ids re-verified."""
        if isinstance(max_age_ns, bool) or not isinstance(max_age_ns, int) or max_age_ns <= 0:
            raise InvalidInput("max_age_ns must be a positive integer")
        if policy not in ("reverify", "refuse"):
            raise InvalidInput("policy must be 'reverify' or 'refuse'")
        now = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            self._check_open()
            stale = [e for e in self._entries.values() if now - e.last_verified_ns > max_age_ns]
        if not stale:
            return []
        if policy == "refuse":
            oldest = max(now - e.last_verified_ns for e in stale)
            raise StaleSeal(
                f"{len(stale)} shard(s) last verified more than {max_age_ns / 1e9:.3f} s ago "
                f"(oldest {oldest / 1e9:.3f} s); verify them first",
                shard_ids=[e.shard.shard_id for e in stale],
                age_ns=oldest,
            )
        for e in stale:
            self.verify_sealed(e.shard)
        return [e.shard.shard_id for e in stale]

    # -- release ------------------------------------------------------------------------------
    def deallocate(self, shard: SealedShard) -> None:
        """Zero and free the shard's device memory and forget its seal."""
        entry = self._entry(shard)
        with entry.lock:
            with self._lock:
                if self._entries.get(shard.shard_id) is not entry:
                    raise NotSealed(f"shard {shard.shard_id!r} was deallocated")
                del self._entries[shard.shard_id]
            entry.buf.close()
        self._emit("VramDeallocated", shard_id=shard.shard_id, vram_bytes=shard.vram_bytes)

    def close(self) -> None:
        """Zero and free every shard, then release the backend. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._inflight:
                self._idle.wait()
            entries = list(self._entries.values())
            self._entries.clear()
        errors: list[BaseException] = []
        for entry in entries:
            with entry.lock:
                try:
                    entry.buf.close()
                except VramError as exc:  # keep freeing the rest; report afterwards
                    errors.append(exc)
            shard = entry.shard
            try:
                self._emit("VramDeallocated", shard_id=shard.shard_id, vram_bytes=shard.vram_bytes)
            except Exception as exc:  # a failed audit log must not keep the other shards resident
                errors.append(exc)
        try:
            self._backend.close()
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise errors[0]

    def _check_open(self) -> None:
        if self._closed:
            raise NotSealed("manager is closed")

    def __enter__(self) -> VramManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort only: device memory must not outlive a forgotten manager.
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # nothing can be reported from a finalizer
                self.close()

