"""The plain SHA-256 of a model file, computed while it streams into device memory (no second
pass): ``stream_into(observe=...)`` sees every byte once, in file order, even with several
reader threads finishing out of order."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_residency.backends.host import HostBackend
from vram_residency.errors import InvalidInput
from vram_residency.sources.stream import Staging, plan_staging, stream_into

NEEDS_MINILM = False


def _stream(path: Path, size: int, chunk_bytes: int, buffers: int, observe: object) -> bytes:
    backend = HostBackend(capacity_bytes=1 << 26)
    buf = backend.allocate(max(size, 1))
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            plan = plan_staging(size, chunk_bytes * buffers, buffers)
            with Staging(plan) as staging:
                stream_into(fd, 0, size, buf, what="t", staging=staging, observe=observe)  # type: ignore[arg-type]
        finally:
            os.close(fd)
        return bytes(buf.read(0, size)) if size else b""
    finally:
        buf.close()


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 300_000), buffers=st.integers(2, 8), seed=st.integers(0, 2**31))
def test_observer_sees_every_byte_in_order(
    tmp_path_factory: pytest.TempPathFactory, size: int, buffers: int, seed: int
) -> None:
    data = hashlib.shake_256(seed.to_bytes(8, "little")).digest(size)
    path = tmp_path_factory.mktemp("s") / "f.bin"
    path.write_bytes(data)
    h = hashlib.sha256()
    copied = _stream(path, size, 4096, buffers, lambda v: h.update(v))
    assert copied == data
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()


def test_observer_may_abort_the_copy(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100_000)

    def refuse(_: memoryview) -> None:
        raise InvalidInput("digest mismatch")

    with pytest.raises(InvalidInput, match="digest mismatch"):
        _stream(path, 100_000, 4096, 4, refuse)
