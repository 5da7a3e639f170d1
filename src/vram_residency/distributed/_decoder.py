"""The example byte-level decoder, tensor-parallel: each rank runs on its own sealed part in place.

Megatron-style splitting of ``service.executors.decoder.ByteLM`` over ``W`` ranks:

* attention: ``q_proj``, ``k_proj``, ``v_proj`` are column-parallel (rank ``r`` holds heads
  ``r*nh/W .. (r+1)*nh/W - 1``, i.e. rows of the weight), ``o_proj`` is row-parallel (the matching
  columns); the partial outputs are summed with ONE all-reduce per attention block;
* MLP: ``gate_proj`` and ``up_proj`` column-parallel, ``down_proj`` row-parallel, ONE all-reduce
  per MLP block;
* the embedding, the norms and ``lm_head`` (258 x hidden: small) are replicated on every rank, so
  every rank computes the same logits and picks the same token without a further collective.

:func:`split_byte_lm` writes each rank's part as its own safetensors file; a rank seals its file
(``VramManager.seal_file``) and :class:`TPByteLM` views the tensors inside that sealed shard in
place (numpy over the host backend's memory, CuPy over VRAM), exactly like the single-process
executor: the bytes a collective verify just checked are the bytes each product reads. The sums
run in a different order than in one process, so logits agree within float32 rounding, not bit
for bit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from vram_residency.errors import InvalidInput
from vram_residency.manager import VramManager
from vram_residency.service.executor import DeviceMemory
from vram_residency.service.executors.decoder import (
    BOS_ID,
    EOS_ID,
    VOCAB_SIZE,
    ByteLMConfig,
    rms_norm,
    rope,
    silu,
    softmax,
)
from vram_residency.service.executors.safetensors_view import SafetensorsView, open_view
from vram_residency.shard import SealedShard

__all__ = ["TPByteLM", "part_file_name", "split_byte_lm"]

_NEG: Final = np.float32(-1e30)
_COLUMN: Final = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
)
_ROW: Final = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def part_file_name(rank: int, world: int) -> str:
    return f"model-tp{rank:02d}-of-{world:02d}.safetensors"


def _check_split(config: ByteLMConfig, world: int) -> None:
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise InvalidInput("world size must be a positive integer")
    if config.num_heads % world or config.intermediate_size % world:
        raise InvalidInput(
            f"num_heads ({config.num_heads}) and intermediate_size ({config.intermediate_size}) must "
            f"divide by the world size {world}"
        )


def split_byte_lm(
    weights: bytes | bytearray | memoryview | str | os.PathLike[str],
    config: ByteLMConfig,
    world: int,
    out_dir: str | os.PathLike[str],
) -> list[Path]:
    """Split a ByteLM safetensors file (a path, or its bytes) into ``world`` rank parts, written to
    ``out_dir`` as :func:`part_file_name` files; returns their paths in rank order."""
    from safetensors.numpy import load, save_file

    config.check()
    _check_split(config, world)
    raw = Path(weights).read_bytes() if isinstance(weights, (str, os.PathLike)) else bytes(weights)
    try:
        tensors = load(raw)
    except Exception as exc:  # safetensors raises its own error types for a malformed file
        raise InvalidInput(f"not a safetensors file: {exc}") from None
    shapes = config.tensor_shapes()
    for name, shape in shapes.items():
        arr = tensors.get(name)
        if arr is None or arr.dtype != np.float32 or arr.shape != shape:
            raise InvalidInput(f"tensor {name!r}: expected float32 {shape}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in range(world):
        part: dict[str, np.ndarray] = {}
        for name in shapes:
            arr = tensors[name]
            if name.endswith(_COLUMN):
                n = arr.shape[0] // world
                part[name] = np.ascontiguousarray(arr[r * n : (r + 1) * n])
            elif name.endswith(_ROW):
                n = arr.shape[1] // world
                part[name] = np.ascontiguousarray(arr[:, r * n : (r + 1) * n])
            else:
                part[name] = arr
        meta = {"tp_rank": str(r), "tp_world_size": str(world), "config": json.dumps(config.to_json())}
        path = out / part_file_name(r, world)
        save_file(part, str(path), metadata=meta)
        paths.append(path)
    return paths


def _shard_view(mgr: VramManager, shard: SealedShard) -> SafetensorsView:
    """The tensors of a sealed safetensors shard, in place. Through ``VramManager.device_buffer``:
    nothing is copied."""
    buf = mgr.device_buffer(shard)
    caps = mgr.capabilities
    host = buf.host_view() if caps.host_view else None
    dev = None
    if host is None and caps.device_pointer and buf.device_pointer:
        dev = DeviceMemory(ptr=buf.device_pointer, size=shard.vram_bytes, device=mgr.device, owner=buf)
    view, _ = open_view(host, dev)
    return view


class TPByteLM:
    """One rank of the tensor-parallel ByteLM, over the rank's sealed part (see module doc).

    Every rank of ``group`` must make the same calls with the same inputs (each call runs one
    all-reduce per block). Greedy decoding with a key/value cache, one sequence at a time.
    """

    def __init__(
        self,
        mgr: VramManager,
        shard: SealedShard,
        config: ByteLMConfig,
        *,
        rank: int,
        world: int,
        group: Any = None,
    ) -> None:
        config.check()
        _check_split(config, world)
        self._c, self._rank, self._world, self._group = config, rank, world, group
        self._view = _shard_view(mgr, shard)
        try:
            self._bind()
        except BaseException:
            self.close()
            raise
        self._xp = self._view.xp
        dh = config.head_dim
        inv = config.rope_theta ** (-np.arange(0, dh, 2, dtype=np.float64) / dh)
        ang = np.arange(config.max_position, dtype=np.float64)[:, None] * inv[None, :]
        self._cos = self._xp.asarray(np.cos(ang).astype(np.float32))
        self._sin = self._xp.asarray(np.sin(ang).astype(np.float32))
        self.all_reduces = 0

    def _bind(self) -> None:
        c, w = self._c, self._world
        hl, il = c.hidden_size // w, c.intermediate_size // w
        want: dict[str, tuple[int, ...]] = {}
        for name, shape in c.tensor_shapes().items():
            if name.endswith(_COLUMN):
                want[name] = (shape[0] // w, shape[1])
            elif name.endswith(_ROW):
                want[name] = (shape[0], shape[1] // w)
            else:
                want[name] = shape
        self._w: dict[str, Any] = {}
        for name, shape in want.items():
            if name not in self._view:
                raise InvalidInput(f"tensor {name!r} missing from rank {self._rank}'s part")
            arr = self._view.array(name)
            if arr.dtype != np.float32 or tuple(arr.shape) != shape:
                raise InvalidInput(f"rank {self._rank}: tensor {name!r} is not float32 {shape}")
            self._w[name] = arr
        self._hl, self._il, self._nhl = hl, il, c.num_heads // w

    def close(self) -> None:
        self._w = {}
        self._view.close()

    def _all_reduce(self, x: Any) -> Any:
        import torch.distributed as dist
        from torch.utils.dlpack import from_dlpack

        if self._world == 1:
            return x
        x = self._xp.ascontiguousarray(x)
        dist.all_reduce(from_dlpack(x), group=self._group)  # in place, shared memory
        self.all_reduces += 1
        return x

    def _layer(self, n: int, x: Any, cos: Any, sin: Any, kc: Any, vc: Any, pos: int, causal: Any) -> Any:
        """One block over positions ``pos .. pos+t-1`` of x (t, hidden); fills the caches."""
        c, xp, w = self._c, self._xp, self._w
        p = f"layers.{n}."
        t, nh, dh = x.shape[0], self._nhl, c.head_dim
        h = rms_norm(x, w[p + "input_layernorm.weight"], c.rms_norm_eps, xp)

        def heads(name: str) -> Any:  # (t, hidden/W) -> (local heads, t, head_dim)
            return (h @ w[p + name].T).reshape(t, nh, dh).transpose(1, 0, 2)

        q = rope(heads("self_attn.q_proj.weight"), cos, sin, xp)
        k = rope(heads("self_attn.k_proj.weight"), cos, sin, xp)
        v = heads("self_attn.v_proj.weight")
        kc[:, pos : pos + t] = k
        vc[:, pos : pos + t] = v
        scale = np.float32(1 / math.sqrt(dh))
        probs = softmax((q @ kc[:, : pos + t].transpose(0, 2, 1)) * scale + causal, xp)
        ctx = (probs @ vc[:, : pos + t]).transpose(1, 0, 2).reshape(t, self._hl)
        x = x + self._all_reduce(ctx @ w[p + "self_attn.o_proj.weight"].T)
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps, xp)
        g = silu(h @ w[p + "mlp.gate_proj.weight"].T, xp) * (h @ w[p + "mlp.up_proj.weight"].T)
        return x + self._all_reduce(g @ w[p + "mlp.down_proj.weight"].T)

    def _forward(self, ids: np.ndarray, caches: list[tuple[Any, Any]], pos: int) -> Any:
        """Run tokens ``ids`` at positions ``pos ..``; logits of every one of them (t, vocab)."""
        c, xp = self._c, self._xp
        t = len(ids)
        x = self._w["embed_tokens.weight"][xp.asarray(ids)]
        cos, sin = self._cos[pos : pos + t][None], self._sin[pos : pos + t][None]
        mask = np.where(np.arange(pos + t)[None, :] > (pos + np.arange(t))[:, None], _NEG, np.float32(0))
        causal = xp.asarray(mask.astype(np.float32))
        for n, (kc, vc) in enumerate(caches):
            x = self._layer(n, x, cos, sin, kc, vc, pos, causal)
        return rms_norm(x, self._w["norm.weight"], c.rms_norm_eps, xp) @ self._w["lm_head.weight"].T

    def _caches(self, total: int) -> list[tuple[Any, Any]]:
        shape = (self._nhl, total, self._c.head_dim)
        xp = self._xp
        return [(xp.zeros(shape, np.float32), xp.zeros(shape, np.float32)) for _ in range(self._c.num_layers)]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of ``ids`` (one prefill), on the host."""
        arr = np.asarray(ids, dtype=np.int64)
        out = self._forward(arr, self._caches(len(arr)), 0)
        return np.asarray(getattr(self._xp, "asnumpy", np.asarray)(out), dtype=np.float32)

    def generate(
        self, prompt: bytes, max_tokens: int, on_token: Callable[[int], object] | None = None
    ) -> list[int]:
        """Greedy tokens after ``<bos>`` + ``prompt`` (stops at ``<eos>``; never emits ``<bos>``).

        ``on_token`` gets each token the moment it is chosen (the service streams it); what it
        returns is ignored: every rank must run the same steps, so a rank cannot stop alone."""
        if not max_tokens >= 1 or 1 + len(prompt) + max_tokens > self._c.max_position:
            raise InvalidInput("prompt plus max_tokens exceeds the model's context")
        ids = np.concatenate(([BOS_ID], np.frombuffer(prompt, dtype=np.uint8))).astype(np.int64)
        caches = self._caches(len(ids) + max_tokens)
        logits = self._forward(ids, caches, 0)[-1]
        pos, out = len(ids), list[int]()
        to_host = getattr(self._xp, "asnumpy", np.asarray)
        while True:
            row = np.asarray(to_host(logits), dtype=np.float32).copy()
            row[BOS_ID] = _NEG
            tok = int(row.argmax())
            if tok == EOS_ID:
                return out
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if len(out) >= max_tokens:
                return out
            logits = self._forward(np.array([tok], dtype=np.int64), caches, pos)[-1]
            pos += 1


assert VOCAB_SIZE == 258
