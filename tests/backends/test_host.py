"""The host backend's buffers: what ``DeviceBuffer.host_view`` hands an executor."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from vram_residency.backends.host import HostBackend
from vram_residency.errors import InvalidInput


@pytest.mark.parametrize("adopted", [False, True])
def test_host_view_length_is_checked(adopted: bool) -> None:
    """``host_view(length)`` of a 1000-byte shard: at most its 1000 bytes. A negative length
    sliced from the end (999 bytes for -1) and a length past the end handed out the padding of
    the 256-byte rounding, memory the seal does not cover, where writes go unseen."""
    backend = HostBackend(capacity_bytes=1 << 20)
    owner: Any = np.zeros(1000, dtype=np.uint8)  # an ndarray is a buffer; its stubs do not say so
    buf = backend.adopt_host(memoryview(owner)) if adopted else backend.allocate(1000)
    try:
        assert len(buf.host_view()) == 1000
        assert len(buf.host_view(10)) == 10
        assert len(buf.host_view(0)) == 0
        assert len(buf.host_view(1000)) == 1000
        for bad in (-1, 1001, 1024, 2**64, True):
            with pytest.raises(InvalidInput):
                buf.host_view(bad)
    finally:
        buf.close()
