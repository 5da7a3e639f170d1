"""The ``attest-v1`` statement (``specs/attest-v1.md``): keys, message, tag and JSON form.

An attestation says what a worker's shards are *now*: for an orchestrator's nonce, the digest the
worker recomputed from device memory for each shard, optionally a BLAKE3 probe keyed by the
nonce, all tagged under ``KA`` (HKDF of the worker token). The encoding reuses ``seal-v1``'s
length-prefixed fields, so no two statements encode to the same bytes.

Pure: no I/O, no device. The orchestrator's checks live in :mod:`vram_residency.attest`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from vram_residency.errors import InvalidInput
from vram_residency.formats._fields import check_int as _check_int
from vram_residency.formats._fields import check_utf8 as _check_utf8
from vram_residency.formats._fields import field as _field
from vram_residency.formats.keys import SecretKey

__all__ = [
    "ATTEST_DOMAIN",
    "ATTEST_KEY_INFO",
    "MAX_NONCE_BYTES",
    "MIN_NONCE_BYTES",
    "AttestedShard",
    "Statement",
    "attest_key",
    "attest_message",
    "attest_tag",
    "check_nonce",
    "probe_key",
    "statement_from_json",
    "statement_to_json",
    "verify_statement_tag",
]

ATTEST_DOMAIN: Final = b"llorch-vram-attest-v1"
#: HKDF info of ``KA``: the same string as the message domain, as the spec fixes it. Being a
#: different info from the seal and audit keys, KA is independent of both.
ATTEST_KEY_INFO: Final = b"llorch-vram-attest-v1"
MIN_NONCE_BYTES: Final = 16
MAX_NONCE_BYTES: Final = 64
FORMAT: Final = "attest-v1"

Verdict = Literal["ok", "mismatch"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX_EVEN = re.compile(r"(?:[0-9a-f]{2})*")
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1


def check_nonce(nonce: object) -> bytes:
    """The nonce as bytes; InvalidInput unless it is 16 to 64 bytes."""
    if not isinstance(nonce, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"nonce must be bytes, not {type(nonce).__name__}")
    raw = bytes(nonce)
    if not MIN_NONCE_BYTES <= len(raw) <= MAX_NONCE_BYTES:
        raise InvalidInput(f"nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes, not {len(raw)}")
    return raw


def attest_key(token: str | bytes) -> SecretKey:
    """``KA = HKDF-SHA256(token, salt=none, info="llorch-vram-attest-v1", L=32)``."""
    return SecretKey.from_token(token, ATTEST_KEY_INFO)


def probe_key(ka: SecretKey, nonce: bytes) -> bytes:
    """``KP = HMAC-SHA256(KA, "probe" || nonce)``: the probe's 32-byte BLAKE3 key.

    ``SecretKey.tag`` is exactly HMAC-SHA256 under KA, so KA's bytes never leave the key object.

    KP is not secret from whoever holds the model bytes and asked for the probe (it is bound to a
    single nonce, and KA cannot be recovered from it), but it is still only handed to the hasher."""
    return ka.tag(b"probe" + check_nonce(nonce))


@dataclass(frozen=True, slots=True)
class AttestedShard:
    """One shard of a statement: the five per-shard fields, in spec order."""

    shard_id: str
    seal_signature: bytes  # 32 raw bytes: that shard's seal-v1 tag
    digest_now: bytes  # 32 raw bytes, recomputed from device memory
    probe: bytes | None  # 32 raw bytes, or None when no probe was asked for
    verified_at_ns: int

    def validate(self) -> None:
        if not isinstance(self.shard_id, str) or not self.shard_id:
            raise InvalidInput("shard_id must be a non-empty string")
        _check_utf8("shard_id", self.shard_id)
        for name in ("seal_signature", "digest_now"):
            v = getattr(self, name)
            if not isinstance(v, bytes) or len(v) != 32:
                raise InvalidInput(f"{name} must be 32 bytes")
        if self.probe is not None and (not isinstance(self.probe, bytes) or len(self.probe) != 32):
            raise InvalidInput("probe must be 32 bytes or None")
        _check_int("verified_at_ns", self.verified_at_ns, _U64)


@dataclass(frozen=True, slots=True)
class Statement:
    """The fields an ``attest-v1`` tag covers (the tag travels beside it)."""

    nonce: bytes
    worker_id: str
    attested_at_ns: int
    shards: tuple[AttestedShard, ...]
    verdict: Verdict

    def validate(self) -> None:
        check_nonce(self.nonce)
        if not isinstance(self.worker_id, str):
            raise InvalidInput("worker_id must be a string")
        _check_utf8("worker_id", self.worker_id)
        _check_int("attested_at_ns", self.attested_at_ns, _U64)
        if not isinstance(self.shards, tuple):
            raise InvalidInput("shards must be a tuple")
        _check_int("shard_count", len(self.shards), _U32)
        for s in self.shards:
            if not isinstance(s, AttestedShard):
                raise InvalidInput("shards must hold AttestedShard values")
            s.validate()
        if self.verdict not in ("ok", "mismatch"):
            raise InvalidInput("verdict must be 'ok' or 'mismatch'")


def attest_message(s: Statement) -> bytes:
    """The exact bytes that ``attest-v1`` tags."""
    s.validate()
    parts = [
        ATTEST_DOMAIN,
        _field("nonce", s.nonce),
        _field("worker_id", s.worker_id.encode("utf-8")),
        _field("attested_at_ns", s.attested_at_ns.to_bytes(8, "little")),
        _field("shard_count", len(s.shards).to_bytes(4, "little")),
    ]
    for sh in s.shards:
        parts += [
            _field("shard_id", sh.shard_id.encode("utf-8")),
            _field("seal_signature", sh.seal_signature),
            _field("digest_now", sh.digest_now),
            _field("probe", b"" if sh.probe is None else sh.probe),
            _field("verified_at_ns", sh.verified_at_ns.to_bytes(8, "little")),
        ]
    parts.append(_field("verdict", b"\x01" if s.verdict == "ok" else b"\x00"))
    return b"".join(parts)


def attest_tag(ka: SecretKey, s: Statement) -> bytes:
    """``tag = HMAC-SHA256(KA, message)``."""
    return ka.tag(attest_message(s))


def verify_statement_tag(ka: SecretKey, s: Statement, tag: bytes) -> bool:
    """Constant-time check of a statement's tag; malformed fields count as a failed check."""
    try:
        message = attest_message(s)
    except InvalidInput:
        return False
    return ka.verify(message, tag)


