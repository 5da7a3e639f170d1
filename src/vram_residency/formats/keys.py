"""Key derivation from the worker token (HKDF-SHA256, RFC 5869) and HMAC-SHA256 tags.

Each purpose gets its own HKDF ``info`` so that a key for one use can never be replayed as the key
for another: the seal key (``seal-v1``) and the audit key are independent even though both come
from the same token.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vram_residency.errors import ConfigError, InvalidInput

__all__ = [
    "AUDIT_KEY_INFO",
    "MIN_TOKEN_BYTES",
    "SEAL_KEY_INFO",
    "SecretKey",
    "derive_key",
    "hmac_sha256",
    "token_bytes",
]

SEAL_KEY_INFO = b"llorch-vram-seal-v1"
AUDIT_KEY_INFO = b"llorch-vram-audit-v1"

#: Shorter tokens are refused: a worker token is a bearer credential, and HKDF cannot add
#: entropy that the token does not have. 16 bytes matches llama-orch's minimum.
MIN_TOKEN_BYTES = 16


def token_bytes(token: str | bytes) -> bytes:
    """Validate a worker token and return its bytes (UTF-8 when given as text)."""
    if isinstance(token, str):
        encoded: bytes | None = None
        with contextlib.suppress(UnicodeEncodeError):
            encoded = token.encode("utf-8")
        if encoded is None:
            # Raised outside the handler: the UnicodeEncodeError holds the whole token (its
            # ``object``) and quotes part of it, so it must not become this error's context.
            raise ConfigError("worker token is not valid text (not encodable as UTF-8)")
        raw = encoded
    elif isinstance(token, (bytes, bytearray)):
        raw = bytes(token)
    else:
        raise ConfigError(f"worker token must be str or bytes, not {type(token).__name__}")
    if not raw:
        raise ConfigError("worker token is empty")
    if len(raw) < MIN_TOKEN_BYTES:
        raise ConfigError(f"worker token is too short: at least {MIN_TOKEN_BYTES} bytes required")
    return raw


def derive_key(ikm: bytes, info: bytes, length: int = 32, *, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256; the project's keys use no salt (RFC 5869's default of HashLen zero bytes)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    h = _hmac.HMAC(key, hashes.SHA256())
    h.update(message)
    return h.finalize()


class SecretKey:
    """A 32-byte key that never shows itself: not in repr, str, pickles or comparisons."""

    __slots__ = ("__inner", "__key", "__outer")

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigError("secret key must be 32 bytes")
        self.__key = bytes(key)
        # HMAC-SHA256 (RFC 2104) with the key's two pad blocks absorbed once: each tag then costs
        # two copies of a hash state instead of a new HMAC context (about 0.6 instead of 1.5 us,
        # which a verify pays once per shard). The states are key material, as private as the key.
        block = self.__key.ljust(64, b"\0")
        self.__inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self.__outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    @classmethod
    def from_token(cls, token: str | bytes, info: bytes) -> SecretKey:
        return cls(derive_key(token_bytes(token), info))

    def tag(self, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message`` under this key (bit-identical to ``hmac_sha256``)."""
        inner = self.__inner.copy()
        inner.update(message)
        outer = self.__outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def verify(self, message: bytes, tag: bytes) -> bool:
        """Constant-time check of ``tag`` against HMAC-SHA256 of ``message``."""
        # Bytes-like only: ``bytes(tag)`` of an int is that many zero bytes (``bytes(32)`` a
        # zero tag, a huge int a huge allocation), and of a str a TypeError.
        if not isinstance(tag, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"a tag is bytes, not {type(tag).__name__}")
        # hmac.compare_digest is constant-time too, and one C call (cryptography's bytes_eq
        # is a Python wrapper around one): a verify pays this once per shard.
        return hmac.compare_digest(self.tag(message), bytes(tag))

    def __repr__(self) -> str:
        return "SecretKey(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("SecretKey cannot be pickled")

    def __eq__(self, other: object) -> bool:
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def _expose_for_tests(self) -> bytes:
        """The raw key; only the known-answer tests of the seal spec use this."""
        return self.__key
