"""The field encoding shared by every tagged format here (``seal-v1``, ``attest-v1``,
``tp-record-v1``): ``LE16(len(name)) || name || LE32(len(value)) || value``, and the checks their
fields share. One implementation, so that the formats cannot drift apart."""

from __future__ import annotations

from vram_residency.errors import InvalidInput

__all__ = ["U32", "U64", "check_int", "check_utf8", "field"]

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


def field(name: str, value: bytes) -> bytes:
    """One encoded field: the ASCII name and the raw value, each length-prefixed."""
    raw = name.encode("ascii")
    return len(raw).to_bytes(2, "little") + raw + len(value).to_bytes(4, "little") + value


def check_utf8(name: str, value: str) -> None:
    # A JSON string may hold lone surrogates, which have no UTF-8 encoding.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{name} is not encodable as UTF-8 (lone surrogate)") from None


def check_int(name: str, value: object, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise InvalidInput(f"{name} must be an integer in [0, {limit}]")