def statement_to_json(s: Statement, tag: bytes) -> dict[str, Any]:
    """The spec's JSON form (hex for every byte string)."""
    s.validate()
    if not isinstance(tag, bytes) or len(tag) != 32:
        raise InvalidInput("tag must be 32 bytes")
    return {
        "format": FORMAT,
        "nonce": s.nonce.hex(),
        "worker_id": s.worker_id,
        "attested_at_ns": s.attested_at_ns,
        "shards": [
            {
                "shard_id": sh.shard_id,
                "seal_signature": sh.seal_signature.hex(),
                "digest_now": sh.digest_now.hex(),
                "probe": None if sh.probe is None else sh.probe.hex(),
                "verified_at_ns": sh.verified_at_ns,
            }
            for sh in s.shards
        ],
        "verdict": s.verdict,
        "tag": tag.hex(),
    }


_TOP_KEYS: Final = frozenset({"format", "nonce", "worker_id", "attested_at_ns", "shards", "verdict", "tag"})
_SHARD_KEYS: Final = frozenset({"shard_id", "seal_signature", "digest_now", "probe", "verified_at_ns"})


def _hex32(where: str, value: object) -> bytes:
    # Lower-case only, as the worker writes it: a JSON form has exactly one spelling, so that an
    # edited but equivalent document cannot pass as the one that was issued.
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise InvalidInput(f"{where} must be 64 lower-case hex characters")
    return bytes.fromhex(value)


def statement_from_json(doc: object) -> tuple[Statement, bytes]:
    """Parse the JSON form strictly: exactly the spec's keys, types and encodings, or InvalidInput.

    The tag is NOT checked here (see ``verify_statement_tag`` / ``check_attestation``)."""
    if not isinstance(doc, dict):
        raise InvalidInput("attestation must be a JSON object")
    if set(doc) != _TOP_KEYS:
        missing, extra = sorted(_TOP_KEYS - set(doc)), sorted(set(doc) - _TOP_KEYS)
        raise InvalidInput(f"attestation keys differ from attest-v1 (missing {missing}, unknown {extra})")
    if doc["format"] != FORMAT:
        raise InvalidInput("attestation format must be 'attest-v1'")
    nonce_hex = doc["nonce"]
    if not isinstance(nonce_hex, str) or not _HEX_EVEN.fullmatch(nonce_hex):
        raise InvalidInput("nonce must be lower-case hex")
    nonce = check_nonce(bytes.fromhex(nonce_hex))
    shards_doc = doc["shards"]
    if not isinstance(shards_doc, list):
        raise InvalidInput("shards must be a list")
    shards = []
    for i, sd in enumerate(shards_doc):
        if not isinstance(sd, dict) or set(sd) != _SHARD_KEYS:
            raise InvalidInput(f"shards[{i}] must be an object with exactly the attest-v1 shard keys")
        probe = sd["probe"]
        shards.append(
            AttestedShard(
                shard_id=sd["shard_id"],
                seal_signature=_hex32(f"shards[{i}].seal_signature", sd["seal_signature"]),
                digest_now=_hex32(f"shards[{i}].digest_now", sd["digest_now"]),
                probe=None if probe is None else _hex32(f"shards[{i}].probe", probe),
                verified_at_ns=sd["verified_at_ns"],
            )
        )
    verdict = doc["verdict"]
    if verdict not in ("ok", "mismatch"):
        raise InvalidInput("verdict must be 'ok' or 'mismatch'")
    statement = Statement(
        nonce=nonce,
        worker_id=doc["worker_id"],
        attested_at_ns=doc["attested_at_ns"],
        shards=tuple(shards),
        verdict=verdict,
    )
    statement.validate()
    return statement, _hex32("tag", doc["tag"])
