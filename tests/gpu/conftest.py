"""Fixtures of the GPU tests: one CUDA backend on device 0 for the whole session.

Every test here is marked ``gpu``; tests/conftest.py skips them without a GPU, or fails them when
VRAM_RESIDENCY_REQUIRE_GPU=1, before any fixture below runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from vram_residency.backends.cuda import CudaBackend


@pytest.fixture(scope="session")
def cuda_backend() -> Iterator[CudaBackend]:
    from vram_residency.backends.cuda import open_backend

    backend = open_backend(0)
    backend.warm_up()
    yield backend
    backend.close()


def random_bytes(n: int, seed: int) -> bytes:
    """Reproducible random bytes (never zeros: zeros hide unwritten memory)."""
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def _gpus() -> int:
    try:
        from vram_residency.backends.cuda import device_count

        return device_count()
    except Exception:
        return 0


#: Tests that move shards between two GPUs (peer to peer).
two_gpus = pytest.mark.skipif(_gpus() < 2, reason="peer-to-peer migration needs 2 GPUs")
