"""A bit flipped in VRAM changes the digest and exactly the unit digest of the unit it is in."""

from __future__ import annotations

import numpy as np
import pytest

from vram_residency.backends.cuda import CudaBackend
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1, UNIT_SIZE

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("alg", [SHA256_TREE_V1, BLAKE3])
@pytest.mark.parametrize(
    "offset", [0, 4095, 4096, UNIT_SIZE - 1, UNIT_SIZE, 3 * UNIT_SIZE + 777, 5 * UNIT_SIZE + 12344]
)
def test_flip_bit_located(cuda_backend: CudaBackend, alg: str, offset: int) -> None:
    n = 5 * UNIT_SIZE + 12345
    data = np.random.default_rng(offset).integers(0, 256, size=n, dtype=np.uint8).tobytes()
    buf = cuda_backend.allocate(n)
    try:
        sealed = cuda_backend.write_and_hash(buf, data, alg)
        old = buf.read(offset, 1)[0]
        buf.write(offset, bytes([old ^ 0x10]))
        assert cuda_backend.digest(buf, alg) != sealed.digest
        now = cuda_backend.hash(buf, alg)
        assert now.digest != sealed.digest
        changed = [i for i in range(len(now.unit_digests) // 32) if now.unit(i) != sealed.unit(i)]
        assert changed == [offset // UNIT_SIZE]
        buf.write(offset, bytes([old]))
        assert cuda_backend.hash(buf, alg) == sealed
    finally:
        buf.close()
