"""The tensor-parallel model record, ``tp-record-v1`` (``docs/specs/tp-record-v1.md``).

A model split over ``W`` ranks is sealed as ``W`` parts, one per rank, each part made of that
rank's ``seal-v1`` shards in order. The record binds them: one HMAC-SHA256 tag, under a key of its
own derived from the worker token, over the model name, the world size and, for every rank in
order, its rank number, device, worker id and the ordered seal tags of its shards. Each seal tag in
turn covers every field of its shard (digest included), so a part that is missing, swapped
between ranks, reordered, padded or replaced changes the tagged bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from vram_residency.errors import InvalidInput, SealVerificationFailed
from vram_residency.formats import encode_field as _field
from vram_residency.formats.keys import SecretKey
from vram_residency.shard import SealedShard, check_seal_record

__all__ = [
    "TP_RECORD_DOMAIN",
    "TP_RECORD_FORMAT",
    "TP_RECORD_KEY_INFO",
    "RankPart",
    "TPRecord",
    "check_tp_record",
    "tp_key",
    "tp_message",
]

TP_RECORD_FORMAT: Final = "tp-record-v1"
TP_RECORD_DOMAIN: Final = b"llorch-vram-tp-record-v1"
#: Its own HKDF info: a tp-record tag can never pass as a seal-v1 or audit tag, nor the reverse.
TP_RECORD_KEY_INFO: Final = b"llorch-vram-tp-record-v1"
_U32: Final = (1 << 32) - 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
#: A sanity bound, far above any real tensor-parallel group, so that a hostile record cannot make
#: the checker allocate without limit before the tag is checked.
MAX_WORLD_SIZE: Final = 1 << 16


def tp_key(token: str | bytes) -> SecretKey:
    """``K_tp = HKDF-SHA256(token, salt=none, info="llorch-vram-tp-record-v1", L=32)``."""
    return SecretKey.from_token(token, TP_RECORD_KEY_INFO)


def _u32(name: str, value: object) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U32:
        raise InvalidInput(f"{name} must be an integer in [0, {_U32}]")
    return value.to_bytes(4, "little")


def _utf8(name: str, value: object, *, empty_ok: bool) -> bytes:
    if not isinstance(value, str) or (not value and not empty_ok):
        raise InvalidInput(f"{name} must be a {'' if empty_ok else 'non-empty '}string")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{name} is not encodable as UTF-8") from None


@dataclass(frozen=True, slots=True)
class RankPart:
    """One rank's part of a tensor-parallel model: its rank, device, worker id and shards in order."""

    rank: int
    device: int
    worker_id: str
    shards: tuple[SealedShard, ...]

    def part_bytes(self) -> bytes:
        """This part's fields as ``tp-record-v1`` encodes them (what each rank contributes)."""
        if not self.shards:
            raise InvalidInput(f"rank {self.rank} has no shards")
        out = [
            _field("rank", _u32("rank", self.rank)),
            _field("device", _u32("device", self.device)),
            _field("worker_id", _utf8("worker_id", self.worker_id, empty_ok=True)),
            _field("shards", _u32("shard count", len(self.shards))),
        ]
        for s in self.shards:
            if len(s._signature) != 32:
                raise InvalidInput(f"shard {s.shard_id} carries no seal tag")
            out.append(_field("seal", s._signature))
        return b"".join(out)

    def record(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "device": self.device,
            "worker_id": self.worker_id,
            "seals": [s.record() for s in self.shards],
        }


def tp_message(model_name: str, parts: Sequence[RankPart]) -> bytes:
    """The exact bytes that ``tp-record-v1`` tags. Parts must be ranks ``0 .. W-1`` in order."""
    name = _utf8("model_name", model_name, empty_ok=False)
    if not parts:
        raise InvalidInput("a tensor-parallel model needs at least one rank")
    if len(parts) > MAX_WORLD_SIZE:
        raise InvalidInput(f"world size {len(parts)} exceeds {MAX_WORLD_SIZE}")
    for i, p in enumerate(parts):
        if p.rank != i:
            raise InvalidInput(f"part {i} is rank {p.rank}: parts must be ranks 0 .. W-1 in order")
    return (
        TP_RECORD_DOMAIN
        + _field("model_name", name)
        + _field("world_size", _u32("world_size", len(parts)))
        + b"".join(p.part_bytes() for p in parts)
    )


