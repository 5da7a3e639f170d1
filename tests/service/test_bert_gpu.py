"""The built-in executor on the CUDA backend: CuPy arrays over the sealed VRAM, in place.

Runs on a GPU machine with CuPy installed (not part of the ``cuda`` extra); skipped elsewhere.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.service.service_helpers import EXAMPLE_DIR, HELLO_WORLD_REFERENCE
from vram_residency import SealVerificationFailed, VramManager
from vram_residency.service.catalog import MINILM_MODEL, ModelCatalog
from vram_residency.service.executor import DeviceMemory, SealedWeights
from vram_residency.service.executors.encoder import BertEncoder, bert_factory
from vram_residency.service.executors.safetensors_view import parse_header
from vram_residency.testing import flip_bit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed"),
]


def test_embedding_from_sealed_vram_in_place() -> None:
    assert EXAMPLE_DIR is not None
    files = ModelCatalog(None, {MINILM_MODEL: EXAMPLE_DIR}).resolve(MINILM_MODEL)
    with VramManager("gpu-bert-test-token-0123456789", backend="cuda") as mgr:
        shard = mgr.seal_file(files.weights)
        buf = mgr._entry(shard).buf
        memory = DeviceMemory(ptr=buf.device_pointer, size=shard.vram_bytes, device=mgr.device, owner=buf)
        enc = bert_factory(SealedWeights(files, "cuda", shard.vram_bytes, None, memory))
        assert isinstance(enc, BertEncoder) and "CuPy" in enc.description
        job = enc.prepare("hello world", None)
        (out,) = enc.run([job])
        vec = np.array(out.end["embedding"])
        np.testing.assert_allclose(vec[:5], HELLO_WORLD_REFERENCE, atol=1e-4)
        # In place: a flipped weight bit in VRAM changes the result, and verification sees it.
        with files.weights.open("rb") as f:
            _, tensors = parse_header(f.read(1 << 20), shard.vram_bytes)
        info = tensors["encoder.layer.0.intermediate.dense.bias"]
        flip_bit(mgr, shard, 8 * (info.start + 3) + 6)  # top exponent bit of a bias the model uses
        (changed,) = enc.run([job])
        assert not np.allclose(vec, np.array(changed.end["embedding"]), atol=1e-3)
        with pytest.raises(SealVerificationFailed):
            mgr.verify_sealed(shard)
        enc.close()
