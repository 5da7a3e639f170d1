"""Tools for tests and incident drills. They bypass the seal on purpose.

``flip_bit`` changes device memory behind the manager's back, exactly as a rowhammer flip or a
stray kernel write would, so that detection and localization can be shown on any backend.
"""

from __future__ import annotations

from vram_residency.errors import InvalidInput
from vram_residency.manager import VramManager
from vram_residency.shard import SealedShard

__all__ = ["flip_bit"]


def flip_bit(manager: VramManager, shard: SealedShard, bit_index: int) -> None:
    """XOR bit ``bit_index`` (0 = least significant bit of byte 0) of the shard's device memory."""
    if isinstance(bit_index, bool) or not isinstance(bit_index, int):
        raise InvalidInput("bit_index must be an integer")
    if not 0 <= bit_index < 8 * shard.vram_bytes:
        raise InvalidInput(f"bit_index {bit_index} outside the shard's {8 * shard.vram_bytes} bits")
    entry = manager.store.lookup(shard)
    with entry.lock:
        offset, bit = divmod(bit_index, 8)
        old = entry.buf.read(offset, 1)[0]
        entry.buf.write(offset, bytes([old ^ (1 << bit)]))
