"""The built-in executor: numerics of the numpy BERT, and that it reads the sealed memory in place."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.service.service_helpers import EXAMPLE_DIR, HELLO_WORLD_REFERENCE
from vram_residency import VramManager
from vram_residency.service.catalog import MINILM_MODEL, ModelCatalog
from vram_residency.service.executor import SealedWeights
from vram_residency.service.executors.encoder import BertEncoder, bert_factory
from vram_residency.service.executors.safetensors_view import parse_header
from vram_residency.testing import flip_bit

TOKEN = "bert-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def sealed() -> Iterator[tuple[VramManager, Any, BertEncoder]]:
    assert EXAMPLE_DIR is not None
    files = ModelCatalog(None, {MINILM_MODEL: EXAMPLE_DIR}).resolve(MINILM_MODEL)
    mgr = VramManager(TOKEN, backend="host")
    shard = mgr.seal_file(files.weights)
    buf = mgr._entry(shard).buf
    enc = bert_factory(SealedWeights(files, "host", shard.vram_bytes, buf.host_view()))
    assert isinstance(enc, BertEncoder)
    yield mgr, shard, enc
    enc.close()
    mgr.deallocate(shard)  # succeeds only if the executor let go of every view
    mgr.close()


def _embed(enc: BertEncoder, *texts: str) -> np.ndarray:
    # The encoder types its arrays as Any (it also runs on CuPy); here they are numpy arrays.
    out: np.ndarray = enc.encode_ids([enc.prepare(t, None).data for t in texts])
    return out


def test_hello_world_matches_the_published_embedding(sealed: Any) -> None:
    _, _, enc = sealed
    vec = _embed(enc, "hello world")[0]
    np.testing.assert_allclose(vec[:5], HELLO_WORLD_REFERENCE, atol=1e-4)
    assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5


def _reference_float64(texts: list[str], enc: BertEncoder) -> np.ndarray:
    """An independent, plain float64 BERT over a *copy* of the weights read with the
    ``safetensors`` package: one sequence at a time, exact erf, no batching, no masks."""
    from safetensors.numpy import load_file

    assert EXAMPLE_DIR is not None
    w = {k: v.astype(np.float64) for k, v in load_file(str(EXAMPLE_DIR / "model.safetensors")).items()}
    erf = np.vectorize(math.erf)

    def ln(x: np.ndarray, p: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        out: np.ndarray = (x - mu) / np.sqrt(var + 1e-12) * w[p + ".weight"] + w[p + ".bias"]
        return out

    def lin(x: np.ndarray, p: str) -> np.ndarray:
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    out = []
    for text in texts:
        ids = enc.prepare(text, None).data
        n = len(ids)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
        x = ln(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
        for i in range(6):
            p = f"encoder.layer.{i}."
            heads = []
            q, k, v = (lin(x, p + f"attention.self.{m}") for m in ("query", "key", "value"))
            for h in range(12):
                s = slice(32 * h, 32 * h + 32)
                a = q[:, s] @ k[:, s].T / math.sqrt(32)
                a = np.exp(a - a.max(-1, keepdims=True))
                heads.append((a / a.sum(-1, keepdims=True)) @ v[:, s])
            x = ln(
                x + lin(np.concatenate(heads, -1), p + "attention.output.dense"),
                p + "attention.output.LayerNorm",
            )
            hmid = lin(x, p + "intermediate.dense")
            hmid = 0.5 * hmid * (1 + erf(hmid / math.sqrt(2)))
            x = ln(x + lin(hmid, p + "output.dense"), p + "output.LayerNorm")
        pooled = x.mean(0)
        out.append(pooled / np.linalg.norm(pooled))
    return np.array(out)


def test_matches_an_independent_float64_implementation(sealed: Any) -> None:
    _, _, enc = sealed
    texts = ["hello world", "The quick brown fox jumps over the lazy dog.", "a", "GPU memory bit flips!"]
    ours = _embed(enc, *texts)  # one padded batch of different lengths
    ref = _reference_float64(texts, enc)
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_batched_equals_one_at_a_time(sealed: Any) -> None:
    _, _, enc = sealed
    texts = ["short", "a much longer sentence than the first one, with commas, and more words"]
    batch = _embed(enc, *texts)
    for i, t in enumerate(texts):
        np.testing.assert_allclose(batch[i], _embed(enc, t)[0], atol=1e-6)


def test_paraphrases_are_closer_than_unrelated_sentences(sealed: Any) -> None:
    _, _, enc = sealed
    e = _embed(enc, "A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome.")
    assert float(e[0] @ e[1]) > 0.6 > 0.2 > float(e[0] @ e[2])


def test_weights_are_views_of_the_sealed_memory(sealed: Any) -> None:
    mgr, shard, enc = sealed
    memory = np.frombuffer(mgr._entry(shard).buf.host_view(), dtype=np.uint8)
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        arr = enc._view.array(name)
        assert np.shares_memory(arr, memory)  # zero copy
        assert not arr.flags.writeable  # the executor cannot write through it
    del memory


def test_a_flipped_weight_bit_changes_the_output_without_reloading(sealed: Any) -> None:
    mgr, shard, enc = sealed
    before = _embed(enc, "hello world")[0]
    assert EXAMPLE_DIR is not None
    path = EXAMPLE_DIR / "model.safetensors"
    with path.open("rb") as f:
        _, tensors = parse_header(f.read(1 << 20), path.stat().st_size)
    info = tensors["encoder.layer.0.intermediate.dense.bias"]
    bit = 8 * (info.start + 3) + 6  # top exponent bit of the first bias value
    flip_bit(mgr, shard, bit)
    try:
        after = _embed(enc, "hello world")[0]
        # The executor computed with the changed byte: it reads the sealed memory itself.
        assert not np.allclose(before, after, atol=1e-3)
    finally:
        flip_bit(mgr, shard, bit)
    mgr.verify_sealed(shard)
    np.testing.assert_array_equal(_embed(enc, "hello world")[0], before)


def test_prepare_validates(sealed: Any) -> None:
    _, _, enc = sealed
    from vram_residency.errors import InvalidInput

    with pytest.raises(InvalidInput):
        enc.prepare("   ", None)
    long = enc.prepare("word " * 1000, None)
    assert len(long.tokens) == 256  # the model's max_seq_length
    assert long.tokens[-1] == "[SEP]"
