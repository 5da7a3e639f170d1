"""The ``seal-v1`` message and tag (``specs/seal-v1.md``) and JSON seal records.

The message is a domain string followed by ten length-prefixed ``name, value`` fields, so that no
two different sets of fields can encode to the same bytes (the starting design concatenated
fields without lengths).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from vram_residency.errors import InvalidInput
from vram_residency.formats._fields import check_int as _check_int
from vram_residency.formats._fields import check_utf8 as _check_utf8
from vram_residency.formats._fields import field as _field
from vram_residency.formats.keys import SEAL_KEY_INFO, SecretKey
from vram_residency.formats.tree import SEAL_ALGORITHMS

__all__ = ["SEAL_DOMAIN", "SealFields", "seal_key", "seal_message", "seal_tag", "verify_tag"]

SEAL_DOMAIN: Final = b"llorch-vram-seal-v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SealFields:
    """The ten public fields a seal covers, in spec order."""

    shard_id: str
    gpu_device: int
    vram_bytes: int
    digest_algorithm: str
    digest: str  # 64 lower-case hex characters
    sealed_at_ns: int
    worker_id: str
    model_ref: str | None
    shard_index: int | None
    total_shards: int | None

    def validate(self) -> None:
        if not isinstance(self.shard_id, str) or not self.shard_id:
            raise InvalidInput("shard_id must be a non-empty string")
        _check_utf8("shard_id", self.shard_id)
        _check_int("gpu_device", self.gpu_device, _U32)
        _check_int("vram_bytes", self.vram_bytes, _U64)
        if self.digest_algorithm not in SEAL_ALGORITHMS:
            raise InvalidInput(f"unknown digest_algorithm {self.digest_algorithm!r}")
        if not isinstance(self.digest, str) or not _HEX64.fullmatch(self.digest):
            raise InvalidInput("digest must be 64 lower-case hex characters")
        _check_int("sealed_at_ns", self.sealed_at_ns, _U64)
        if not isinstance(self.worker_id, str):
            raise InvalidInput("worker_id must be a string")
        _check_utf8("worker_id", self.worker_id)
        if self.model_ref is not None and (not isinstance(self.model_ref, str) or not self.model_ref):
            raise InvalidInput("model_ref must be a non-empty string or None")
        if self.model_ref is not None:
            _check_utf8("model_ref", self.model_ref)
        for name in ("shard_index", "total_shards"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, _U64)
        if (self.shard_index is None) != (self.total_shards is None):
            raise InvalidInput("shard_index and total_shards must be given together")
        if (
            self.shard_index is not None
            and self.total_shards is not None
            and (self.total_shards < 1 or self.shard_index >= self.total_shards)
        ):
            raise InvalidInput("shard_index must be < total_shards, and total_shards >= 1")


def _opt_u64(value: int | None) -> bytes:
    return b"" if value is None else value.to_bytes(8, "little")


def seal_message(f: SealFields) -> bytes:
    """The exact bytes that ``seal-v1`` tags."""
    f.validate()
    return SEAL_DOMAIN + b"".join(
        (
            _field("shard_id", f.shard_id.encode("utf-8")),
            _field("gpu_device", f.gpu_device.to_bytes(4, "little")),
            _field("vram_bytes", f.vram_bytes.to_bytes(8, "little")),
            _field("digest_algorithm", f.digest_algorithm.encode("utf-8")),
            _field("digest", bytes.fromhex(f.digest)),
            _field("sealed_at_ns", f.sealed_at_ns.to_bytes(8, "little")),
            _field("worker_id", f.worker_id.encode("utf-8")),
            _field("model_ref", b"" if f.model_ref is None else f.model_ref.encode("utf-8")),
            _field("shard_index", _opt_u64(f.shard_index)),
            _field("total_shards", _opt_u64(f.total_shards)),
        )
    )


def seal_key(token: str | bytes) -> SecretKey:
    """``K = HKDF-SHA256(token, salt=none, info="llorch-vram-seal-v1", L=32)``."""
    return SecretKey.from_token(token, SEAL_KEY_INFO)


def seal_tag(key: SecretKey, fields: SealFields) -> bytes:
    return key.tag(seal_message(fields))


def verify_tag(key: SecretKey, fields: SealFields, tag: bytes) -> bool:
    """Constant-time check of a seal tag. Malformed fields count as a failed check."""
    try:
        message = seal_message(fields)
    except InvalidInput:
        return False
    return key.verify(message, tag)


def fields_from_record(record: dict[str, Any]) -> tuple[SealFields, bytes]:
    """Parse a JSON seal record (as ``SealedShard.record()`` writes) into fields and tag."""
    if not isinstance(record, dict):
        raise InvalidInput("seal record must be a JSON object")
    if record.get("format") != "seal-v1":
        raise InvalidInput("seal record format must be 'seal-v1'")
    try:
        fields = SealFields(
            shard_id=record["shard_id"],
            gpu_device=record["gpu_device"],
            vram_bytes=record["vram_bytes"],
            digest_algorithm=record["digest_algorithm"],
            digest=record["digest"],
            sealed_at_ns=record["sealed_at_ns"],
            worker_id=record["worker_id"],
            model_ref=record["model_ref"],
            shard_index=record["shard_index"],
            total_shards=record["total_shards"],
        )
        tag_hex = record["signature"]
    except KeyError as exc:
        raise InvalidInput(f"seal record lacks field {exc.args[0]!r}") from None
    if not isinstance(tag_hex, str) or not _HEX64.fullmatch(tag_hex):
        raise InvalidInput("seal record signature must be 64 lower-case hex characters")
    fields.validate()
    return fields, bytes.fromhex(tag_hex)


def record_from_fields(fields: SealFields, tag: bytes) -> dict[str, Any]:
    return {
        "format": "seal-v1",
        "shard_id": fields.shard_id,
        "gpu_device": fields.gpu_device,
        "vram_bytes": fields.vram_bytes,
        "digest_algorithm": fields.digest_algorithm,
        "digest": fields.digest,
        "sealed_at_ns": fields.sealed_at_ns,
        "worker_id": fields.worker_id,
        "model_ref": fields.model_ref,
        "shard_index": fields.shard_index,
        "total_shards": fields.total_shards,
        "signature": tag.hex(),
    }
