"""The built-in BERT executor on VRAM (CuPy over the sealed allocation, in place) computes what
the numpy executor computes on the host backend, for the same sealed weights.

A small BERT with random weights and its own WordPiece tokenizer is generated here, so the test
needs no downloaded model; the real all-MiniLM-L6-v2 run is tests/service/test_bert_gpu.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed"),
]

H, INTER, LAYERS, HEADS, MAXPOS = 64, 128, 2, 4, 64
TOKEN = "gpu-executor-token-0123456789abcdef"


def _model_dir(root: Path) -> Path:
    from safetensors.numpy import save_file
    from tokenizers import BertWordPieceTokenizer

    d = root / "tiny-bert"
    d.mkdir()
    tok = BertWordPieceTokenizer(lowercase=True)
    corpus = ["the weights stay resident in gpu memory", "sealed and verified before every use"] * 50
    tok.train_from_iterator(corpus, vocab_size=120, min_frequency=1)
    tok.save(str(d / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    rng = np.random.default_rng(7)

    def w(*shape: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    t: dict[str, np.ndarray[Any, Any]] = {
        "embeddings.word_embeddings.weight": w(vocab, H),
        "embeddings.position_embeddings.weight": w(MAXPOS, H),
        "embeddings.token_type_embeddings.weight": w(2, H),
        "embeddings.LayerNorm.weight": 1 + w(H),
        "embeddings.LayerNorm.bias": w(H),
    }
    for n in range(LAYERS):
        p = f"encoder.layer.{n}."
        for name, shape in (
            ("attention.self.query", (H, H)),
            ("attention.self.key", (H, H)),
            ("attention.self.value", (H, H)),
            ("attention.output.dense", (H, H)),
            ("intermediate.dense", (INTER, H)),
            ("output.dense", (H, INTER)),
        ):
            t[p + name + ".weight"] = w(*shape)
            t[p + name + ".bias"] = w(shape[0])
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"] = 1 + w(H)
            t[p + ln + ".bias"] = w(H)
    save_file(t, str(d / "model.safetensors"))
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "bert",
                "hidden_size": H,
                "num_hidden_layers": LAYERS,
                "num_attention_heads": HEADS,
                "intermediate_size": INTER,
                "max_position_embeddings": MAXPOS,
                "vocab_size": vocab,
                "hidden_act": "gelu",
                "layer_norm_eps": 1e-12,
            }
        )
    )
    return d


def _embed(backend: str, model: Path, prompts: list[str]) -> np.ndarray[Any, Any]:
    from vram_residency import VramManager
    from vram_residency.service.catalog import ModelCatalog
    from vram_residency.service.executor import DeviceMemory, SealedWeights
    from vram_residency.service.executors.encoder import bert_factory

    files = ModelCatalog(model.parent).resolve(model.name)
    with VramManager(TOKEN, backend=backend) as mgr:  # type: ignore[arg-type]
        shard = mgr.seal_file(files.weights)
        buf = mgr.device_buffer(shard)
        if backend == "cuda":
            dev = DeviceMemory(ptr=buf.device_pointer, size=shard.vram_bytes, device=mgr.device, owner=buf)
            weights = SealedWeights(files, "cuda", shard.vram_bytes, None, dev)
        else:
            weights = SealedWeights(files, "host", shard.vram_bytes, buf.host_view(shard.vram_bytes))
        enc = bert_factory(weights)
        assert enc is not None
        assert ("CuPy" in enc.description) == (backend == "cuda")
        outs = enc.run([enc.prepare(p, None) for p in prompts])
        enc.close()
        mgr.verify_sealed(shard)  # still intact after running on it
    return np.array([o.end["embedding"] for o in outs], dtype=np.float64)


def test_cuda_executor_matches_host_executor(tmp_path: Path) -> None:
    model = _model_dir(tmp_path)
    prompts = ["the weights stay resident", "sealed and verified before every use", "gpu memory"]
    on_gpu = _embed("cuda", model, prompts)
    on_host = _embed("host", model, prompts)
    assert on_gpu.shape == (3, H)
    assert np.all(np.isfinite(on_gpu))
    rel = np.linalg.norm(on_gpu - on_host) / np.linalg.norm(on_host)
    assert rel < 1e-4, rel
