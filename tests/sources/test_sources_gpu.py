"""Files and adopted tensors on a real GPU (CUDA backend). Skipped without one; see conftest."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from vram_residency import InvalidInput, PolicyViolation, SealVerificationFailed, VramManager
from vram_residency.formats import digest
from vram_residency.formats.tree import UNIT_SIZE
from vram_residency.sources.stream import GPU_DEFAULT_BUFFERS, MAX_STAGING_BYTES, Staging, plan_staging
from vram_residency.testing import flip_bit

pytestmark = pytest.mark.gpu

TOKEN = "gpu-sources-token-0123456789abcdef"


@pytest.fixture
def gpu() -> Iterator[VramManager]:
    with VramManager(TOKEN, backend="cuda") as m:
        yield m


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    rng = np.random.default_rng(7)
    p = tmp_path / "w.safetensors"
    save_file(
        {"a.weight": rng.standard_normal(3_000_000, dtype=np.float32), "b": np.ones(100, np.float16)}, str(p)
    )
    return p


class DeviceArray:
    """A bare ``__cuda_array_interface__`` over device memory: what CuPy or Numba hand over."""

    def __init__(self, ptr: int, nbytes: int, keep: object = None) -> None:
        self.__cuda_array_interface__ = {
            "version": 3,
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "strides": None,
        }
        self._keep = keep


@pytest.mark.parametrize("algorithm", ["sha256-tree-v1", "blake3"])
def test_seal_file_on_gpu(gpu: VramManager, weights: Path, algorithm: str) -> None:
    raw = weights.read_bytes()
    shard = gpu.seal_file(weights, digest_algorithm=algorithm)
    assert shard.digest == digest(raw, algorithm).hex()
    gpu.verify_sealed(shard)
    span = next(t for t in gpu._entry(shard).tensors if t.name == "a.weight")
    flip_bit(gpu, shard, 8 * (span.start + 5 * UNIT_SIZE + 3))
    with pytest.raises(SealVerificationFailed) as exc:
        gpu.verify_sealed(shard)
    assert exc.value.corrupted_tensors == ["a.weight"]
    report = gpu.repair(shard)
    assert report.repaired_units == 1
    gpu.verify_sealed(shard)


def test_staging_is_pinned_on_gpu(gpu: VramManager) -> None:
    plan = plan_staging(1 << 30, backend=gpu._backend)
    assert plan.buffers == GPU_DEFAULT_BUFFERS
    assert plan.readers == GPU_DEFAULT_BUFFERS - 1
    assert plan.bytes <= MAX_STAGING_BYTES
    with Staging(plan, gpu._backend) as st:
        assert st.pinned
        assert len(st.views()) == GPU_DEFAULT_BUFFERS


def test_mismatch_leaves_nothing_on_gpu(gpu: VramManager, weights: Path) -> None:
    gpu.deallocate(gpu.seal_file(weights))  # warm up kernels and scratch space first
    free = gpu.available_vram()
    with pytest.raises(InvalidInput, match="does not match"):
        gpu.seal_file(weights, expected_digest="0" * 64)
    assert gpu.shards() == []
    assert abs(gpu.available_vram() - free) < 2 * UNIT_SIZE  # driver bookkeeping aside


def test_adopt_device_memory_through_cai(gpu: VramManager) -> None:
    backend: Any = gpu._backend
    data = os.urandom(3 * UNIT_SIZE + 1000)
    owned = backend.allocate(len(data))  # someone else's allocation, as a framework would hold
    try:
        owned.write(0, data)
        model = gpu.seal_tensors({"layer.w": DeviceArray(owned._ptr, len(data), owned)})
        assert model.shards[0].digest == digest(data).hex()
        gpu.verify_model(model)
        owned.write(UNIT_SIZE + 17, b"\x00")
        with pytest.raises(SealVerificationFailed) as exc:
            gpu.verify_model(model)
        assert exc.value.corrupted_tensors == ["layer.w"]
        gpu.repair(model.shards[0], data)
        gpu.verify_model(model)
        for s in model.shards:
            gpu.deallocate(s)
        assert owned.read(0, 16) == data[:16]  # forgetting an adopted shard frees nothing
    finally:
        owned.close()


def test_host_and_managed_memory_are_refused(gpu: VramManager) -> None:
    backend: Any = gpu._backend
    pinned = backend.pinned_host_buffer(1 << 20)
    try:
        with pytest.raises(PolicyViolation):
            gpu.seal_tensors({"pinned": DeviceArray(pinned.address, 1 << 20)})
    finally:
        pinned.close()
    with pytest.raises(PolicyViolation):
        gpu.seal_tensors({"numpy": np.zeros(1000, np.float32)})
    from cuda.bindings import driver

    err, ptr = driver.cuMemAllocManaged(1 << 20, driver.CUmemAttach_flags.CU_MEM_ATTACH_GLOBAL.value)
    assert err == driver.CUresult.CUDA_SUCCESS
    try:
        with pytest.raises(PolicyViolation):  # reported as managed, or as not device memory
            gpu.seal_tensors({"managed": DeviceArray(int(ptr), 1 << 20)})
    finally:
        driver.cuMemFree(ptr)
    assert gpu.shards() == []


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torch_module_on_gpu(gpu: VramManager) -> None:
    import torch

    first = torch.nn.Linear(1024, 1024)  # held by name: net[0] is typed only as a Module
    # Module.cuda moves the parameters in place, so `first.weight` is the device copy below.
    net = torch.nn.Sequential(first, torch.nn.LayerNorm(1024)).cuda(gpu.device)
    torch.cuda.synchronize()
    model = gpu.seal_tensors(net)
    assert set(model.names) == {n for n, _ in net.named_parameters()}
    gpu.verify_model(model)
    with torch.no_grad():
        first.weight[500, 3] += 1
    torch.cuda.synchronize()
    with pytest.raises(SealVerificationFailed) as exc:
        gpu.verify_model(model)
    assert exc.value.corrupted_tensors == ["0.weight"]
    with pytest.raises(PolicyViolation):
        gpu.seal_tensors({"cpu": torch.zeros(10)})


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed")
def test_cupy_arrays_on_gpu(gpu: VramManager) -> None:
    import cupy as cp

    with cp.cuda.Device(gpu.device):
        a = cp.arange(1 << 20, dtype=cp.float32)
        cp.cuda.runtime.deviceSynchronize()
        model = gpu.seal_tensors({"a": a})
        assert model.shards[0].digest == digest(cp.asnumpy(a).tobytes()).hex()
        a[10] = -1
        cp.cuda.runtime.deviceSynchronize()
        with pytest.raises(SealVerificationFailed):
            gpu.verify_model(model)
