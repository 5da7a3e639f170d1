"""The seal core: a store of sealed shards on one backend.

Every shard goes through the same few steps: ``allocate`` (or adopt) a device buffer, fill it,
``seal_into`` it (digest the device memory, compare, tag, register, audit), ``lookup`` it, and
``verify_many`` (one batched ``digest_many`` over every shard, then unit digests of the shards that
changed, to say where). ``VramManager`` is the public face of this store; ``sources`` (files,
tensors, models, repair), ``testing`` and the service use it through the methods below, never
through private names.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import operator
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Final, Literal

from vram_residency._core.types import DEFAULT_MAX_TENSORS, AuditSink, BatchAuditSink, ShardRecord, TensorSpan
from vram_residency.audit.events import (
    POLICY_VIOLATION,
    SEAL_VERIFICATION_FAILED,
    SEAL_VERIFIED,
    VRAM_ALLOCATED,
    VRAM_ALLOCATION_FAILED,
    VRAM_DEALLOCATED,
    VRAM_SEALED,
)
from vram_residency.backends.base import Backend, DeviceBuffer, Priority, Segment
from vram_residency.errors import (
    CudaAllocationFailed,
    InsufficientVram,
    IntegrityViolation,
    InvalidInput,
    NotSealed,
    PolicyViolation,
    SealVerificationFailed,
    ShardFailure,
    UnsupportedOperation,
    VramError,
)
from vram_residency.formats import nhfast
from vram_residency.formats.keys import SecretKey
from vram_residency.formats.seal import SealFields, seal_message
from vram_residency.formats.tree import (
    NH_FAST_V1,
    SHA256_TREE_V1,
    UNIT_SIZE,
    HashResult,
    check_algorithm,
)
from vram_residency.shard import SealedShard

__all__ = ["CHECKS", "SEAL_FAILED", "Check", "ShardStore", "changed_units", "merge_ranges"]

#: Which digest a verification compares (audited as ``check``): ``"full"`` recomputes the seal's
#: own digest (sha256-tree-v1, blake3 or nh-fast-v1, as sealed); ``"fast"`` recomputes the keyed
#: ``nh-fast-v1`` digest taken at seal time (``ShardRecord.fast_digest``), falling back to the
#: full check for a shard that has none.
Check = Literal["fast", "full"]
CHECKS: Final = ("fast", "full")

#: Audited when a seal is refused after its memory was allocated (a wrong expected digest, a
#: failed fill): the allocation's shard id, the reason, then ``VramDeallocated`` for the release.
#: The audit module does not name it yet; the value is the event's name in the log.
SEAL_FAILED: Final = "SealFailed"

#: The fixed message whose tags tell whether two keys are one (``same_key``).
_KEY_PROBE: Final = b"vram-residency: same seal key?"

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")

#: The ten seal-v1 fields of a shard, in ``SealFields`` order, read in one C call: what a verify
#: compares against the fields whose tag it checked last (``ShardRecord.checked``).
_SEAL_FIELD_VALUES: Final = operator.attrgetter(
    "shard_id", "gpu_device", "vram_bytes", "digest_algorithm", "digest", "sealed_at_ns",
    "worker_id", "model_ref", "shard_index", "total_shards",
)  # fmt: skip
_TAG: Final = operator.attrgetter("tag")
_IS: Final = operator.is_
_CLOSED: Final = operator.attrgetter("closed")
_ONLY_32: Final = frozenset({32})
_ONLY_BYTES: Final = frozenset({bytes})

#: How many verify plans (``_VerifyPlan``) a store keeps: the batches verified over and over (a
#: model, the service's shards, a scrubber's chunks) are few; each plan holds only references.
_MAX_PLANS: Final = 32


def merge_ranges(units: Sequence[int], n: int) -> list[tuple[int, int]]:
    """Half-open byte ranges of a shard of ``n`` bytes covered by the 1 MiB ``units`` (sorted),
    adjacent units merged."""
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


def changed_units(old: bytes, new: bytes) -> list[int]:
    """Indices of the 32-byte unit digests that differ between two packed lists."""
    if len(old) != len(new):
        raise IntegrityViolation("unit digest count changed between seal and verify")
    return [i for i in range(len(old) // 32) if old[32 * i : 32 * i + 32] != new[32 * i : 32 * i + 32]]


def _check_opt_int(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InvalidInput(f"{name} must be a non-negative integer or None")


def _note_audit_failure(exc: BaseException, audit_exc: BaseException) -> None:
    # The error being raised stays the one raised; the failed audit write rides along with it.
    exc.add_note(
        f"the audit log could not record this failure either: {type(audit_exc).__name__}: {audit_exc}"
    )


@dataclass(slots=True, eq=False)
class _VerifyPlan:
    """What a successful verify of one exact batch of shard objects worked out, kept for the next
    verify of the same objects (``ShardStore.verify_many``): a verify of a model's hundreds of
    shards then costs the device pass and a few C-level passes over lists, not Python work per
    shard.

    Valid only while the store's record set is unchanged (``generation``; every registration,
    removal and close bumps it and drops all plans) and while every presented object still holds
    the seal fields and tag checked then (``flat_values``, ``tags``): a plan holds strong references
    to the ``presented`` objects, so that no other object can take one of their ids."""

    generation: int
    presented: tuple[SealedShard, ...]
    #: Each presented shard's ten seal-v1 field values, one list for all shards, exactly the
    #: objects whose HMAC tags were checked against the records' tags when the plan was made:
    #: an unedited shard still holds these very objects (compared by identity; the plan keeps
    #: them alive, so no other object can take their ids). And the tags checked, joined.
    flat_values: list[object]
    tags: bytes
    #: The records by shard id, in first-presented order (a shard presented twice is verified once).
    records: dict[str, ShardRecord]
    record_list: list[ShardRecord]
    bufs: list[DeviceBuffer]
    #: The records' locks in the global order (by shard id) that keeps batches deadlock-free.
    locks: list[threading.Lock]
    #: The full check's segment table and the 32-byte digests it must give, joined in order.
    #: A keyed (nh-fast-v1) segment holds its shard's key: never shown.
    segments: list[Segment] = field(repr=False)
    expected: bytes


def _plan_applies(plan: _VerifyPlan) -> bool:
    """True when every object of ``plan`` still holds exactly the seal fields and tag whose HMAC
    was checked against its record's tag when the plan was made.

    One C-level comparison of the field tuples, one constant-time comparison of the joined tags.
    The HMAC of the same message under the same key against the same record tag (the store's
    own, fixed for the record's life) cannot give another answer, so it is not recomputed. A
    changed or replaced object (dataclasses.replace, or an in-place edit of the frozen
    dataclass) does not match: the whole batch is then verified from scratch, its tags fully
    checked.

    The fields are compared by identity, not equality: an unedited frozen object returns the very
    objects checked then, while an equal value of another type (False for 0, 101.0 for 101, a
    str subclass equal to everything) is no seal-v1 field and is refused from scratch. Every tag
    must be exactly bytes (whose len() cannot lie) and 32 bytes long: the joined tags alone would
    match tags split differently across the shards (31 bytes in one, 33 in the next). Errors
    other than TypeError (an attribute deleted from an object) propagate, as a from-scratch
    check would raise them."""
    presented = plan.presented
    tags = list(map(_TAG, presented))
    try:
        return not (
            not all(map(_IS, chain.from_iterable(map(_SEAL_FIELD_VALUES, presented)), plan.flat_values))
            # Exactly bytes, so that len() is the length of what join reads: a bytes subclass
            # may override __len__ (a 31-byte tag that says 32).
            or set(map(type, tags)) != _ONLY_BYTES
            or set(map(len, tags)) != _ONLY_32
            or not hmac.compare_digest(b"".join(tags), plan.tags)
        )
    except TypeError:  # a tag edited into something that is not bytes: the full check says so
        return False


class _Once:
    """A caller's check that must pass before any verdict (``verify_many``'s ``before_verdict``,
    a model's binding), run at most once per verify: by a plan's gate while the device digests,
    or by the verify from scratch, whichever comes first. Its exception propagates each time
    (and it is then not marked done)."""

    __slots__ = ("done", "fn")

    def __init__(self, fn: Callable[[], None] | None) -> None:
        self.fn = fn
        self.done = fn is None

    def __call__(self) -> None:
        if not self.done:
            assert self.fn is not None  # done is True without one
            self.fn()
            self.done = True


class _PlanGate:
    """A verify plan's tag check (``_plan_applies``), run by the backend as ``while_running``:
    on the host while the device digests, so that it costs no time of its own. The caller's
    ``before`` check (a model's binding) runs first, as it would before the plan's. With
    ``audit``, it also builds the SealVerified payloads of a full check's success path
    (``batch``).

    It gives no verdict: the store uses the digests only when ``ok`` (both checks ran and
    passed) and they then match. ``error``: what a check raised, if anything."""

    __slots__ = ("audit", "batch", "before", "error", "ok", "plan", "ran")

    def __init__(self, plan: _VerifyPlan, before: _Once, *, audit: bool) -> None:
        self.plan = plan
        self.before = before
        self.audit = audit
        self.ran = False
        self.ok = False
        self.error: BaseException | None = None
        self.batch: list[dict[str, Any]] = []

    def __call__(self) -> None:
        if self.ran:  # the contract is once per call; a second call would change nothing
            return
        self.ran = True
        try:
            self.before()
            ok = _plan_applies(self.plan)
        except BaseException as exc:
            self.error = exc
            raise
        if ok and self.audit:
            self.batch = [
                {"shard_id": sid, "vram_bytes": sh.vram_bytes, "digest_algorithm": sh.digest_algorithm}
                for sid, sh in ((sid, r.shard) for sid, r in self.plan.records.items())
            ]
        self.ok = ok

    def stale_after(self, exc: Exception) -> bool:
        """After ``digest_many`` raised ``exc``: True when the plan turned out not to apply (the
        caller then verifies from scratch, as it would have without the plan, and that verify
        meets any lasting device error again); False when ``exc`` must propagate. A check that
        did not run yet (the backend failed before queuing) runs now, as it would have run
        before the device work."""
        if not self.ran:
            self()
        return self.error is None and not self.ok


class ShardStore:
    """Sealed shards on one backend, keyed by shard id; thread-safe.

    The store owns the seal key, the backend and every buffer it allocated; ``close()`` zeroes
    and frees them (adopted buffers are only forgotten) and then closes the backend.
    """

    def __init__(
        self,
        key: SecretKey,
        backend: Backend,
        *,
        device: int,
        worker_id: str,
        max_model_bytes: int,
        max_tensors: int = DEFAULT_MAX_TENSORS,
        audit: AuditSink | None = None,
        fast_key: SecretKey | None = None,
        fast_check: bool = False,
    ) -> None:
        if fast_check and fast_key is None:
            raise InvalidInput("fast_check needs the nh-fast-v1 worker key (fast_key)")
        self._key = key
        # The worker's nh-fast-v1 key (HKDF of the token, formats.nhfast.manager_key), derived
        # once; each shard's key is its HMAC tag of the shard id (nhfast.shard_key), so the key
        # bytes never leave the SecretKey.
        self._fast_key = fast_key
        self._fast_check = bool(fast_check)
        self._backend = backend
        self._device = device
        self._worker_id = worker_id
        self._max_model_bytes = max_model_bytes
        self._max_tensors = max_tensors
        self._audit = audit
        self._records: dict[str, ShardRecord] = {}
        self._lock = threading.RLock()
        # Verify plans by the ids of the presented shard objects (see _VerifyPlan), and the
        # generation of the record set they were made for.
        self._plans: dict[tuple[int, ...], _VerifyPlan] = {}
        self._generation = 0
        # Seals in flight: close() waits for them, so that none frees its buffer after the
        # backend (on CUDA, the context) is gone.
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        self._closed = False

    # -- facts ----------------------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def device(self) -> int:
        return self._device

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def max_model_bytes(self) -> int:
        return self._max_model_bytes

    @property
    def max_tensors(self) -> int:
        """The most tensors a file's header or a model may list (``DEFAULT_MAX_TENSORS``)."""
        return self._max_tensors

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def shards(self) -> list[SealedShard]:
        with self._lock:
            return [r.shard for r in self._records.values()]

    def _records_changed(self) -> None:
        # Called under self._lock after every change to the record set: the verify plans named
        # records that may be gone (or replaced, by a restore), so they are all dropped, and one
        # made meanwhile by a verify that looked the records up before the change is not kept.
        self._generation += 1
        self._plans.clear()

    def check_open(self) -> None:
        if self._closed:
            raise NotSealed("manager is closed")

    @property
    def fast_check(self) -> bool:
        """True when every seal also keeps a keyed ``nh-fast-v1`` digest of the shard (one more
        memory-speed pass at seal time) for ``verify_many(check="fast")``."""
        return self._fast_check

    def digest_key(self, algorithm: str, shard_id: str) -> bytes | None:
        """The key every digest of shard ``shard_id`` under ``algorithm`` takes: the shard's
        ``nh-fast-v1`` key (``nhfast.shard_key(manager_key(token), shard_id)``) for that
        algorithm, None for the unkeyed ones. Key material: never log or show it."""
        if algorithm != NH_FAST_V1:
            return None
        if self._fast_key is None:
            raise InvalidInput("this store has no nh-fast-v1 key (construct it with fast_key)")
        return self._fast_key.tag(nhfast.shard_key_message(shard_id))

    def segment(self, record: ShardRecord, algorithm: str | None = None) -> Segment:
        """The segment-table entry of ``record`` under ``algorithm`` (default: the seal's),
        keyed for a keyed algorithm. Made once per record and algorithm (a keyed one costs an
        HMAC), then reused: a verify of many shards asks for every one of them each time."""
        alg = record.shard.digest_algorithm if algorithm is None else algorithm
        seg = record.segments.get(alg)
        if seg is None or seg.buf is not record.buf:
            key = self.digest_key(alg, record.shard.shard_id)
            seg = Segment(record.buf, record.shard.vram_bytes, alg, key)
            record.segments[alg] = seg
        return seg

    @property
    def audit(self) -> AuditSink | None:
        """The audit sink events go to (None: none), so that a caller writing one event to two
        stores can tell whether they share one log."""
        return self._audit

    def same_key(self, other: ShardStore) -> bool:
        """True when ``other`` seals with the same key (the same worker token). Compared through
        tags of a fixed message, so that no key material is compared directly or exposed."""
        if not isinstance(other, ShardStore):
            raise InvalidInput(f"expected a ShardStore, not {type(other).__name__}")
        return hmac.compare_digest(self._key.tag(_KEY_PROBE), other._key.tag(_KEY_PROBE))

    def key_matches(self, key: SecretKey) -> bool:
        """True when ``key`` is this store's seal key (compared through tags, as above)."""
        return hmac.compare_digest(self._key.tag(_KEY_PROBE), key.tag(_KEY_PROBE))

    # -- audit ----------------------------------------------------------------------------------
    def emit(self, event: str, **fields: Any) -> None:
        """Write one audit event (nothing without an audit sink); its errors propagate."""
        if self._audit is not None:
            self._audit.emit(event, **fields)

    def _emit_verified(self, batch: list[dict[str, Any]], common: dict[str, Any] | None = None) -> None:
        """One SealVerified record per mapping of ``batch`` (plus the ``common`` fields), in
        order; errors propagate. A sink that takes batches (AuditLog) writes them under one lock
        hold, at a fraction of the cost of one emit per shard; any other sink gets them one emit
        at a time."""
        audit = self._audit
        if audit is None or not batch:
            return
        if isinstance(audit, BatchAuditSink):
            audit.emit_many(SEAL_VERIFIED, batch, common=common)
        else:
            for fields in batch:
                audit.emit(SEAL_VERIFIED, **{**(common or {}), **fields})

    # -- sealing --------------------------------------------------------------------------------
    def new_shard_id(self) -> str:
        return f"shard-{secrets.token_hex(16)}"

    def validate_seal_args(
        self,
        size: int,
        device: int | None,
        model_ref: str | None,
        shard_index: int | None,
        total_shards: int | None,
        expected_digest: str | None,
        digest_algorithm: str,
    ) -> str | None:
        """Check one seal's arguments against the store's limits; the expected digest, lower-cased."""
        self.check_open()
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
        check_algorithm(digest_algorithm, keyed=True)
        # Everything the record will hold, checked now as seal-v1 checks it when the record is
        # built (a model_ref with no UTF-8 form, an index beyond 64 bits): before allocating.
        SealFields(
            shard_id="shard-0", gpu_device=self._device, vram_bytes=size, digest_algorithm=digest_algorithm,
            digest="0" * 64, sealed_at_ns=0, worker_id=self._worker_id, model_ref=model_ref,
            shard_index=shard_index, total_shards=total_shards,
        ).validate()  # fmt: skip
        if digest_algorithm == NH_FAST_V1 and self._fast_key is None:
            raise InvalidInput("nh-fast-v1 seals need the store's nh-fast-v1 key (fast_key)")
        if expected_digest is None:
            return None
        if not isinstance(expected_digest, str) or not _HEX64.fullmatch(expected_digest):
            raise InvalidInput("expected_digest must be 64 hex characters")
        return expected_digest.lower()

    def allocate(self, size: int, *, shard_id: str | None = None, progressive: bool = False) -> DeviceBuffer:
        """An exact allocation of ``size`` bytes, audited as ``VramAllocated`` with the id of the
        shard it is for, so that a later ``SealFailed``/``VramDeallocated`` pairs with it.

        ``progressive``: where the backend declares ``Capabilities.progressive_allocation``, a
        buffer mapped chunk by chunk as the caller fills it (``Backend.allocate_progressive``;
        restore); the caller must map every chunk (``DeviceBuffer.map_through``) before the
        buffer is digested or registered. Elsewhere an ordinary allocation."""
        free = self._backend.mem_info()[0]
        try:
            if size > free:
                raise InsufficientVram(size, free)
            if progressive and self._backend.capabilities.progressive_allocation:
                buf = self._backend.allocate_progressive(size)
            else:
                buf = self._backend.allocate(size)
        except (InsufficientVram, CudaAllocationFailed) as exc:
            self.emit(
                VRAM_ALLOCATION_FAILED, requested_bytes=size, reason=str(exc), backend=self._backend.name
            )
            raise
        try:
            fields: dict[str, Any] = {"vram_bytes": size, "backend": self._backend.name}
            if shard_id is not None:
                fields["shard_id"] = shard_id
            self.emit(VRAM_ALLOCATED, **fields)
        except BaseException as exc:
            buf.close()  # the caller never gets the buffer: free it here
            if not isinstance(exc, Exception):
                # An interrupt (Ctrl-C, serve's SIGTERM during the startup load) can land inside
                # emit after the VramAllocated record was written: the trail must then show the
                # release too. (An audit write that failed wrote nothing, and would fail again.)
                with contextlib.suppress(Exception):
                    self.emit(VRAM_DEALLOCATED, shard_id=shard_id, vram_bytes=size, reason="interrupted")
            raise
        return buf

    def release_unsealed(self, buf: DeviceBuffer, *, shard_id: str, size: int, reason: BaseException) -> None:
        """Free a buffer whose seal failed, and audit the failure and the release (an adopted
        buffer is only forgotten: nothing of ours was allocated, so nothing is audited as freed).

        Never raises: the seal's own error is the one to report; a failed audit write is added
        to it as a note."""
        with contextlib.suppress(VramError):
            buf.close()
        try:
            if isinstance(reason, PolicyViolation):
                self.emit(POLICY_VIOLATION, critical=True, reason=str(reason), vram_bytes=size)
            if buf.adopted:
                return
            self.emit(
                SEAL_FAILED, shard_id=shard_id, vram_bytes=size, reason=f"{type(reason).__name__}: {reason}"
            )
            self.emit(VRAM_DEALLOCATED, shard_id=shard_id, vram_bytes=size)
        except Exception as audit_exc:
            _note_audit_failure(reason, audit_exc)

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Hold the store open for a multi-step operation that allocates and registers (restore):
        ``close()`` waits for it, so that nothing is freed after the backend is gone."""
        with self._counted():
            yield

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        with self._lock:
            self.check_open()
            self._inflight += 1
        try:
            yield
        finally:
            with self._lock:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.notify_all()

    def seal_into(
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
        shard_id: str | None = None,
    ) -> SealedShard:
        """The one sealing path: allocate (or take ``buffer``), ``fill`` it, digest the device
        memory, compare, tag, register, audit. Any failure frees what was allocated (audited as
        ``SealFailed`` then ``VramDeallocated``).

        ``fill`` may return the digests of the device memory it filled (a backend that hashes
        chunks as they land, see ``Backend.write_and_hash``, or a batch digested beforehand with
        ``hash_many``); otherwise they are computed here. ``shard_id`` is the id the allocation
        was audited with, when the caller allocated ``buffer`` through :meth:`allocate`.

        A keyed algorithm (``nh-fast-v1``) is keyed per shard id: a caller whose ``fill`` hashes
        must choose the id first (:meth:`new_shard_id`), pass it as ``shard_id`` and hash with
        :meth:`digest_key`. Without ``shard_id`` the fill cannot have known the key, so its
        result is not trusted and the store hashes the memory itself."""
        expected = self.validate_seal_args(
            size, device, model_ref, shard_index, total_shards, expected_digest, digest_algorithm
        )
        with self._counted():
            sid = shard_id if shard_id is not None else self.new_shard_id()
            trust_fill = shard_id is not None or self.digest_key(digest_algorithm, sid) is None
            buf = buffer if buffer is not None else self.allocate(size, shard_id=sid)
            try:
                return self._seal_filled(
                    sid, size, buf, fill, expected, model_ref, shard_index, total_shards,
                    digest_algorithm, tensors, source, trust_fill,
                )  # fmt: skip
            except BaseException as exc:
                self.release_unsealed(buf, shard_id=sid, size=size, reason=exc)
                raise

    def _seal_filled(
        self,
        shard_id: str,
        size: int,
        buf: DeviceBuffer,
        fill: Callable[[DeviceBuffer], HashResult | None],
        expected: str | None,
        model_ref: str | None,
        shard_index: int | None,
        total_shards: int | None,
        digest_algorithm: str,
        tensors: Sequence[TensorSpan],
        source: Any,
        trust_fill: bool = True,
    ) -> SealedShard:
        self._backend.check_policy(buf)
        result = fill(buf)
        if not trust_fill:
            result = None
        key = self.digest_key(digest_algorithm, shard_id)
        if result is None:
            result = self._backend.hash(buf, digest_algorithm, size, key=key)
        fast = result if digest_algorithm == NH_FAST_V1 else self._fast_digest(buf, size, shard_id)
        actual = result.digest.hex()
        if expected is not None and not hmac.compare_digest(actual, expected):
            raise InvalidInput(
                f"digest of the bytes in device memory ({actual}) does not match expected_digest "
                f"({expected}); nothing was sealed"
            )
        fields = SealFields(
            shard_id=shard_id,
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
        shard = SealedShard.from_fields(fields, tag)
        now_ns = time.time_ns()
        record = ShardRecord(
            shard, buf, tag, result.unit_digests, tuple(tensors), source=source,
            last_verified_ns=now_ns, last_full_ns=now_ns,
            fast_digest=None if fast is None else fast.digest,
            fast_units=b"" if fast is None else fast.unit_digests,
        )  # fmt: skip
        with self._lock:
            self.check_open()
            self._records[shard.shard_id] = record
            self._records_changed()
        try:
            self.emit(
                VRAM_SEALED,
                shard_id=shard.shard_id,
                vram_bytes=size,
                digest=shard.digest,
                digest_algorithm=digest_algorithm,
                model_ref=model_ref,
                backend=self._backend.name,
            )
        except BaseException:
            # The caller never gets this shard: it must not stay registered (and resident).
            with self._lock:
                if self._records.get(shard.shard_id) is record:
                    del self._records[shard.shard_id]
                    self._records_changed()
            raise
        return shard

    def _fast_digest(self, buf: DeviceBuffer, size: int, shard_id: str) -> HashResult | None:
        """The secondary nh-fast-v1 digest of a shard being sealed (None without ``fast_check``).

        Taken right after the seal's digest, from the same memory: one more memory-speed pass. A
        write between the two passes would be fast-checked as sealed; the full check on its
        cadence (and any ``check="full"``) still sees it. Memory the backend cannot fast-hash
        (an adopted tensor that is not 16-byte aligned, on CUDA) gets no fast digest: it is
        always checked with its seal's digest."""
        if not self._fast_check:
            return None
        try:
            return self._backend.hash(buf, NH_FAST_V1, size, key=self.digest_key(NH_FAST_V1, shard_id))
        except UnsupportedOperation:
            return None

    # -- records moved in and out (migration, offload, restore) --------------------------------
    def register(self, record: ShardRecord, event: str, **fields: Any) -> None:
        """Register an already-filled ``record`` under its existing seal (a restored shard), then
        audit ``event`` with ``fields``; if that write fails the record is unregistered again.

        Fails closed: the record's tag must be this store's tag of the shard's fields, the shard
        must be bound to this store's device, and its id must not be registered already. The
        caller has verified the bytes in ``record.buf`` against the seal and still owns the
        buffer when this raises."""
        if not isinstance(record, ShardRecord):
            raise InvalidInput(f"expected a ShardRecord, not {type(record).__name__}")
        shard = record.shard
        if not self.tag_matches(shard, record):
            raise SealVerificationFailed(
                f"seal tag of shard {shard.shard_id} does not match its fields; not registered",
                shard_id=shard.shard_id,
                tag_valid=False,
            )
        if shard.gpu_device != self._device:
            raise InvalidInput(f"shard is sealed for device {shard.gpu_device}, not {self._device}")
        self._backend.check_policy(record.buf)
        with self._lock:
            self.check_open()
            if shard.shard_id in self._records:
                raise InvalidInput(f"shard {shard.shard_id!r} is registered already")
            self._records[shard.shard_id] = record
            self._records_changed()
        try:
            self.emit(event, **fields)
        except BaseException:
            self.forget(record)
            raise

    def forget(self, record: ShardRecord) -> bool:
        """Unregister ``record`` without touching its buffer: True, or False when something else
        replaced or removed it first. The caller then owns (and frees) ``record.buf``."""
        with self._lock:
            if self._records.get(record.shard.shard_id) is record:
                del self._records[record.shard.shard_id]
                self._records_changed()
                return True
        return False

    def retire(self, record: ShardRecord, *, reason: str) -> bool:
        """Unregister ``record``, zero and free its buffer, audit ``VramDeallocated`` with
        ``reason`` (the bytes now live elsewhere: migrated, offloaded). The caller holds
        ``record.lock``. False (nothing done) when the record was no longer registered."""
        if not self.forget(record):
            return False
        self._free_audited(record, reason=reason)
        return True

    # -- lookup ---------------------------------------------------------------------------------
    def lookup(self, shard: SealedShard) -> ShardRecord:
        """The store's record of ``shard``: InvalidInput for a non-shard, NotSealed for one this
        store does not hold. Hold ``record.lock`` while touching ``record.buf``."""
        if not isinstance(shard, SealedShard):
            raise InvalidInput(f"expected a SealedShard, not {type(shard).__name__}")
        with self._lock:
            self.check_open()
            record = self._records.get(shard.shard_id)
        if record is None:
            raise NotSealed(f"shard {shard.shard_id!r} is not sealed by this manager")
        return record

    def tag_matches(self, shard: SealedShard, record: ShardRecord) -> bool:
        """Both the presented shard and the store's record carry the tag of these exact fields:
        a shard object edited in memory fails here, before any device work."""
        return self._tag_ok(_SEAL_FIELD_VALUES(shard), shard.tag, record)

    def _tag_ok(self, values: tuple[object, ...], tag: bytes, record: ShardRecord) -> bool:
        # ``values`` (the ten seal-v1 field values, read once) and ``tag`` are what a shard
        # presented: the HMAC is checked over exactly these, so that a verify plan made from
        # them holds what was checked, even if the object is edited in place meanwhile.
        #
        # A cached message is reused only for values equal to the cached ones AND of the same
        # exact types: ``==`` alone takes False for 0, 101.0 for 101 and a str subclass that
        # equals everything, none of which seal_message accepts (a cold check refuses them).
        cached = record.checked
        if cached is not None and cached[0] == values and tuple(map(type, values)) == cached[1]:
            message = cached[2]
        else:
            try:
                message = seal_message(SealFields(*values))  # type: ignore[arg-type]
            except InvalidInput:
                return False
        ok = self._key.verify(message, record.tag) and hmac.compare_digest(tag, record.tag)
        if ok and cached is None:
            record.checked = (values, tuple(map(type, values)), message)
        return ok

    # -- verification ---------------------------------------------------------------------------
    def verify_many(
        self,
        shards: Iterable[SealedShard],
        *,
        priority: Priority = "normal",
        check: Check = "full",
        full_every_s: float | None = None,
        before_verdict: Callable[[], None] | None = None,
    ) -> None:
        """Verify every shard: the tags, then ONE ``backend.digest_many`` over all of them, then
        unit digests (one ``hash_many``) only for those whose digest changed, to say where.

        Every shard is audited (``SealVerified`` or ``SealVerificationFailed``); on any failure
        one ``SealVerificationFailed`` names every failed shard (``failures``). Unknown shards
        raise NotSealed and non-shards InvalidInput before anything is verified. ``priority="low"``
        is background verification (the scrubber): see ``backends.base.Priority``.

        ``check="fast"`` compares each shard's keyed fast digest (``ShardRecord.fast_digest``)
        instead of its seal's digest; a shard without one, and (with ``full_every_s``) one whose
        seal digest was last checked ``full_every_s`` or more seconds ago, gets the full check.
        A fast mismatch fails exactly as a full one does, localized with the fast unit digests.
        Every audit event says which check ran (``check``).

        A batch of the same shard objects verified again (a model's shards, verify_model after
        verify_model) reuses what the last successful verify of it worked out (``_VerifyPlan``):
        the lookups, the lock order, the segment table and the expected digests; the tags are not
        recomputed while every object still holds the fields and tag checked then; that check
        runs on the host while the device digests (``digest_many``'s ``while_running``).

        ``before_verdict``: a caller's check that must pass before any verdict, record or audit
        event (``verify_model``'s binding check): it runs before everything else, or, for a
        planned batch, with the plan's tag check while the device digests. Its exception
        propagates, and nothing is concluded."""
        if check not in CHECKS:
            raise InvalidInput(f"check must be one of {CHECKS}, not {check!r}")
        if full_every_s is not None and (
            isinstance(full_every_s, bool)
            or not isinstance(full_every_s, (int, float))
            # NaN and infinity have no nanoseconds (a ValueError or OverflowError below)
            or not 0 <= full_every_s < math.inf
        ):
            raise InvalidInput("full_every_s must be a finite non-negative number or None")
        presented = tuple(shards)
        plan_key = tuple(map(id, presented))
        # A plan holds its presented objects, so an id in its key cannot belong to another object
        # while it is stored: a key that matches names these very objects.
        plan = self._plans.get(plan_key)
        before = _Once(before_verdict)
        if plan is not None and self._verify_planned(plan, priority, check, full_every_s, before):
            return
        before()  # from scratch: first of all (a no-op when the plan's gate ran it already)
        for s in presented:
            if not isinstance(s, SealedShard):
                raise InvalidInput(f"expected SealedShard objects, not {type(s).__name__}")
        # Every record under one hold of the store's lock (``lookup`` of each, in order: the
        # first unknown shard raises NotSealed, as lookup would).
        records: dict[str, ShardRecord] = {}
        with self._lock:
            self.check_open()
            generation = self._generation
            held_records = self._records
            for s in presented:
                sid = s.shard_id
                if sid not in records:
                    record = held_records.get(sid)
                    if record is None:
                        raise NotSealed(f"shard {sid!r} is not sealed by this manager")
                    records[sid] = record
        # Locks in one global order (by shard id), so that concurrent batches cannot deadlock;
        # released in reverse, whatever happens.
        ordered_ids = sorted(records)
        locked: list[threading.Lock] = []
        try:
            for sid in ordered_ids:
                lock = records[sid].lock
                lock.acquire()
                locked.append(lock)
            for sid, rec in records.items():
                if rec.buf.closed:
                    raise NotSealed(f"shard {sid!r} was deallocated")
            checked = self._verify_held(list(presented), records, priority, check, full_every_s)
        finally:
            for lock in reversed(locked):
                lock.release()
        if presented and checked is not None:
            self._keep_plan(plan_key, presented, records, ordered_ids, checked, generation)

    def _keep_plan(
        self,
        key: tuple[int, ...],
        presented: tuple[SealedShard, ...],
        records: dict[str, ShardRecord],
        ordered_ids: list[str],
        checked: tuple[list[tuple[object, ...]], list[bytes]],
        generation: int,
    ) -> None:
        """Keep the plan of a batch that just verified with every tag valid (see _VerifyPlan)."""
        values, tags = checked
        # The digest each record must give: the one its presented fields (checked under the
        # seal tag just now) carry, for the first presentation of each shard id.
        digest_of: dict[str, str] = {}
        for v in values:
            digest_of.setdefault(v[0], v[4])  # type: ignore[arg-type]
        if list(digest_of) != list(records):
            return  # an object was edited between the lookup and the tag check: no plan
        record_list = list(records.values())
        plan = _VerifyPlan(
            generation=generation,
            presented=presented,
            flat_values=list(chain.from_iterable(values)),
            tags=b"".join(tags),
            records=records,
            record_list=record_list,
            bufs=[r.buf for r in record_list],
            locks=[records[sid].lock for sid in ordered_ids],
            segments=[self.segment(r) for r in record_list],
            expected=b"".join(bytes.fromhex(d) for d in digest_of.values()),
        )
        with self._lock:
            if self._closed or self._generation != generation:
                return  # the record set changed since the lookup: the plan may name stale records
            if len(self._plans) >= _MAX_PLANS:
                del self._plans[next(iter(self._plans))]  # the oldest
            self._plans[key] = plan

    def _verify_planned(
        self,
        plan: _VerifyPlan,
        priority: Priority,
        check: Check,
        full_every_s: float | None,
        before: _Once,
    ) -> bool:
        """Verify the batch of ``plan`` with it; False (no verdict, no record, no audit) when the
        plan no longer applies, and the caller verifies from scratch.

        The generation and the records' locks come first; the plan's tag check
        (``_plan_applies``) then runs on the host while the device digests (``_PlanGate``, the
        backend's ``while_running``). The digests are used only when that check passed: a plan
        is used only when every presented object still holds the very field objects and tags
        checked when it was made, and no verdict is given before both the tag check and the
        digest comparison succeed. When the check fails, the digests are discarded unread."""
        with self._lock:
            if self._closed or self._generation != plan.generation:
                # From scratch, which runs ``before`` first and then says what (NotSealed for a
                # closed store), in the order a verify without a plan always had.
                return False
        locked: list[threading.Lock] = []
        try:
            for lock in plan.locks:
                lock.acquire()
                locked.append(lock)
            if any(map(_CLOSED, plan.bufs)):
                # The checks first, as before the overlap: an edited batch is verified from
                # scratch (which then says what it finds), an unedited one names the freed shard.
                before()
                if not _plan_applies(plan):
                    return False
                for sid, rec in plan.records.items():
                    if rec.buf.closed:
                        raise NotSealed(f"shard {sid!r} was deallocated")
            if check == "full":
                return self._verify_full_planned(plan, priority, before)
            gate = _PlanGate(plan, before, audit=False)
            self._verify_held(list(plan.presented), plan.records, priority, check, full_every_s, gate=gate)
            return gate.ok
        finally:
            for lock in reversed(locked):
                lock.release()

    def _verify_full_planned(
        self, plan: _VerifyPlan, priority: Priority, before: _Once | None = None
    ) -> bool:
        # The full check of a planned batch, the caller holding its locks: one digest_many (the
        # tag check and the audit payloads built meanwhile), one constant-time comparison of all
        # digests at once; shard by shard (as _verify_held does) only when something differs, to
        # say which and where. False: the plan does not apply (nothing concluded).
        segments = plan.segments
        audit = self._audit
        gate = _PlanGate(plan, _Once(None) if before is None else before, audit=audit is not None)
        start = time.perf_counter_ns()
        digests = self._gated_digests(segments, priority, gate)
        elapsed_ns = time.perf_counter_ns() - start
        if digests is None:
            return False  # the plan does not apply: the caller verifies from scratch
        if len(digests) != len(segments):
            raise IntegrityViolation(
                "the backend returned a digest count that differs from the segment count"
            )
        matched = hmac.compare_digest(b"".join(digests), plan.expected)
        if not matched or set(map(len, digests)) != _ONLY_32:
            self._conclude(
                list(plan.presented), plan.records, {}, plan.record_list, set(), segments, digests, elapsed_ns
            )
            return True
        now_ns = time.time_ns()
        for rec in plan.record_list:
            rec.last_verified_ns = now_ns
            rec.last_full_ns = now_ns
        if audit is None:
            return True  # no log: nothing is built per shard
        # The fields every record of the batch shares go once, as common fields (the same
        # records as six fields per shard; fewer dicts to build and read). The per-shard
        # payloads were built by the gate while the device worked.
        common = {"check": "full", "duration_ns": elapsed_ns, "batch_shards": len(segments)}
        self._emit_verified(gate.batch, common)
        return True

    def _gated_digests(
        self, segments: list[Segment], priority: Priority, gate: _PlanGate
    ) -> list[bytes] | None:
        """``digest_many`` of ``segments`` with a plan's tag check (``gate``) running while the
        device digests; None when the plan turns out not to apply (the digests are discarded
        unread, and the caller verifies from scratch). The check always runs before any verdict:
        after the call when there was nothing to digest or the backend did not call it, and when
        the backend failed before queuing (``_PlanGate.stale_after``)."""
        try:
            digests = (
                self._backend.digest_many(segments, priority=priority, while_running=gate) if segments else []
            )
        except Exception as exc:
            if gate.stale_after(exc):
                return None
            raise
        if not gate.ran:
            gate()
        return digests if gate.ok else None

    def verify_held(self, shard: SealedShard, record: ShardRecord) -> None:
        """Verify one shard whose ``record.lock`` the caller already holds (repair does)."""
        self._verify_held([shard], {shard.shard_id: record})

    def _plan_check(self, record: ShardRecord, check: Check, full_every_ns: int | None, now_ns: int) -> bool:
        """True when ``record`` gets the fast check this time."""
        if check != "fast" or record.fast_digest is None:
            return False
        if record.shard.digest_algorithm == NH_FAST_V1:
            return False  # its seal digest is the fast one: checking it is the full check
        return full_every_ns is None or now_ns - record.last_full_ns < full_every_ns

    def _verify_held(
        self,
        presented: list[SealedShard],
        records: dict[str, ShardRecord],
        priority: Priority = "normal",
        check: Check = "full",
        full_every_s: float | None = None,
        *,
        gate: _PlanGate | None = None,
    ) -> tuple[list[tuple[object, ...]], list[bytes]] | None:
        """Verify ``presented`` (their ``records`` locked by the caller); raises on any failure.
        Returns the field values and tags whose seal tags it checked (all valid), or None when
        ``gate`` (a verify plan's tag check, run while the device digests) checks them instead:
        then nothing is concluded, recorded or audited unless ``gate.ok`` after the call."""
        failures: dict[str, ShardFailure] = {}
        checked: tuple[list[tuple[object, ...]], list[bytes]] | None = None
        if gate is None:
            values = list(map(_SEAL_FIELD_VALUES, presented))
            tags = list(map(_TAG, presented))
            for s, v, t in zip(presented, values, tags, strict=True):
                if s.shard_id not in failures and not self._tag_ok(v, t, records[s.shard_id]):
                    failures[s.shard_id] = ShardFailure(s.shard_id, tag_valid=False)
            checked = (values, tags)
        todo = [r for sid, r in records.items() if sid not in failures]
        full_every_ns = None if full_every_s is None else int(full_every_s * 1e9)
        plan_ns = time.time_ns()
        # (A full check plans no fast one: skip the per-shard call.)
        fast_ids = (
            {r.shard.shard_id for r in todo if self._plan_check(r, check, full_every_ns, plan_ns)}
            if check == "fast"
            else set()
        )
        segments = (
            [self.segment(r, NH_FAST_V1 if r.shard.shard_id in fast_ids else None) for r in todo]
            if fast_ids
            else [self.segment(r) for r in todo]
        )
        start = time.perf_counter_ns()
        if gate is None:
            digests = self._backend.digest_many(segments, priority=priority) if segments else []
        else:
            gated = self._gated_digests(segments, priority, gate)
            if gated is None:
                return None  # gate.ok is False: the caller verifies from scratch
            digests = gated
        elapsed_ns = time.perf_counter_ns() - start
        if len(digests) != len(segments):
            raise IntegrityViolation(
                "the backend returned a digest count that differs from the segment count"
            )
        self._conclude(presented, records, failures, todo, fast_ids, segments, digests, elapsed_ns)
        return checked

    def _conclude(
        self,
        presented: list[SealedShard],
        records: dict[str, ShardRecord],
        failures: dict[str, ShardFailure],
        todo: list[ShardRecord],
        fast_ids: set[str],
        segments: list[Segment],
        digests: list[bytes],
        elapsed_ns: int,
    ) -> None:
        # Compare the digests of ``todo`` (``segments``, in order) with what they must be, find
        # where the changed ones changed, record the successes, audit every shard, and raise one
        # SealVerificationFailed naming every failure (``failures`` holds the tag failures).
        events: list[tuple[str, dict[str, Any]]] = []

        def expected_of(r: ShardRecord) -> tuple[str, bytes]:
            # (digest hex, unit digests) the check of `r` compares against.
            if r.shard.shard_id in fast_ids:
                assert r.fast_digest is not None  # _plan_check
                return r.fast_digest.hex(), r.fast_units
            return r.shard.digest, r.unit_digests

        def segment_of(r: ShardRecord) -> Segment:
            return self.segment(r, NH_FAST_V1 if r.shard.shard_id in fast_ids else None)

        compare = hmac.compare_digest
        pairs = zip(todo, digests, strict=True)
        if fast_ids:
            bad = [(r, d.hex()) for r, d in pairs if not compare(d.hex(), expected_of(r)[0])]
        else:  # every shard against its seal's digest (expected_of, without the call per shard)
            bad = [(r, d.hex()) for r, d in pairs if not compare(d.hex(), r.shard.digest)]
        if bad:
            # Cost on a mismatch only: unit digests of the changed shards, batched as well.
            results = self._backend.hash_many([segment_of(r) for r, _ in bad])
            for (r, actual), result in zip(bad, results, strict=True):
                want, units = expected_of(r)
                ranges = merge_ranges(changed_units(units, result.unit_digests), r.shard.vram_bytes)
                failures[r.shard.shard_id] = ShardFailure(
                    r.shard.shard_id, want, actual, tuple(ranges), tuple(r.tensors_in(ranges))
                )
        ordered = list(dict.fromkeys(s.shard_id for s in presented))
        audit = self._audit
        now_ns = time.time_ns()
        for sid in ordered:
            if sid not in failures:
                rec = records[sid]
                rec.last_verified_ns = now_ns
                if sid not in fast_ids:
                    rec.last_full_ns = now_ns
        if audit is None and not failures:
            return  # every shard matched and there is no log to write their records to
        for sid in ordered:
            f = failures.get(sid)
            sealed = records[sid].shard
            ran: Check = "fast" if sid in fast_ids else "full"
            if f is None:
                if audit is None:
                    continue  # nothing would be written: skip building the record
                events.append((SEAL_VERIFIED, {
                    "shard_id": sid,
                    "vram_bytes": sealed.vram_bytes,
                    "digest_algorithm": sealed.digest_algorithm,
                    "check": ran,
                    "duration_ns": elapsed_ns,
                    "batch_shards": len(segments),
                }))  # fmt: skip
            elif not f.tag_valid:
                events.append((SEAL_VERIFICATION_FAILED, {
                    "critical": True,
                    "shard_id": sid,
                    "reason": "tag mismatch",
                    "expected_digest": sealed.digest,
                    "actual_digest": "",
                    "corrupted_ranges": [],
                }))  # fmt: skip
            else:
                events.append((SEAL_VERIFICATION_FAILED, {
                    "critical": True,
                    "shard_id": sid,
                    "reason": "fast digest mismatch" if ran == "fast" else "digest mismatch",
                    "check": ran,
                    "expected_digest": f.expected_digest,
                    "actual_digest": f.actual_digest,
                    "corrupted_ranges": [list(r) for r in f.corrupted_ranges],
                    "corrupted_tensors": list(f.corrupted_tensors),
                }))  # fmt: skip
        if not failures:
            # Every event is a SealVerified record (in shard order): one batch.
            self._emit_verified([fields for _, fields in events])
            return
        # Failures are written first: they are the evidence, and must not wait behind (or be
        # lost to) a failed write of a success record.
        events.sort(key=lambda e: e[0] != SEAL_VERIFICATION_FAILED)
        audit_exc: Exception | None = None
        for name, fields in events:
            try:
                self.emit(name, **fields)
            except Exception as exc:
                if audit_exc is None:
                    audit_exc = exc
                if not failures:
                    raise
        if not failures:
            return
        error = _failure_error([failures[sid] for sid in ordered if sid in failures])
        if audit_exc is not None:
            error.audit_error = audit_exc
            _note_audit_failure(error, audit_exc)
            raise error from audit_exc
        raise error

    def last_verified_ns(self) -> dict[str, int]:
        """Each shard's last successful verification (seal, verify or attest), ns since the epoch."""
        with self._lock:
            return {sid: r.last_verified_ns for sid, r in self._records.items()}

    # -- release --------------------------------------------------------------------------------
    def deallocate(self, shard: SealedShard) -> None:
        """Zero and free the shard's device memory (adopted memory: forget it) and its seal."""
        record = self.lookup(shard)
        with record.lock:
            with self._lock:
                if self._records.get(shard.shard_id) is not record:
                    raise NotSealed(f"shard {shard.shard_id!r} was deallocated")
                del self._records[shard.shard_id]
                self._records_changed()
            self._free_audited(record)

    def _free_audited(self, record: ShardRecord, **fields: Any) -> None:
        # Zero and free the buffer of a record just unregistered, then audit VramDeallocated.
        # A free that raises (a host view still held: the memory is zeroed and given back, the
        # mapping lives on with the view) still removed the shard: audited all the same, as
        # close() does, and the free's error raised.
        shard = record.shard
        try:
            record.buf.close()
        except BaseException as exc:
            try:
                self.emit(VRAM_DEALLOCATED, shard_id=shard.shard_id, vram_bytes=shard.vram_bytes, **fields)
            except Exception as audit_exc:
                _note_audit_failure(exc, audit_exc)
            raise
        self.emit(VRAM_DEALLOCATED, shard_id=shard.shard_id, vram_bytes=shard.vram_bytes, **fields)

    def close(self, *, drain: Callable[[], None] | None = None) -> None:
        """Zero and free every shard, then release the backend. Idempotent.

        ``drain`` runs once the operations in flight (``in_flight``: seals, offloads, restores)
        have ended and before anything is freed: what they made outside the store (offloaded
        copies) is then complete, and no new one can start. Its error is raised after the
        shards and the backend are released."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._inflight:
                self._idle.wait()
            records = list(self._records.values())
            self._records.clear()
            self._records_changed()
        errors: list[BaseException] = []
        if drain is not None:
            try:
                drain()
            except BaseException as exc:  # the shards and the backend are released all the same
                errors.append(exc)
        # Every step runs whatever the one before raised, a Ctrl-C (KeyboardInterrupt) included:
        # close() is idempotent, so a shard skipped now would stay resident (unzeroed) for good.
        for record in records:
            with record.lock:
                try:
                    record.buf.close()
                except BaseException as exc:  # keep freeing the rest; report afterwards
                    errors.append(exc)
            shard = record.shard
            try:
                self.emit(VRAM_DEALLOCATED, shard_id=shard.shard_id, vram_bytes=shard.vram_bytes)
            except BaseException as exc:  # a failed audit log must not keep the other shards resident
                errors.append(exc)
        try:
            self._backend.close()
        except BaseException as exc:
            errors.append(exc)
        if errors:
            # An interruption is raised before any error: the caller asked to stop.
            raise next((e for e in errors if not isinstance(e, Exception)), errors[0])


def _failure_error(failures: list[ShardFailure]) -> SealVerificationFailed:
    def describe(f: ShardFailure) -> str:
        if not f.tag_valid:
            return f"seal tag of shard {f.shard_id} does not match its fields"
        rs = f.corrupted_ranges
        where = ", ".join(f"[{s}, {e})" for s, e in rs[:8]) + (" ..." if len(rs) > 8 else "")
        named = f"; tensors: {', '.join(f.corrupted_tensors[:8])}" if f.corrupted_tensors else ""
        return (
            f"shard {f.shard_id}: digest of device memory changed "
            f"(expected {f.expected_digest}, got {f.actual_digest}); changed bytes in {where}{named}"
        )

    first = failures[0]
    message = describe(first)
    if len(failures) > 1:
        message = f"{len(failures)} shards failed verification: " + "; ".join(
            describe(f) for f in failures[:16]
        )
        if len(failures) > 16:
            message += f"; ... and {len(failures) - 16} more"
    return SealVerificationFailed(
        message,
        shard_id=first.shard_id,
        expected_digest=first.expected_digest,
        actual_digest=first.actual_digest,
        corrupted_ranges=first.corrupted_ranges,
        corrupted_tensors=first.corrupted_tensors,
        tag_valid=first.tag_valid,
        failures=failures,
    )
