"""``nh-fast-v1``: a keyed fast check at memory speed (``docs/specs/nh-fast-v1.md``).

Per 4 KiB leaf, three Toeplitz-shifted instances of NH (UMAC's inner hash, 32-bit words) give a
24-byte leaf tag; the tags of each 1 MiB unit are hashed by keyed BLAKE3 into the unit digest,
and the unit digests with the length by keyed BLAKE3 into the 32-byte digest. NH costs a few
integer operations per 8 bytes, so a GPU reads the shard at memory speed; the keyed BLAKE3 layers
see only 24 bytes per 4 KiB and keep NH's (linear) key hidden from anyone who sees digests.

It is a *keyed* check: against changes made without the key (bit flips, HBM faults, stray or
foreign writes) two different shards of the same length collide with probability at most
2^-96 per leaf; against the key holder (the worker token's holder) it guarantees nothing.

This module holds the key derivation, the pure-Python reference (slow, exact: the definition the
native host code and the CUDA kernel are tested against), a numpy path used when the native
library is missing, and :func:`hash_units`, the host entry used by ``tree.hash_units``.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

import blake3 as _blake3
import numpy as np

from vram_residency.errors import InvalidInput

__all__ = [
    "INSTANCES",
    "KEY_INFO",
    "KEY_SCHEDULE_CONTEXT",
    "LEAVES_PER_UNIT",
    "NAME",
    "NH_KEY_BYTES",
    "TAG_SIZE",
    "TOEPLITZ_SHIFT",
    "KeySchedule",
    "finalize",
    "hash_units",
    "key_schedule",
    "manager_key",
    "reference_hash",
    "reference_leaf_tag",
    "shard_key",
    "shard_key_message",
    "unit_digests_from_tags",
]

NAME: Final = "nh-fast-v1"
#: HKDF info of the per-worker nh-fast-v1 key (spec: "Keys").
KEY_INFO: Final = b"llorch-vram-nhfast-v1"
_SHARD_LABEL: Final = b"nh-fast-v1 shard"
#: Input of the keyed BLAKE3 XOF that expands a 32-byte key into the subkeys.
KEY_SCHEDULE_CONTEXT: Final = b"nh-fast-v1 key schedule"

LEAF_SIZE: Final = 4096
UNIT_SIZE: Final = 1 << 20
LEAVES_PER_UNIT: Final = UNIT_SIZE // LEAF_SIZE
#: NH instances per leaf: 2^-32 each, 2^-96 together (see the spec's security argument).
INSTANCES: Final = 3
#: Toeplitz shift between instances, in bytes: one GPU warp's 16-byte-per-lane stride, so a lane's
#: key for instance t is its own key chunk of a later iteration (held in registers).
TOEPLITZ_SHIFT: Final = 512
NH_KEY_BYTES: Final = LEAF_SIZE + TOEPLITZ_SHIFT * (INSTANCES - 1)
TAG_SIZE: Final = 8 * INSTANCES
_WORDS: Final = LEAF_SIZE // 4
_SHIFT_WORDS: Final = TOEPLITZ_SHIFT // 4
_M32: Final = 0xFFFFFFFF
_M64: Final = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True, slots=True, repr=False)
class KeySchedule:
    """The subkeys of one 32-byte nh-fast-v1 key. Never shown in reprs (it is key material)."""

    unit_key: bytes
    top_key: bytes
    nh_key: bytes  # NH_KEY_BYTES, read as little-endian 32-bit words

    def __repr__(self) -> str:
        return "KeySchedule(<redacted>)"


def check_key(key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) != 32:
        raise InvalidInput("an nh-fast-v1 key is 32 bytes")
    return key


def key_schedule(key: bytes) -> KeySchedule:
    """Spec "Key schedule": BLAKE3 keyed by ``key``, XOF of 64 + 5120 bytes over the context."""
    out = _blake3.blake3(KEY_SCHEDULE_CONTEXT, key=check_key(key)).digest(length=64 + NH_KEY_BYTES)
    return KeySchedule(out[:32], out[32:64], out[64:])


def manager_key(token_key_material: bytes) -> bytes:
    """``HKDF-SHA256(token, info="llorch-vram-nhfast-v1")``: the worker-wide nh-fast-v1 key.

    ``token_key_material`` is the token's bytes, already validated by ``keys.token_bytes``."""
    from vram_residency.formats.keys import derive_key

    return derive_key(token_key_material, KEY_INFO)


def shard_key(worker_key: bytes, shard_id: str) -> bytes:
    """The key of one shard: ``HMAC-SHA256(worker_key, "nh-fast-v1 shard" || LE32(len) || id)``.

    The shard id is chosen before the shard is hashed, so the seal path has it; a per-shard key
    means two shards never share NH key material through their ids."""
    return hmac.digest(check_key(worker_key), shard_key_message(shard_id), "sha256")


def shard_key_message(shard_id: str) -> bytes:
    """``"nh-fast-v1 shard" || LE32(len(id)) || id``: the HMAC message of :func:`shard_key`, so
    that a holder of the worker key as a ``SecretKey`` (whose ``tag`` is HMAC-SHA256) derives the
    shard key without the key bytes leaving it."""
    if not isinstance(shard_id, str) or not shard_id:
        raise InvalidInput("shard_id must be a non-empty string")
    try:
        raw = shard_id.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("shard_id is not encodable as UTF-8") from None
    return _SHARD_LABEL + len(raw).to_bytes(4, "little") + raw


def finalize(sched: KeySchedule, unit_digests: bytes, n: int) -> bytes:
    """Spec step 5: ``D = BLAKE3(key = top_key, U_0 || ... || U_{m-1} || LE64(n))``."""
    h = _blake3.blake3(key=sched.top_key)
    h.update(unit_digests)
    h.update(n.to_bytes(8, "little"))
    return h.digest()