@dataclass(frozen=True, slots=True)
class TPRecord:
    """A checked (or freshly made) tensor-parallel model record. The tag is not in ``repr``."""

    model_name: str
    parts: tuple[RankPart, ...]
    _signature: bytes = b""

    @property
    def world_size(self) -> int:
        return len(self.parts)

    @property
    def signature(self) -> str:
        return self._signature.hex()

    def __repr__(self) -> str:
        shards = sum(len(p.shards) for p in self.parts)
        return f"TPRecord(model_name={self.model_name!r}, world_size={self.world_size}, shards={shards})"

    @classmethod
    def make(cls, key: SecretKey, model_name: str, parts: Sequence[RankPart]) -> TPRecord:
        parts = tuple(parts)
        return cls(model_name, parts, key.tag(tp_message(model_name, parts)))

    def record(self) -> dict[str, Any]:
        """JSON-ready: every rank's part with its seal records, and the tag in hex."""
        return {
            "format": TP_RECORD_FORMAT,
            "model_name": self.model_name,
            "world_size": self.world_size,
            "parts": [p.record() for p in self.parts],
            "signature": self._signature.hex(),
        }


def check_tp_record(record: dict[str, Any], worker_token: str | bytes) -> TPRecord:
    """Check a ``tp-record-v1`` record with the worker token; what an orchestrator runs.

    Checks, in order: the shape of the record; ``world_size`` equals the number of parts and part
    ``i`` is rank ``i`` (a missing, extra or reordered rank fails here); every seal record's own
    ``seal-v1`` tag; every seal's ``gpu_device`` and ``worker_id`` equal its part's; and last the
    record's tag over all of it (a part moved to another rank, or any edited field, fails here).
    Raises ``InvalidInput`` for a malformed record and ``SealVerificationFailed`` for one that does
    not check.
    """
    if not isinstance(record, dict) or record.get("format") != TP_RECORD_FORMAT:
        raise InvalidInput(f"tp record must be a JSON object of format {TP_RECORD_FORMAT!r}")
    name, world, raw_parts, sig = (
        record.get("model_name"),
        record.get("world_size"),
        record.get("parts"),
        record.get("signature"),
    )
    _utf8("model_name", name, empty_ok=False)
    assert isinstance(name, str)
    if isinstance(world, bool) or not isinstance(world, int) or not 1 <= world <= MAX_WORLD_SIZE:
        raise InvalidInput(f"world_size must be an integer in [1, {MAX_WORLD_SIZE}]")
    if not isinstance(raw_parts, list):
        raise InvalidInput("tp record needs a list of parts")
    if not isinstance(sig, str) or not _HEX64.fullmatch(sig):
        raise InvalidInput("tp record signature must be 64 lower-case hex characters")
    if len(raw_parts) != world:
        raise SealVerificationFailed(
            f"tp record of {name!r}: world_size {world} but {len(raw_parts)} rank parts "
            "(a rank is missing or extra)",
            tag_valid=False,
        )
    parts: list[RankPart] = []
    for i, p in enumerate(raw_parts):
        if not isinstance(p, dict) or not isinstance(p.get("seals"), list) or not p["seals"]:
            raise InvalidInput(f"part {i} of the tp record needs a non-empty list of seals")
        # Each seal is the object RankPart.record writes (the doc's SEAL-RECORD), never its JSON
        # text, though check_seal_record alone takes both: a record has one spelling, and a client
        # built from the doc refuses the text.
        if not all(isinstance(s, dict) for s in p["seals"]):
            raise InvalidInput(f"part {i} of the tp record: each seal must be a seal-v1 JSON object")
        rank, device, worker_id = p.get("rank"), p.get("device"), p.get("worker_id")
        _u32("rank", rank)
        _u32("device", device)
        _utf8("worker_id", worker_id, empty_ok=True)
        if rank != i:
            raise SealVerificationFailed(
                f"tp record of {name!r}: part {i} is rank {rank} (ranks missing, extra or swapped)",
                tag_valid=False,
            )
        shards = tuple(check_seal_record(s, worker_token) for s in p["seals"])
        for s in shards:
            if s.gpu_device != device or s.worker_id != worker_id:
                raise SealVerificationFailed(
                    f"tp record of {name!r}: shard {s.shard_id} of rank {i} was sealed on device "
                    f"{s.gpu_device} by worker {s.worker_id!r}, not the part's",
                    shard_id=s.shard_id,
                    tag_valid=False,
                )
        parts.append(RankPart(i, device, worker_id, shards))  # type: ignore[arg-type]  # checked above
    tag = bytes.fromhex(sig)
    if not tp_key(worker_token).verify(tp_message(name, parts), tag):
        raise SealVerificationFailed(
            f"tp record of {name!r}: tag does not match (wrong token, or an edited, reordered or "
            "replaced part)",
            tag_valid=False,
        )
    return TPRecord(name, tuple(parts), tag)
