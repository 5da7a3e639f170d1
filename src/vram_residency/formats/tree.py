"""Digest algorithms on the host: ``sha256-tree-v1`` (``specs/sha256-tree-v1.md``) and ``blake3``.

Besides the digest of a whole shard, every algorithm here defines *unit digests*: one 32-byte
digest per aligned 1 MiB unit of the shard (the last unit may be shorter). They are kept on the
host at seal time (32 bytes per MiB, 0.003% of the shard) and let a mismatch be narrowed down to
the units that changed without keeping any copy of the shard.

- ``sha256-tree-v1``: a unit digest is the root of the unit's own subtree of 256 leaves. Aligned
  power-of-two subtrees are exact subtrees of the spec's tree (RFC 6962 shape), so the shard's
  root is the same tree reduction applied to the unit digests: one pass gives both.
- ``blake3``: a unit digest is the standard BLAKE3 hash of the unit's bytes taken as a message of
  its own. (A GPU computes it from the unit's chaining-value subtree with one extra root
  compression.)
- ``nh-fast-v1`` (``docs/specs/nh-fast-v1.md``, :mod:`.nhfast`): keyed, a key is required; a unit
  digest is the keyed BLAKE3 of the unit's leaf tags, as the spec defines it.

Every backend must produce these values bit for bit; the host functions here are the reference.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

import blake3 as _blake3

from vram_residency.errors import InvalidInput

__all__ = [
    "ALGORITHMS",
    "BLAKE3",
    "DIGEST_SIZE",
    "KEYED_ALGORITHMS",
    "LEAF_SIZE",
    "NH_FAST_V1",
    "SEAL_ALGORITHMS",
    "SHA256_TREE_V1",
    "UNIT_SIZE",
    "HashResult",
    "check_algorithm",
    "check_key",
    "digest",
    "digest_only",
    "hash_units",
    "reduce_sha256_tree",
    "unit_count",
]

SHA256_TREE_V1: Final = "sha256-tree-v1"
BLAKE3: Final = "blake3"
#: The keyed fast check (docs/specs/nh-fast-v1.md); it has no unkeyed form.
NH_FAST_V1: Final = "nh-fast-v1"
#: What every consumer (seal records, CLI, stream hasher, backends) accepts today.
ALGORITHMS: Final = (SHA256_TREE_V1, BLAKE3)
#: Algorithms that cannot be computed without a 32-byte key. ``hash_units`` accepts them. They
#: stay out of ALGORITHMS because consumers that have no key (manifests, the stream hasher, a
#: bare ``vram-residency digest``) cannot compute them.
KEYED_ALGORITHMS: Final = (NH_FAST_V1,)
#: What a seal may name: the store derives a keyed algorithm's key per shard from the worker
#: token (``formats.nhfast.shard_key``) and passes it to every digest of that shard.
SEAL_ALGORITHMS: Final = ALGORITHMS + KEYED_ALGORITHMS

DIGEST_SIZE: Final = 32
LEAF_SIZE: Final = 4096
#: Localization granularity: a power-of-two multiple of the leaf size (256 leaves).
UNIT_SIZE: Final = 1 << 20
_LEAVES_PER_UNIT: Final = UNIT_SIZE // LEAF_SIZE

_NAME = SHA256_TREE_V1.encode("ascii")


def check_algorithm(name: object, *, keyed: bool = False) -> str:
    """``name`` if it is one of ALGORITHMS (or, with ``keyed``, SEAL_ALGORITHMS)."""
    known = ALGORITHMS + KEYED_ALGORITHMS if keyed else ALGORITHMS
    if not isinstance(name, str) or name not in known:
        raise InvalidInput(f"unknown digest algorithm {name!r}; expected one of {known}")
    return name


def unit_count(n: int) -> int:
    """Number of localization units of an ``n``-byte shard (at least one, as for the tree)."""
    return max(1, -(-n // UNIT_SIZE))


@dataclass(frozen=True, slots=True)
class HashResult:
    """Digest of a whole shard and its per-unit digests (``32 * unit_count(n)`` bytes)."""

    digest: bytes
    unit_digests: bytes

    def unit(self, i: int) -> bytes:
        return self.unit_digests[32 * i : 32 * i + 32]


def _leaf(chunk: memoryview | bytes) -> bytes:
    h = hashlib.sha256(chunk)
    h.update(b"\x00")
    return h.digest()


def _parent(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(left + right + b"\x01").digest()


def _reduce(nodes: list[bytes]) -> bytes:
    # Pair neighbours from the left; an unpaired last node moves up unchanged (spec step 4).
    while len(nodes) > 1:
        nxt = [_parent(nodes[i], nodes[i + 1]) for i in range(0, len(nodes) - 1, 2)]
        if len(nodes) % 2:
            nxt.append(nodes[-1])
        nodes = nxt
    return nodes[0]


def _finalize_sha256_tree(root: bytes, n: int) -> bytes:
    return hashlib.sha256(root + n.to_bytes(8, "little") + _NAME + b"\x02").digest()


def reduce_sha256_tree(unit_digests: Sequence[bytes] | bytes, n: int) -> bytes:
    """The ``sha256-tree-v1`` digest of an ``n``-byte message from its unit digests."""
    if isinstance(unit_digests, (bytes, bytearray, memoryview)):
        raw = bytes(unit_digests)
        units = [raw[i : i + 32] for i in range(0, len(raw), 32)]
    else:
        units = [bytes(u) for u in unit_digests]
    # Each unit digest is a 32-byte node of the tree: a short or long one (a packed buffer that is
    # not a multiple of 32, or a list of odd pieces) would be hashed as a node of another size and
    # give a digest that no message has, instead of a clear refusal.
    if any(len(u) != DIGEST_SIZE for u in units):
        raise InvalidInput("every unit digest must be 32 bytes")
    if len(units) != unit_count(n):
        raise InvalidInput("unit digest count does not match the message length")
    return _finalize_sha256_tree(_reduce(units), n)


def _sha256_unit(view: memoryview) -> bytes:
    if len(view) == 0:
        return _leaf(b"")
    base = hashlib.sha256()
    leaves = []
    for off in range(0, len(view), LEAF_SIZE):
        # copy() of a fresh context skips OpenSSL 3's per-call algorithm fetch.
        h = base.copy()
        h.update(view[off : off + LEAF_SIZE])
        h.update(b"\x00")
        leaves.append(h.digest())
    return _reduce(leaves)


def _blake3_unit(view: memoryview, key: bytes | None = None) -> bytes:
    return (_blake3.blake3(view) if key is None else _blake3.blake3(view, key=key)).digest()


def check_key(algorithm: str, key: bytes | None) -> None:
    """InvalidInput unless ``key`` fits ``algorithm``: required (32 bytes) for nh-fast-v1,
    optional for blake3 (keyed mode), refused for sha256-tree-v1."""
    if algorithm == NH_FAST_V1:
        if not isinstance(key, bytes) or len(key) != 32:
            raise InvalidInput("nh-fast-v1 needs a 32-byte key")
        return
    if key is None:
        return
    if algorithm != BLAKE3:
        raise InvalidInput(f"digest algorithm {algorithm!r} takes no key")
    if not isinstance(key, bytes) or len(key) != 32:
        raise InvalidInput("a BLAKE3 key is 32 bytes")


def _workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def hash_units(
    data: memoryview | bytes | bytearray,
    algorithm: str,
    *,
    threads: int | None = None,
    key: bytes | None = None,
) -> HashResult:
    """Digest and unit digests of ``data`` on the host, using every core by default.

    ``key`` selects BLAKE3's keyed mode (unit digests keyed too); ``nh-fast-v1`` requires one;
    ``sha256-tree-v1`` takes none."""
    algorithm = check_algorithm(algorithm, keyed=True)
    check_key(algorithm, key)
    view = memoryview(data).cast("B")
    n = len(view)
    if algorithm == NH_FAST_V1:
        from vram_residency.formats import nhfast

        assert key is not None  # check_key
        dig, packed = nhfast.hash_units(view, key, threads=threads)
        return HashResult(dig, packed)
    from vram_residency.formats import _native

    if algorithm == SHA256_TREE_V1 and _native.available():
        packed = _native.sha256_tree_units(view, threads or _workers())
        return HashResult(reduce_sha256_tree(packed, n), packed)

    def unit_fn(v: memoryview) -> bytes:
        return _sha256_unit(v) if algorithm == SHA256_TREE_V1 else _blake3_unit(v, key)

    offsets = range(0, max(n, 1), UNIT_SIZE)
    workers = threads or _workers()
    if workers > 1 and len(offsets) > 1:
        # hashlib and blake3 release the GIL on large buffers, so threads scale.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            units = list(pool.map(lambda o: unit_fn(view[o : o + UNIT_SIZE]), offsets))
    else:
        units = [unit_fn(view[o : o + UNIT_SIZE]) for o in offsets]
    if algorithm == SHA256_TREE_V1:
        dig = reduce_sha256_tree(units, n)
    else:
        mt = workers if n >= 1 << 24 else 1
        hasher = _blake3.blake3(max_threads=mt) if key is None else _blake3.blake3(key=key, max_threads=mt)
        hasher.update(view)
        dig = hasher.digest()
    return HashResult(dig, b"".join(units))


def digest_only(
    data: memoryview | bytes | bytearray,
    algorithm: str,
    *,
    threads: int | None = None,
    key: bytes | None = None,
) -> bytes:
    """The digest alone, skipping unit digests where the algorithm allows (BLAKE3's digest is one
    pass over the data; sha256-tree-v1's root needs the unit digests anyway): the verify path."""
    algorithm = check_algorithm(algorithm, keyed=True)
    check_key(algorithm, key)
    if algorithm != BLAKE3:
        return hash_units(data, algorithm, threads=threads, key=key).digest
    view = memoryview(data).cast("B")
    mt = (threads or _workers()) if len(view) >= 1 << 24 else 1
    hasher = _blake3.blake3(max_threads=mt) if key is None else _blake3.blake3(key=key, max_threads=mt)
    hasher.update(view)
    return bytes(hasher.digest())


def digest(
    data: memoryview | bytes | bytearray, algorithm: str = SHA256_TREE_V1, *, key: bytes | None = None
) -> bytes:
    """The 32-byte digest of ``data`` under ``algorithm`` (``key``: see :func:`hash_units`)."""
    return hash_units(data, algorithm, key=key).digest