def unit_digests_from_tags(sched: KeySchedule, tags: bytes | memoryview, n: int) -> bytes:
    """Spec step 4: each unit's leaf tags, keyed-BLAKE3-hashed by ``unit_key``."""
    per_unit = TAG_SIZE * LEAVES_PER_UNIT
    leaves = max(1, -(-n // LEAF_SIZE))
    if len(tags) != TAG_SIZE * leaves:
        raise InvalidInput("leaf tag count does not match the message length")
    view = memoryview(tags)
    return b"".join(
        _blake3.blake3(view[o : o + per_unit], key=sched.unit_key).digest()
        for o in range(0, len(view), per_unit)
    )


# -- the pure-Python reference -------------------------------------------------------------------


def reference_leaf_tag(chunk: bytes, nh_key: bytes) -> bytes:
    """Spec step 3, literally: zero-pad to 4096 bytes, three NH sums with keys shifted by 512 B."""
    if len(chunk) > LEAF_SIZE or len(nh_key) != NH_KEY_BYTES:
        raise InvalidInput("a leaf is at most 4096 bytes and the NH key 5120 bytes")
    padded = bytes(chunk) + bytes(LEAF_SIZE - len(chunk))
    m = [int.from_bytes(padded[4 * i : 4 * i + 4], "little") for i in range(_WORDS)]
    k = [int.from_bytes(nh_key[4 * i : 4 * i + 4], "little") for i in range(len(nh_key) // 4)]
    out = b""
    for t in range(INSTANCES):
        off = _SHIFT_WORDS * t
        h = 0
        for p in range(0, _WORDS, 2):
            h += ((m[p] + k[p + off]) & _M32) * ((m[p + 1] + k[p + 1 + off]) & _M32)
        out += (h & _M64).to_bytes(8, "little")
    return out


def reference_hash(data: bytes, key: bytes) -> tuple[bytes, bytes]:
    """(digest, unit digests) of ``data`` by the spec, in pure Python (about 0.3 s per MiB)."""
    sched = key_schedule(key)
    n = len(data)
    leaves = max(1, -(-n // LEAF_SIZE))
    tags = b"".join(
        reference_leaf_tag(data[i * LEAF_SIZE : (i + 1) * LEAF_SIZE], sched.nh_key) for i in range(leaves)
    )
    units = unit_digests_from_tags(sched, tags, n)
    return finalize(sched, units, n), units


# -- host paths ----------------------------------------------------------------------------------


def _numpy_tags(view: memoryview, nh_key: bytes) -> bytes:
    """Leaf tags with numpy (the fallback without the native library): exact, since a product of
    two values below 2^32 fits in uint64 and uint64 sums wrap modulo 2^64 as NH requires."""
    n = len(view)
    leaves = max(1, -(-n // LEAF_SIZE))
    buf = np.zeros(leaves * LEAF_SIZE, dtype=np.uint8)
    buf[:n] = np.frombuffer(view, dtype=np.uint8)
    m = buf.view("<u4").reshape(leaves, _WORDS).astype(np.uint64)
    k = np.frombuffer(nh_key, dtype="<u4").astype(np.uint64)
    out = np.empty((leaves, INSTANCES), dtype="<u8")
    with np.errstate(over="ignore"):
        for t in range(INSTANCES):
            a = (m + k[_SHIFT_WORDS * t : _SHIFT_WORDS * t + _WORDS]) & np.uint64(_M32)
            out[:, t] = (a[:, 0::2] * a[:, 1::2]).sum(axis=1, dtype=np.uint64)
    return out.tobytes()


def _workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def leaf_tags(view: memoryview, sched: KeySchedule, threads: int | None = None) -> bytes:
    """Every leaf tag of ``view`` (``24 * max(1, ceil(n / 4096))`` bytes), native when possible."""
    from vram_residency.formats import _nhfast_native

    workers = threads or _workers()
    if _nhfast_native.available():
        return _nhfast_native.leaf_tags(view, sched.nh_key, workers)
    n = len(view)
    if n <= UNIT_SIZE or workers == 1:
        return _numpy_tags(view, sched.nh_key)
    offsets = range(0, n, 16 * UNIT_SIZE)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(lambda o: _numpy_tags(view[o : o + 16 * UNIT_SIZE], sched.nh_key), offsets))
    return b"".join(parts)


def hash_units(
    data: memoryview | bytes | bytearray, key: bytes, *, threads: int | None = None
) -> tuple[bytes, bytes]:
    """(digest, unit digests) of ``data`` under ``key`` on the host."""
    sched = key_schedule(key)
    view = memoryview(data).cast("B")
    n = len(view)
    units = unit_digests_from_tags(sched, leaf_tags(view, sched, threads), n)
    return finalize(sched, units, n), units


def reduce_units(unit_digests: Sequence[bytes] | bytes, n: int, key: bytes) -> bytes:
    """The digest from unit digests (a device computed those), as the spec's step 5."""
    if not isinstance(unit_digests, bytes):
        # Each piece must be one 32-byte digest: pieces of 31 and 33 bytes would join to the
        # right total and be hashed as digests no device ever produced.
        units = [bytes(u) for u in unit_digests]
        if any(len(u) != 32 for u in units):
            raise InvalidInput("every unit digest must be 32 bytes")
        unit_digests = b"".join(units)
    raw = unit_digests
    if len(raw) != 32 * max(1, -(-n // UNIT_SIZE)):
        raise InvalidInput("unit digest count does not match the message length")
    return finalize(key_schedule(key), raw, n)
