"""The byte-level decoder on the CUDA backend: CuPy arrays over the sealed VRAM, in place, giving
what the numpy path gives on the same generated weights.

Runs on a GPU machine with CuPy installed (not part of the ``cuda`` extra); skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from vram_residency import SealVerificationFailed, VramManager
from vram_residency.service.executor import DeviceMemory, ModelFiles, SealedWeights
from vram_residency.service.executors.decoder import BOS_ID, ByteLM, byte_lm_factory
from vram_residency.service.executors.example_model import PRESETS, file_image
from vram_residency.service.executors.safetensors_view import parse_header
from vram_residency.testing import flip_bit

NEEDS_MINILM = False  # see conftest.py
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed"),
]
TOKEN = "gpu-decoder-test-token-0123456789"
PROMPTS = ["hello world", "The orchestrator commits a model by name.", "x"]


def _top_margin(lm: ByteLM, seq: list[int]) -> float:
    """Gap between the two largest logits after ``seq`` (one prefill of the host model)."""
    c = lm.config
    shape = (1, c.num_heads, len(seq), c.head_dim)
    caches = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(c.num_layers)]
    low, high = np.sort(lm._prefill(np.asarray(seq), caches, 0))[-2:]
    return float(high - low)


def test_cupy_generation_equals_numpy_on_the_same_weights(tmp_path: Path) -> None:
    config = PRESETS["small"]
    (tmp_path / "model.safetensors").write_bytes(file_image(config))
    (tmp_path / "config.json").write_text(json.dumps({**config.to_json(), "untrained": True}))
    files = ModelFiles(
        "random-byte-lm", tmp_path / "model.safetensors", "safetensors", tmp_path, tmp_path / "config.json"
    )
    with VramManager(TOKEN, backend="host") as host, VramManager(TOKEN, backend="cuda") as gpu:
        hs = host.seal_file(files.weights)
        gs = gpu.seal_file(files.weights)
        assert hs.digest == gs.digest
        ref = byte_lm_factory(SealedWeights(files, "host", hs.vram_bytes, host._entry(hs).buf.host_view()))
        buf = gpu._entry(gs).buf
        memory = DeviceMemory(ptr=buf.device_pointer, size=gs.vram_bytes, device=gpu.device, owner=buf)
        lm = byte_lm_factory(SealedWeights(files, "cuda", gs.vram_bytes, None, memory))
        assert isinstance(ref, ByteLM) and isinstance(lm, ByteLM) and "CuPy" in lm.description
        ids = [BOS_ID, *b"sealed weights on the GPU"]
        want, got = ref.logits(ids), lm.logits(ids)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))

        jobs_h = [ref.prepare(p, 48) for p in PROMPTS]
        jobs_g = [lm.prepare(p, 48) for p in PROMPTS]
        tokens_h: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
        tokens_g: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
        ref.run_streaming(jobs_h, lambda i, t: tokens_h[i].append(t.id))
        lm.run_streaming(jobs_g, lambda i, t: tokens_g[i].append(t.id))  # batched, cached, on the GPU
        for i, prompt in enumerate(PROMPTS):
            assert len(tokens_g[i]) == 48
            seq = [BOS_ID, *prompt.encode()]
            for want_tok, got_tok in zip(tokens_h[i], tokens_g[i], strict=True):
                if _top_margin(ref, seq) < 1e-3:
                    break  # a near tie: the two may rightly differ from here on
                assert got_tok == want_tok
                seq.append(want_tok)

        # In place: a flipped weight bit in VRAM changes the result, and verification sees it.
        with files.weights.open("rb") as f:
            _, tensors = parse_header(f.read(1 << 16), gs.vram_bytes)
        info = tensors["lm_head.weight"]
        flip_bit(gpu, gs, 8 * (info.start + 4 * 65 * config.hidden_size + 3) + 6)
        assert not np.allclose(lm.logits(ids)[:, 65], got[:, 65])
        with pytest.raises(SealVerificationFailed):
            gpu.verify_sealed(gs)
        lm.close()
        ref.close()
