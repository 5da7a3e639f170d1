"""The byte-level decoder: its numpy forward against an independent float64 reference on the same
weights, cached decoding against full recomputation, batching, the generator's determinism, and
that it reads the sealed memory in place."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vram_residency import SealVerificationFailed, VramManager
from vram_residency.errors import InvalidInput
from vram_residency.service.executor import ModelFiles, SealedWeights, Token
from vram_residency.service.executors.decoder import (
    BOS_ID,
    DEFAULT_MAX_TOKENS,
    MAX_TOKENS_CAP,
    ByteLM,
    ByteLMConfig,
    byte_lm_factory,
)
from vram_residency.service.executors.example_model import PRESETS, ensure_example, file_image
from vram_residency.service.executors.safetensors_view import parse_header
from vram_residency.testing import flip_bit

NEEDS_MINILM = False  # see conftest.py
TOKEN = "decoder-test-token-0123456789abcdef"
TINY = ByteLMConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position=160)


def write_model(dest: Path, config: ByteLMConfig, seed: int = 7) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model.safetensors").write_bytes(file_image(config, seed))
    (dest / "config.json").write_text(json.dumps(config.to_json()))
    return dest


def model_files(root: Path) -> ModelFiles:
    return ModelFiles("tiny-lm", root / "model.safetensors", "safetensors", root, config=root / "config.json")


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VramManager, Any, ByteLM, Path]]:
    root = write_model(tmp_path_factory.mktemp("tiny-lm"), TINY)
    files = model_files(root)
    mgr = VramManager(TOKEN, backend="host")
    shard = mgr.seal_file(files.weights)
    buf = mgr._entry(shard).buf
    lm = byte_lm_factory(SealedWeights(files, "host", shard.vram_bytes, buf.host_view()))
    assert isinstance(lm, ByteLM)
    yield mgr, shard, lm, root
    lm.close()
    mgr.deallocate(shard)  # succeeds only if the executor let go of every view
    mgr.close()


# -- an independent reference: float64, complex-number RoPE, one head at a time ----------------
def _weights(root: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(str(root / "model.safetensors")).items()}


def reference_logits(w: dict[str, np.ndarray], c: ByteLMConfig, ids: list[int]) -> np.ndarray:
    t, dh = len(ids), c.hidden_size // c.num_heads
    half = dh // 2
    freqs = c.rope_theta ** (-2.0 * np.arange(half) / dh)
    rot = np.exp(1j * np.outer(np.arange(t), freqs))  # (t, half): position p turns pair i by p*f_i

    def rms(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        out: np.ndarray = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + c.rms_norm_eps) * g
        return out

    def rotate(x: np.ndarray) -> np.ndarray:  # x (t, dh); pairs are (i, i + half)
        z = (x[:, :half] + 1j * x[:, half:]) * rot
        return np.concatenate([z.real, z.imag], axis=1)

    x = w["embed_tokens.weight"][ids]
    for n in range(c.num_layers):
        p = f"layers.{n}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q, k, v = (h @ w[p + f"self_attn.{m}_proj.weight"].T for m in "qkv")
        heads = []
        for hd in range(c.num_heads):
            cols = slice(hd * dh, (hd + 1) * dh)
            s = rotate(q[:, cols]) @ rotate(k[:, cols]).T / math.sqrt(dh)
            s[np.triu_indices(t, 1)] = -np.inf
            a = np.exp(s - s.max(axis=1, keepdims=True))
            heads.append((a / a.sum(axis=1, keepdims=True)) @ v[:, cols])
        x = x + np.concatenate(heads, axis=1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = (
            x
            + ((g / (1 + np.exp(-g))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        )
    result: np.ndarray = rms(x, w["norm.weight"]) @ w["lm_head.weight"].T
    return result


def _ids(text: str) -> list[int]:
    return [BOS_ID, *text.encode()]


# -- numerics ---------------------------------------------------------------------------------
def test_forward_matches_the_reference(sealed: Any) -> None:
    _, _, lm, root = sealed
    ids = _ids("hello, sealed world")
    ref = reference_logits(_weights(root), TINY, ids)
    got = lm.logits(ids)
    assert got.shape == ref.shape == (len(ids), 258)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()) + 1e-6)


def test_cached_decoding_equals_full_recomputation(sealed: Any) -> None:
    _, _, lm, _ = sealed
    c = TINY
    prompts = [_ids("ab"), _ids("a longer prompt, 27 bytes!")]
    shape = (2, c.num_heads, 64, c.head_dim)
    caches = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(c.num_layers)]
    for row, ids in enumerate(prompts):
        lm._prefill(np.asarray(ids), caches, row)
    seqs = [list(p) for p in prompts]
    pos = np.array([len(p) for p in prompts])
    nxt = np.array([65, 66])
    for _ in range(5):  # rows at different positions, one step at a time, through the cache
        step = lm._decode_step(nxt, pos, caches)
        for row in range(2):
            seqs[row].append(int(nxt[row]))
            full = lm.logits(seqs[row])[-1]
            np.testing.assert_allclose(step[row], full, rtol=0, atol=1e-5)
        nxt, pos = (nxt * 7 + 3) % 256, pos + 1


def test_greedy_generation_follows_the_reference(sealed: Any) -> None:
    _, _, lm, root = sealed
    w = _weights(root)
    tokens: list[int] = []
    (out,) = lm.run_streaming([lm.prepare("The quick brown fox", 24)], lambda _i, tok: tokens.append(tok.id))
    assert out.end["tokens_out"] == len(tokens) == 24 and out.end["stop_reason"] == "max_tokens"
    assert out.end["output_sha256"] == hashlib.sha256(bytes(tokens)).hexdigest()[:16]
    seq = _ids("The quick brown fox")
    checked = 0
    for got in tokens:
        logits = reference_logits(w, TINY, seq)[-1]
        logits[BOS_ID] = -np.inf
        low, high = np.sort(logits)[-2:]
        if high - low < 1e-4:
            break  # a near tie: float32 may rightly pick either; compare no further
        assert got == int(np.argmax(logits))
        seq.append(got)
        checked += 1
    assert checked >= 8


def test_batched_run_equals_runs_one_by_one_and_streams_in_order(sealed: Any) -> None:
    _, _, lm, _ = sealed
    prompts = ["x", "a much longer prompt than the others", "medium prompt", "x"]
    alone = [lm.run([lm.prepare(p, n)])[0].end for p, n in zip(prompts, (5, 12, 9, 5), strict=True)]
    seen: dict[int, list[Token]] = {i: [] for i in range(4)}
    batch = lm.run_streaming(
        [lm.prepare(p, n) for p, n in zip(prompts, (5, 12, 9, 5), strict=True)],
        lambda i, tok: seen[i].append(tok),
    )
    assert [b.end for b in batch] == alone
    for i, end in enumerate(alone):
        assert all(0 <= t.id < 256 for t in seen[i])  # bytes: <bos> is never generated
        assert len(seen[i]) == end["tokens_out"]
        assert "".join(t.text for t in seen[i]) in (end["text"], end["text"][:-1])
    assert alone[0] == alone[3]  # deterministic


def test_a_batch_whose_long_prompt_ends_first_runs_to_its_end(sealed: Any) -> None:
    """A batch where the row with the longest prompt asks for the fewest tokens: once it is done,
    the other rows keep stepping, and the finished row must not be stepped past its own cache (it
    was: IndexError at the cache's end, every job of the batch ended with INTERNAL, found as eight
    concurrent executes against a real serve)."""
    _, _, lm, _ = sealed
    jobs = [("a long prompt, longer than the other one by far", 2), ("x", 40)]
    alone = [lm.run([lm.prepare(p, n)])[0].end for p, n in jobs]
    batch = lm.run([lm.prepare(p, n) for p, n in jobs])
    assert [b.end for b in batch] == alone
    # The short row stepped 40 times: well past the long row's end (its prompt is 47 bytes).
    assert [(e["tokens_out"], e["stop_reason"]) for e in alone] == [(2, "max_tokens"), (40, "max_tokens")]


def test_prepare_validates(sealed: Any) -> None:
    _, _, lm, _ = sealed
    assert lm.prepare("hi", None).data.max_tokens == DEFAULT_MAX_TOKENS
    for bad in (0, MAX_TOKENS_CAP + 1):
        with pytest.raises(InvalidInput, match="max_tokens"):
            lm.prepare("hi", bad)
    with pytest.raises(InvalidInput, match="context"):
        lm.prepare("y" * 150, 20)  # 1 + 150 + 20 > 160
    with pytest.raises(InvalidInput, match="empty"):
        lm.prepare("", 4)


def test_runs_on_the_sealed_memory_in_place(tmp_path: Path) -> None:
    root = write_model(tmp_path, TINY, seed=11)
    files = model_files(root)
    with VramManager(TOKEN, backend="host") as mgr:
        shard = mgr.seal_file(files.weights)
        lm = byte_lm_factory(
            SealedWeights(files, "host", shard.vram_bytes, mgr._entry(shard).buf.host_view())
        )
        assert lm is not None
        before = lm.logits(_ids("in place"))
        _, tensors = parse_header(files.weights.read_bytes(), shard.vram_bytes)
        info = tensors["lm_head.weight"]
        flip_bit(mgr, shard, 8 * (info.start + 4 * 65 * TINY.hidden_size + 3) + 6)  # row 'A', exponent
        after = lm.logits(_ids("in place"))
        assert not np.allclose(before[:, 65], after[:, 65])
        with pytest.raises(SealVerificationFailed):
            mgr.verify_sealed(shard)
        lm.close()


def test_factory_ignores_other_models(tmp_path: Path) -> None:
    root = write_model(tmp_path, TINY)
    cfg = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    weights = SealedWeights(model_files(root), "host", 8, memoryview(bytearray(8)))
    assert byte_lm_factory(weights) is None


# -- the generated example --------------------------------------------------------------------
def test_generation_is_deterministic_across_processes() -> None:
    here = hashlib.sha256(file_image(TINY)).hexdigest()
    assert hashlib.sha256(file_image(TINY)).hexdigest() == here
    assert hashlib.sha256(file_image(TINY, seed=1)).hexdigest() != here
    code = (
        "import hashlib\n"
        "from vram_residency.service.executors.decoder import ByteLMConfig\n"
        "from vram_residency.service.executors.example_model import file_image\n"
        "print(hashlib.sha256(file_image(ByteLMConfig(32, 2, 4, 64, 160))).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_example_is_written_once_and_rewritten_when_changed(tmp_path: Path) -> None:
    d = tmp_path / "state" / "example-models" / "random-byte-lm"
    first = ensure_example(d, "small", "sha256-tree-v1")
    assert first.written and (d.stat().st_mode & 0o777) == 0o700
    size = (d / "model.safetensors").stat().st_size
    assert 0 < size - PRESETS["small"].weight_bytes() < 16384 and 40e6 < size < 50e6
    again = ensure_example(d, "small", "sha256-tree-v1")
    assert not again.written and again.sha256 == first.sha256 and again.digest == first.digest
    with (d / "model.safetensors").open("r+b") as f:  # a changed byte on disk
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 1]))
    fixed = ensure_example(d, "small", "sha256-tree-v1")
    assert fixed.written and fixed.sha256 == first.sha256
    assert hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() == first.sha256
    assert not list(d.glob(".*.tmp"))  # nothing left over from the atomic writes
    with pytest.raises(InvalidInput):
        ensure_example(d, "no-such-preset", "sha256-tree-v1")
