"""seal_tensors on the host backend: CPU memory adopted in place, never copied."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

from vram_residency import InvalidInput, SealVerificationFailed, VramManager
from vram_residency.formats import digest
from vram_residency.sources import check_model_record
from vram_residency.sources.tensors import AdoptedSource, describe_dlpack, named_tensors
from vram_residency.testing import flip_bit


def test_adopted_in_place_without_copy(mgr: VramManager, tensors_for: Any, token: str) -> None:
    tensors = tensors_for(3, {"wq": 400_000, "wk": 300_000, "scale": 1})
    free = mgr.available_vram()
    model = mgr.seal_tensors(tensors, model_name="attn")
    # Adopting takes nothing from the (emulated) device capacity: the memory is the framework's.
    assert mgr.available_vram() == free
    assert model.names == ("wq", "wk", "scale")
    for (_, arr), shard in zip(tensors.items(), model.shards, strict=True):
        assert shard.vram_bytes == arr.nbytes
        assert shard.digest == digest(arr.tobytes()).hex()
    mgr.verify_model(model)
    check_model_record(model.record(), token)
    # A write through the framework's own array is a write to the sealed memory.
    tensors["wk"][123] += 1.0
    with pytest.raises(SealVerificationFailed) as exc:
        mgr.verify_model(model)
    assert exc.value.corrupted_tensors == ["wk"]


def test_flip_bit_lands_in_the_framework_array(mgr: VramManager, tensors_for: Any) -> None:
    tensors = tensors_for(4, {"w": 1000})
    before = tensors["w"].copy()
    model = mgr.seal_tensors(tensors)
    flip_bit(mgr, model.shards[0], 0)
    assert tensors["w"].view(np.uint8)[0] == before.view(np.uint8)[0] ^ 1
    with pytest.raises(SealVerificationFailed):
        mgr.verify_sealed(model.shards[0])
    mgr.repair(model.shards[0], before)
    mgr.verify_sealed(model.shards[0])
    assert np.array_equal(tensors["w"], before)


def test_tied_names_share_one_shard(mgr: VramManager) -> None:
    emb = np.arange(300_000, dtype=np.float32)
    model = mgr.seal_tensors({"embed.weight": emb, "lm_head.weight": emb, "norm": np.ones(4, np.float32)})
    assert model.names == ("embed.weight", "norm")
    shard = model.shard("embed.weight")
    entry = mgr._entry(shard)
    assert [t.name for t in entry.tensors] == ["embed.weight", "lm_head.weight"]
    assert isinstance(entry.source, AdoptedSource) and entry.source.names == (
        "embed.weight",
        "lm_head.weight",
    )
    emb[5] = -1
    with pytest.raises(SealVerificationFailed) as exc:
        mgr.verify_sealed(shard)
    assert exc.value.corrupted_tensors == ["embed.weight", "lm_head.weight"]


def test_close_neither_zeroes_nor_frees_adopted_memory(tensors_for: Any) -> None:
    tensors = tensors_for(5, {"a": 10_000})
    keep = tensors["a"].copy()
    with VramManager("z" * 32, backend="host") as m:
        model = m.seal_tensors(tensors)
        m.deallocate(model.shards[0])
    assert np.array_equal(tensors["a"], keep)


def test_sequences_views_and_dtypes(mgr: VramManager) -> None:
    base = np.arange(64, dtype=np.int64).reshape(8, 8)
    model = mgr.seal_tensors([base[2:4], np.ones((3, 3), dtype=np.float16), np.zeros(5, dtype=bool)])
    assert model.names == ("0", "1", "2")
    assert model.shards[0].digest == digest(base[2:4].tobytes()).hex()
    assert model.name == "tensors"


@pytest.mark.parametrize(
    ("tensors", "why"),
    [
        ({"t": np.arange(20, dtype=np.float32)[::2]}, "not contiguous"),
        ({"t": np.frombuffer(b"\x00" * 16, dtype=np.float32)}, "read-only"),
        ({"t": [1.0, 2.0]}, "neither the buffer protocol nor DLPack"),
        ({"t": np.zeros(0, dtype=np.float32)}, "nothing to seal"),
        ({}, "no tensors"),
        ({1: np.zeros(3)}, "names must be strings"),
    ],
)
def test_refused_tensors(mgr: VramManager, audit: Any, tensors: Any, why: str) -> None:
    free = mgr.available_vram()
    with pytest.raises(InvalidInput, match=why):
        mgr.seal_tensors(tensors)
    assert mgr.shards() == [] and mgr.available_vram() == free
    assert "VramSealed" not in audit.names()


def test_empty_tensors_are_skipped(mgr: VramManager) -> None:
    model = mgr.seal_tensors({"e": np.zeros(0, np.float32), "x": np.ones(3, np.float32)})
    assert model.names == ("x",)


class ModuleLike:
    """Not torch: the two methods of torch.nn.Module that seal_tensors walks, so the module path
    runs in CI without torch installed (the torch test below runs it against the real thing)."""

    def __init__(self) -> None:
        self.w = np.arange(1000, dtype=np.float32)
        self.running_mean = np.zeros(10, dtype=np.float32)

    def named_parameters(self, remove_duplicate: bool = True) -> Any:
        yield "layer.weight", self.w
        yield "tied.weight", self.w

    def named_buffers(self, remove_duplicate: bool = True) -> Any:
        yield "bn.running_mean", self.running_mean


def test_module_protocol(mgr: VramManager) -> None:
    mod = ModuleLike()
    assert [n for n, _ in named_tensors(mod)] == ["layer.weight", "tied.weight", "bn.running_mean"]
    model = mgr.seal_tensors(mod)
    assert model.name == "ModuleLike"
    assert model.names == ("layer.weight", "bn.running_mean")


def test_dlpack_capsule_is_read_correctly() -> None:
    arr = np.arange(24, dtype=np.float64).reshape(4, 6)
    info = describe_dlpack(arr)
    assert info.ptr == arr.ctypes.data and info.nbytes == arr.nbytes
    assert (info.device_type, info.device_id) == (1, 0)
    view = arr[1:3]
    assert describe_dlpack(view).ptr == view.ctypes.data
    with pytest.raises(InvalidInput, match="not contiguous"):
        describe_dlpack(arr[:, ::2])
    with pytest.raises(InvalidInput, match="not contiguous"):
        describe_dlpack(arr.T)
    # Size-1 dimensions may carry any stride.
    assert describe_dlpack(arr[1:2, :]).nbytes == 48


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torch_module_on_cpu(mgr: VramManager) -> None:
    import torch

    torch.manual_seed(0)
    first = torch.nn.Linear(256, 512)  # held by name: net[0] is typed only as a Module
    net = torch.nn.Sequential(first, torch.nn.LayerNorm(512), torch.nn.BatchNorm1d(4))
    model = mgr.seal_tensors(net)
    names = [n for n, _ in net.named_parameters()] + [n for n, t in net.named_buffers() if t.numel()]
    assert list(model.names) == names
    with torch.no_grad():
        first.weight[7, 7] += 1
    with pytest.raises(SealVerificationFailed) as exc:
        mgr.verify_model(model)
    assert exc.value.corrupted_tensors == ["0.weight"]
