"""A BERT sentence encoder that runs on sealed weights in place: numpy on the host, CuPy on a GPU.

This is the built-in executor of the example model, ``all-MiniLM-L6-v2`` (BERT, 6 layers, 384
hidden units): an *embedding* model, not a generator. It computes the sentence-transformers
embedding: BERT's last hidden states, mean-pooled over the attention mask, L2-normalized.

Every weight is a view over the sealed shard's memory, taken at the tensor offsets of the
safetensors header that is itself inside the shard: read-only ``numpy`` arrays over the host
backend's emulated device memory, or CuPy arrays over the CUDA backend's allocation (when CuPy is
installed). Nothing is copied out of the shard, so the bytes that the worker verified right
before ``run`` are the bytes the matrix products read. The same code runs on both: ``xp`` is the
array module.

The tokenizer and the configuration files are read from the model directory at commit time. They
are not in the seal; their SHA-256 is recorded in the commit's audit event and in /worker/ready.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from vram_residency.errors import InvalidInput
from vram_residency.service.executor import JobInput, JobOutput, Sampling, SealedWeights
from vram_residency.service.executors.safetensors_view import InPlaceExecutor

__all__ = ["BertConfig", "BertEncoder", "bert_factory", "cupy_available"]

#: An array of the executor's array module (numpy.ndarray or cupy.ndarray), float32.
F32 = Any

# Abramowitz & Stegun 7.1.26: |error| < 1.5e-7, below float32 resolution near 1. numpy has no erf,
# and BERT's "gelu" is the exact erf form, not the tanh approximation.
_P: Final = np.float32(0.3275911)
_A: Final = tuple(np.float32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))
_INV_SQRT2: Final = np.float32(1 / math.sqrt(2))


def _erf(x: F32, xp: Any) -> F32:
    a = xp.abs(x)
    t = np.float32(1) / (np.float32(1) + _P * a)
    poly = ((((_A[4] * t + _A[3]) * t + _A[2]) * t + _A[1]) * t + _A[0]) * t
    # a * a overflows to inf for |x| > 1.8e19; exp(-inf) = 0 then gives erf = +-1, as it should.
    with np.errstate(over="ignore"):
        y = np.float32(1) - poly * xp.exp(-a * a)
    return xp.copysign(y, x).astype(np.float32, copy=False)


def _gelu(x: F32, xp: Any) -> F32:
    return (np.float32(0.5) * x * (np.float32(1) + _erf(x * _INV_SQRT2, xp))).astype(np.float32, copy=False)


def _layer_norm(x: F32, w: F32, b: F32, eps: float, xp: Any) -> F32:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keepdims=True)
    return (centered / xp.sqrt(var + np.float32(eps)) * w + b).astype(np.float32, copy=False)


def cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


#: Most padding a sub-batch may carry, relative to its real tokens: every sequence of a
#: sub-batch is padded to its longest, and padded positions cost as much as real ones.
_MAX_PADDING: Final = 0.25


def _length_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Indices grouped into sub-batches of similar length (shortest first)."""
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]
        if current and (len(current) + 1) * n > (1 + _MAX_PADDING) * (real + n):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += n
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True, slots=True)
class BertConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    max_position: int
    max_seq_length: int
    pooling: str  # "mean" or "cls"

    @classmethod
    def from_files(
        cls, config: Path, sentence_config: Path | None, pooling_config: Path | None
    ) -> BertConfig:
        try:
            cfg: dict[str, Any] = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot read model config {config.name}: {exc}") from None
        if cfg.get("model_type") != "bert":
            raise InvalidInput(f"model_type {cfg.get('model_type')!r} is not 'bert'")
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise InvalidInput(f"hidden_act {cfg.get('hidden_act')!r} is not supported (only 'gelu')")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise InvalidInput("only absolute position embeddings are supported")
        max_position = int(cfg.get("max_position_embeddings", 512))
        max_seq = max_position
        if sentence_config is not None:
            try:
                max_seq = min(max_position, int(json.loads(sentence_config.read_text())["max_seq_length"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InvalidInput(f"cannot read {sentence_config.name}: {exc}") from None
        pooling = "mean"
        if pooling_config is not None:
            try:
                pc = json.loads(pooling_config.read_text())
            except (OSError, ValueError) as exc:
                raise InvalidInput(f"cannot read {pooling_config.name}: {exc}") from None
            if pc.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif not pc.get("pooling_mode_mean_tokens", True):
                raise InvalidInput("only mean or CLS pooling is supported")
        try:
            conf = cls(
                hidden_size=int(cfg["hidden_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=int(cfg["num_attention_heads"]),
                intermediate_size=int(cfg["intermediate_size"]),
                layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                max_position=max_position,
                max_seq_length=max_seq,
                pooling=pooling,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"model config is incomplete: {exc}") from None
        if conf.num_heads <= 0 or conf.hidden_size % conf.num_heads:
            raise InvalidInput("hidden_size must be a multiple of num_attention_heads")
        return conf


@dataclass(frozen=True, slots=True)
class _Layer:
    wq: F32
    bq: F32
    wk: F32
    bk: F32
    wv: F32
    bv: F32
    wo: F32
    bo: F32
    ln1_w: F32
    ln1_b: F32
    wi: F32
    bi: F32
    wo2: F32
    bo2: F32
    ln2_w: F32
    ln2_b: F32


class BertEncoder(InPlaceExecutor):
    """Mean-pooled, L2-normalized BERT sentence embeddings over in-place sealed weights."""

    kind = "embedding"
    _VIEW_ATTRS = ("_word", "_pos", "_type0", "_emb_ln")  # views of the shard, dropped on close

    def __init__(self, weights: SealedWeights, tokenizer_path: Path, config: BertConfig) -> None:
        if weights.host_memory is None and weights.device_memory is None:
            raise InvalidInput("the BERT executor needs the shard's memory (host or CUDA)")
        from tokenizers import Tokenizer

        self._name = weights.files.name
        self._config = config
        try:
            tok = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises its own untyped exceptions
            raise InvalidInput(f"cannot load tokenizer {tokenizer_path.name}: {exc}") from None
        tok.no_padding()
        tok.enable_truncation(config.max_seq_length)
        self._tokenizer = tok
        self._open(weights, lambda: self._bind(config))
        self._size = weights.size

    def _bind(self, c: BertConfig) -> None:
        names = set(self._view)
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in names else ""

        def t(name: str, shape: tuple[int, ...]) -> F32:
            full = prefix + name
            if full not in names:
                raise InvalidInput(f"tensor {full!r} missing from the model")
            arr = self._view.array(full)
            if arr.dtype != np.float32 or arr.shape != shape:
                raise InvalidInput(
                    f"tensor {full!r}: expected float32 {shape}, found {arr.dtype} {arr.shape}"
                )
            return arr

        h, i = c.hidden_size, c.intermediate_size
        word = self._view.array(prefix + "embeddings.word_embeddings.weight")
        if word.ndim != 2 or word.shape[1] != h or word.dtype != np.float32:
            raise InvalidInput("word embeddings do not match hidden_size")
        self._word = word
        self._pos = t("embeddings.position_embeddings.weight", (c.max_position, h))
        types = self._view.array(prefix + "embeddings.token_type_embeddings.weight")
        if types.ndim != 2 or types.shape[1] != h:
            raise InvalidInput("token type embeddings do not match hidden_size")
        self._type0: F32 = types[0]
        self._emb_ln = (t("embeddings.LayerNorm.weight", (h,)), t("embeddings.LayerNorm.bias", (h,)))
        layers = []
        for n in range(c.num_layers):
            p = f"encoder.layer.{n}."
            layers.append(
                _Layer(
                    wq=t(p + "attention.self.query.weight", (h, h)),
                    bq=t(p + "attention.self.query.bias", (h,)),
                    wk=t(p + "attention.self.key.weight", (h, h)),
                    bk=t(p + "attention.self.key.bias", (h,)),
                    wv=t(p + "attention.self.value.weight", (h, h)),
                    bv=t(p + "attention.self.value.bias", (h,)),
                    wo=t(p + "attention.output.dense.weight", (h, h)),
                    bo=t(p + "attention.output.dense.bias", (h,)),
                    ln1_w=t(p + "attention.output.LayerNorm.weight", (h,)),
                    ln1_b=t(p + "attention.output.LayerNorm.bias", (h,)),
                    wi=t(p + "intermediate.dense.weight", (i, h)),
                    bi=t(p + "intermediate.dense.bias", (i,)),
                    wo2=t(p + "output.dense.weight", (h, i)),
                    bo2=t(p + "output.dense.bias", (h,)),
                    ln2_w=t(p + "output.LayerNorm.weight", (h,)),
                    ln2_b=t(p + "output.LayerNorm.bias", (h,)),
                )
            )
        self._layers: list[_Layer] = layers

    @property
    def description(self) -> str:
        c = self._config
        return (
            f"{self._name}: BERT sentence encoder ({c.num_layers} layers, {c.hidden_size} hidden, "
            f"{c.pooling} pooling), EMBEDDING model, {self._where} over the sealed weights in place"
        )

    @property
    def dimension(self) -> int:
        return self._config.hidden_size

    # -- Executor -----------------------------------------------------------------------------
    def prepare(self, prompt: str, max_tokens: int | None, sampling: Sampling | None = None) -> JobInput:
        # An encoder has nothing to sample: temperature and seed do not change an embedding.
        del sampling
        if not prompt.strip():
            raise InvalidInput("prompt is empty")
        enc = self._tokenizer.encode(prompt)
        ids, tokens = list(enc.ids), list(enc.tokens)
        if max_tokens is not None:
            # An encoder reads at least [CLS] and [SEP]: max_tokens 1 (valid by the contract)
            # reads those two.
            max_tokens = max(max_tokens, 2)
        if max_tokens is not None and len(ids) > max_tokens:
            # Keep the closing [SEP]: the model was trained on complete sequences.
            ids, tokens = ids[: max_tokens - 1] + ids[-1:], tokens[: max_tokens - 1] + tokens[-1:]
        return JobInput(tokens=tuple(tokens), data=np.asarray(ids, dtype=np.int64))

    def run(self, jobs: Sequence[JobInput]) -> list[JobOutput]:
        if not jobs:
            return []
        emb = np.empty((len(jobs), self._config.hidden_size), dtype=np.float32)
        to_host = getattr(self._xp, "asnumpy", np.asarray)
        for group in _length_groups([len(j.data) for j in jobs]):
            emb[group] = to_host(self.encode_ids([jobs[i].data for i in group]))
        out = []
        for j, vec in zip(jobs, emb, strict=True):
            out.append(
                JobOutput(
                    end={
                        "kind": "embedding",
                        "tokens_in": len(j.tokens),
                        "dimension": int(vec.shape[0]),
                        "embedding_sha256": hashlib.sha256(vec.astype("<f4").tobytes()).hexdigest()[:16],
                        "embedding": [float(v) for v in vec],
                    }
                )
            )
        return out

    # -- the model ----------------------------------------------------------------------------
    def encode_ids(self, ids_list: Sequence[Any]) -> F32:
        """Embeddings (batch x hidden, float32, unit length) of token-id sequences (int64 numpy
        arrays), as an array of the executor's array module."""
        c, xp = self._config, self._xp
        b = len(ids_list)
        t = max(len(x) for x in ids_list)
        if t > c.max_position:
            raise InvalidInput(f"sequence of {t} tokens exceeds max_position_embeddings {c.max_position}")
        vocab = self._word.shape[0]
        ids_host = np.zeros((b, t), dtype=np.int64)
        mask_host = np.zeros((b, t), dtype=np.float32)
        for row, seq in enumerate(ids_list):
            if seq.size and (seq.min() < 0 or seq.max() >= vocab):
                raise InvalidInput("token id outside the vocabulary")
            ids_host[row, : len(seq)] = seq
            mask_host[row, : len(seq)] = 1.0
        ids, mask = xp.asarray(ids_host), xp.asarray(mask_host)
        h = c.hidden_size
        nh = c.num_heads
        dh = h // nh
        emb: F32 = self._word[ids] + self._pos[:t][None, :, :] + self._type0
        x = _layer_norm(emb.reshape(b * t, h), *self._emb_ln, c.layer_norm_eps, xp)
        # Padded keys get a large negative score, so they take no attention weight.
        key_bias = ((np.float32(1.0) - mask) * np.float32(-1e9))[:, None, None, :]
        scale = np.float32(1.0 / math.sqrt(dh))
        for ly in self._layers:
            q = (x @ ly.wq.T + ly.bq).reshape(b, t, nh, dh).transpose(0, 2, 1, 3)
            k = (x @ ly.wk.T + ly.bk).reshape(b, t, nh, dh).transpose(0, 2, 3, 1)
            v = (x @ ly.wv.T + ly.bv).reshape(b, t, nh, dh).transpose(0, 2, 1, 3)
            scores = (q @ k) * scale + key_bias
            scores -= scores.max(axis=-1, keepdims=True)
            probs = xp.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b * t, h)
            x = _layer_norm(x + (ctx @ ly.wo.T + ly.bo), ly.ln1_w, ly.ln1_b, c.layer_norm_eps, xp)
            inter = _gelu(x @ ly.wi.T + ly.bi, xp)
            x = _layer_norm(x + (inter @ ly.wo2.T + ly.bo2), ly.ln2_w, ly.ln2_b, c.layer_norm_eps, xp)
        hidden = x.reshape(b, t, h)
        if c.pooling == "cls":
            pooled = hidden[:, 0, :]
        else:
            summed = (hidden * mask[:, :, None]).sum(axis=1)
            pooled = summed / xp.maximum(mask.sum(axis=1, keepdims=True), np.float32(1e-9))
        norms = xp.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / xp.maximum(norms, np.float32(1e-12))).astype(np.float32, copy=False)


def bert_factory(weights: SealedWeights) -> BertEncoder | None:
    """An executor for a BERT sentence encoder in safetensors with a tokenizer.json beside it;
    ``None`` for any other model (it is then sealed and verified, but not executable)."""
    f = weights.files
    if f.format != "safetensors" or f.config is None or f.tokenizer is None:
        return None
    if weights.host_memory is None and (weights.device_memory is None or not cupy_available()):
        return None
    try:
        model_type = json.loads(f.config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if model_type != "bert":
        return None
    config = BertConfig.from_files(f.config, f.sentence_config, f.pooling_config)
    return BertEncoder(weights, f.tokenizer, config)
