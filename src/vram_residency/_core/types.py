"""Small value types of the seal core, shared by the manager, the sources and the service."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

from vram_residency.backends.base import DeviceBuffer, Segment
from vram_residency.shard import SealedShard

__all__ = ["DEFAULT_MAX_TENSORS", "AuditSink", "BatchAuditSink", "ShardRecord", "TensorSpan"]

#: The most tensors one header (safetensors or GGUF) or one model may list, unless the manager is
#: given another ``max_tensors``. The largest public checkpoints list about 90k (DeepSeek-V3) and
#: 140k (Kimi-K2) tensors, weights and scales of every expert; 2**18 leaves room above them. The
#: 100 MB header cap alone does not bound the work: a header of 1,000,000 one-byte tensors is
#: 68 MB and took 13 s and 1 GiB of memory to parse (measured on the 2-core CI machine); a header
#: at this bound takes about 2.5 s and 0.3 GiB, and one past it is refused there. A model of
#: 100,000 adopted tensors took 10 s to seal, and its record was 54 MB.
DEFAULT_MAX_TENSORS: Final = 262_144


class AuditSink(Protocol):
    """What the seal core needs of an audit log (``vram_residency.audit.AuditLog`` is one)."""

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> Any: ...


@runtime_checkable
class BatchAuditSink(AuditSink, Protocol):
    """An audit sink that also takes a batch of one event type (``AuditLog.emit_many``): what
    ``emit(event_type, **common, **f)`` for each ``f`` in turn would write, at less cost per
    event. The store's verify path uses it for its one SealVerified record per shard."""

    def emit_many(
        self,
        event_type: str,
        fields: Iterable[Mapping[str, Any]],
        *,
        critical: bool | None = None,
        common: Mapping[str, Any] | None = None,
    ) -> Any: ...


@dataclass(frozen=True, slots=True)
class TensorSpan:
    """A named byte range of a shard (a tensor of a safetensors/GGUF file or a framework)."""

    name: str
    start: int
    end: int


@dataclass(slots=True, eq=False)
class ShardRecord:
    """What the store keeps per sealed shard: the device buffer, the tag it issued, the unit
    digests taken at seal time (for localization and repair), the tensor index and the source.

    ``lock`` serializes everything that reads or writes the shard's memory (verify, repair,
    deallocate, fault injection); hold it while using ``buf``."""

    shard: SealedShard
    buf: DeviceBuffer
    tag: bytes
    unit_digests: bytes
    tensors: tuple[TensorSpan, ...] = ()
    lock: threading.Lock = field(default_factory=threading.Lock)
    source: Any = None
    #: When the device memory last matched the seal (time.time_ns): set at seal and at every
    #: successful verify or attestation; the seal-age policy reads it.
    last_verified_ns: int = 0
    #: The secondary keyed fast check (``nh-fast-v1`` under the shard's key), taken from the
    #: device memory at seal time when the store has ``fast_check``: its digest and unit digests
    #: (None: no fast digest; the shard is always checked with its seal's digest). Not part of
    #: the seal tag: it is a cheaper proxy for the sealed digest, which the full check re-checks.
    fast_digest: bytes | None = None
    fast_units: bytes = b""
    #: When the seal's own (cryptographic) digest last matched (time.time_ns): the cadence of
    #: ``verify_many(check="fast", full_every_s=...)`` reads it.
    last_full_ns: int = 0
    #: The fields whose tag was last checked (the ten seal-v1 field values, in ``SealFields``
    #: order, as a plain tuple: comparing two costs one C call), their exact types, and their
    #: seal-v1 message. A verify recomputes the HMAC every time; only the message's encoding is
    #: reused when the presented fields are equal to these and of the same types (``==`` alone
    #: takes False for 0), which is most of the per-shard cost of a batched verify.
    checked: tuple[tuple[object, ...], tuple[type, ...], bytes] | None = None
    #: The segment-table entries of this record, by algorithm (``ShardStore.segment``), made once:
    #: the buffer, length and key of a record never change. Not copied by ``dataclasses.replace``
    #: (a restored record has a new buffer), and each use checks it still names ``buf``. Holds a
    #: keyed entry's key: never shown (``repr=False``).
    segments: dict[str, Segment] = field(default_factory=dict, init=False, repr=False)

    def tensors_in(self, ranges: list[tuple[int, int]]) -> list[str]:
        """Names of the tensors overlapping any of ``ranges``, in index order."""
        return [t.name for t in self.tensors if any(t.start < e and s < t.end for s, e in ranges)]
