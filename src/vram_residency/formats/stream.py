"""Incremental digests: feed a message in pieces of any size, get the same ``HashResult``.

Used to digest files bigger than RAM (``vram-residency digest``, manifests). Pieces are re-cut on
1 MiB unit boundaries, so each full unit is hashed once, in parallel batches, and the
``sha256-tree-v1`` root is reduced from the unit digests at the end; ``blake3`` runs its own
incremental hasher alongside for the root.
"""

from __future__ import annotations

import blake3 as _blake3

from vram_residency.formats.tree import (
    BLAKE3,
    SHA256_TREE_V1,
    UNIT_SIZE,
    HashResult,
    check_algorithm,
    hash_units,
    reduce_sha256_tree,
)

__all__ = ["StreamHasher"]

#: Full units are hashed in batches of this many bytes (enough to keep every core busy).
_BATCH = 64 * UNIT_SIZE


class StreamHasher:
    """``update()`` with consecutive pieces of a message, then ``finalize()`` once."""

    def __init__(self, algorithm: str = SHA256_TREE_V1, *, threads: int | None = None) -> None:
        self.algorithm = check_algorithm(algorithm)
        self._threads = threads
        self._pending = bytearray()
        self._units: list[bytes] = []
        self._n = 0
        self._blake = (
            _blake3.blake3(max_threads=threads or _blake3.blake3.AUTO) if algorithm == BLAKE3 else None
        )
        self._done = False

    @property
    def bytes_hashed(self) -> int:
        return self._n

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._done:
            raise ValueError("StreamHasher already finalized")
        view = memoryview(data).cast("B")
        self._n += len(view)
        if self._blake is not None:
            self._blake.update(view)
        # Fast path: nothing pending and a whole number of units in hand.
        if not self._pending:
            full = len(view) - len(view) % UNIT_SIZE
            if full:
                self._hash_full(view[:full])
            self._pending += view[full:]
            return
        self._pending += view
        if len(self._pending) >= _BATCH:
            full = len(self._pending) - len(self._pending) % UNIT_SIZE
            self._hash_full(memoryview(self._pending)[:full])
            del self._pending[:full]

    def _hash_full(self, view: memoryview) -> None:
        res = hash_units(view, self.algorithm, threads=self._threads)
        raw = res.unit_digests
        self._units.extend(raw[i : i + 32] for i in range(0, len(raw), 32))

    def finalize(self) -> HashResult:
        if self._done:
            raise ValueError("StreamHasher already finalized")
        self._done = True
        if self._pending or not self._units:
            self._hash_full(memoryview(bytes(self._pending)))
            self._pending.clear()
        units = b"".join(self._units)
        if self.algorithm == SHA256_TREE_V1:
            return HashResult(reduce_sha256_tree(units, self._n), units)
        assert self._blake is not None
        return HashResult(self._blake.digest(), units)
