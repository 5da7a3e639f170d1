"""``SealedShard``: the public face of one sealed allocation, and seal-record checks."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

from vram_residency._strictjson import unique_keys
from vram_residency.errors import InvalidInput, SealVerificationFailed
from vram_residency.formats.seal import (
    SealFields,
    fields_from_record,
    record_from_fields,
    seal_key,
    verify_tag,
)

__all__ = ["SealedShard", "check_seal_record", "parse_record_text"]


@dataclasses.dataclass(frozen=True, slots=True)
class SealedShard:
    """A shard sealed in device memory.

    The public fields are exactly the ones the ``seal-v1`` tag covers. The tag itself is kept
    private: it is excluded from ``repr``, ``str`` and equality, and never logged. The device
    allocation is not reachable from here at all: the manager that sealed the shard holds it.
    """

    shard_id: str
    gpu_device: int
    vram_bytes: int
    digest: str
    digest_algorithm: str
    sealed_at_ns: int
    worker_id: str
    model_ref: str | None = None
    shard_index: int | None = None
    total_shards: int | None = None
    _signature: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    @property
    def sealed_at(self) -> datetime:
        """Seal time as an aware UTC datetime (microsecond precision)."""
        return datetime.fromtimestamp(self.sealed_at_ns / 1e9, tz=UTC)

    def fields(self) -> SealFields:
        return SealFields(
            shard_id=self.shard_id,
            gpu_device=self.gpu_device,
            vram_bytes=self.vram_bytes,
            digest_algorithm=self.digest_algorithm,
            digest=self.digest,
            sealed_at_ns=self.sealed_at_ns,
            worker_id=self.worker_id,
            model_ref=self.model_ref,
            shard_index=self.shard_index,
            total_shards=self.total_shards,
        )

    def record(self) -> dict[str, Any]:
        """A JSON-ready seal record (public fields and the tag in hex) for attestation.

        Whoever holds the worker token can check it with :func:`check_seal_record`."""
        return record_from_fields(self.fields(), self._signature)

    @property
    def tag(self) -> bytes:
        """The ``seal-v1`` tag (the record's ``signature``, in bytes). Not secret, but kept out of
        ``repr``, ``str`` and equality so that it is never logged by accident."""
        return self._signature

    @classmethod
    def from_fields(cls, fields: SealFields, tag: bytes) -> SealedShard:
        """The shard of checked ``fields`` and their ``tag``; only the seal core and
        :func:`check_seal_record` make one (a tag that does not match fails verification)."""
        return cls(
            shard_id=fields.shard_id,
            gpu_device=fields.gpu_device,
            vram_bytes=fields.vram_bytes,
            digest=fields.digest,
            digest_algorithm=fields.digest_algorithm,
            sealed_at_ns=fields.sealed_at_ns,
            worker_id=fields.worker_id,
            model_ref=fields.model_ref,
            shard_index=fields.shard_index,
            total_shards=fields.total_shards,
            _signature=tag,
        )


def parse_record_text(record: str | bytes | bytearray, what: str = "seal record") -> dict[str, Any]:
    """A JSON record given as text, parsed strictly: one JSON object, no duplicate keys (a
    repeated key would let two parsers read different values from the same signed text)."""
    no_duplicates = unique_keys(lambda key: InvalidInput(f"duplicate key {key!r} in the {what}"))
    try:
        parsed = json.loads(record, object_pairs_hook=no_duplicates)
    except InvalidInput:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return parsed


def check_seal_record(record: dict[str, Any] | str | bytes, worker_token: str | bytes) -> SealedShard:
    """Check a seal record's tag with the worker token; what an orchestrator runs.

    ``record`` is the dict of :meth:`SealedShard.record` or its JSON text. Returns the record as
    a ``SealedShard`` (without any device memory behind it). Raises ``InvalidInput`` for a
    malformed record, ``ConfigError`` for an unusable token, and ``SealVerificationFailed`` when
    the tag does not match.
    """
    if isinstance(record, (str, bytes, bytearray)):
        record = parse_record_text(record)
    fields, tag = fields_from_record(record)
    if not verify_tag(seal_key(worker_token), fields, tag):
        raise SealVerificationFailed(
            "seal record tag does not match (wrong token or edited record)",
            shard_id=fields.shard_id,
            tag_valid=False,
        )
    return SealedShard.from_fields(fields, tag)
