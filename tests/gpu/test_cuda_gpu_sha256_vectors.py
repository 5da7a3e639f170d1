"""NIST CAVP SHA256ShortMsg and SHA256LongMsg through the device's SHA-256 core.

The vectors come from the ``cryptography_vectors`` package; where it is not installed (the GPU
machine's image), VRAM_RESIDENCY_CAVP_DIR may name a folder holding the same two .rsp files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vram_residency.backends.cuda import CudaBackend

pytestmark = pytest.mark.gpu


def _load(name: str) -> list[tuple[bytes, bytes]]:
    text: str | None = None
    try:
        import cryptography_vectors

        with cryptography_vectors.open_vector_file(os.path.join("hashes", "SHA2", name), "r") as f:
            text = f.read()
    except ImportError:
        folder = os.environ.get("VRAM_RESIDENCY_CAVP_DIR")
        if folder:
            text = Path(folder, name).read_text()
    if text is None:
        pytest.fail(f"{name} not found: install cryptography-vectors or set VRAM_RESIDENCY_CAVP_DIR")
    vectors: list[tuple[bytes, bytes]] = []
    length = None
    msg = b""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Len = "):
            length = int(line[6:])
        elif line.startswith("Msg = "):
            msg = bytes.fromhex(line[6:])
        elif line.startswith("MD = "):
            assert length is not None and length % 8 == 0
            vectors.append((msg[: length // 8], bytes.fromhex(line[5:])))
            length = None
    return vectors


@pytest.mark.parametrize("name", ["SHA256ShortMsg.rsp", "SHA256LongMsg.rsp"])
def test_cavp(cuda_backend: CudaBackend, name: str) -> None:
    vectors = _load(name)
    assert len(vectors) >= 64
    got = cuda_backend.sha256_messages([m for m, _ in vectors])
    bad = [(len(m), md.hex()) for (m, md), g in zip(vectors, got, strict=True) if g != md]
    assert not bad, f"{len(bad)} of {len(vectors)} vectors differ, first: {bad[:3]}"
