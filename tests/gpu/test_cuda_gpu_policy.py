"""The VRAM-only policy, enforced with cuPointerGetAttribute: managed, pinned-host and pageable
memory are refused; so are ranges past an allocation's end; adopted memory is never freed."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from cuda.bindings import driver

from vram_residency.backends.cuda import CudaBackend
from vram_residency.errors import InvalidInput, PolicyViolation
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1, hash_units

pytestmark = pytest.mark.gpu

OK = driver.CUresult.CUDA_SUCCESS


def test_own_buffers_pass(cuda_backend: CudaBackend) -> None:
    buf = cuda_backend.allocate(12345)
    try:
        cuda_backend.check_policy(buf)
        cuda_backend.check_pointer(buf._ptr, buf.size)
    finally:
        buf.close()


def test_managed_memory_refused(cuda_backend: CudaBackend) -> None:
    # Small on purpose: managed memory beyond what is free can hang the GPU.
    err, ptr = driver.cuMemAllocManaged(4096, int(driver.CUmemAttach_flags.CU_MEM_ATTACH_GLOBAL))
    assert err == OK
    try:
        with pytest.raises(PolicyViolation, match="managed"):
            cuda_backend.check_pointer(int(ptr), 4096)
        with pytest.raises(PolicyViolation):
            cuda_backend.adopt_pointer(int(ptr), 4096)
    finally:
        driver.cuMemFree(ptr)


def test_pinned_host_memory_refused(cuda_backend: CudaBackend) -> None:
    err, ptr = driver.cuMemHostAlloc(4096, 0)
    assert err == OK
    try:
        with pytest.raises(PolicyViolation, match="host memory"):
            cuda_backend.check_pointer(int(ptr), 4096)
    finally:
        driver.cuMemFreeHost(ptr)


def test_mapped_host_memory_refused(cuda_backend: CudaBackend) -> None:
    err, ptr = driver.cuMemHostAlloc(4096, int(driver.CU_MEMHOSTALLOC_DEVICEMAP))
    assert err == OK
    try:
        err, dptr = driver.cuMemHostGetDevicePointer(ptr, 0)
        assert err == OK
        with pytest.raises(PolicyViolation):
            cuda_backend.check_pointer(int(dptr), 4096)
    finally:
        driver.cuMemFreeHost(ptr)


def test_pageable_host_memory_refused(cuda_backend: CudaBackend) -> None:
    arr = np.ones(4096, dtype=np.uint8)
    with pytest.raises(PolicyViolation, match="pageable"):
        cuda_backend.check_pointer(int(arr.ctypes.data), 4096)
    block = ctypes.create_string_buffer(4096)
    with pytest.raises(PolicyViolation):
        cuda_backend.check_pointer(ctypes.addressof(block), 4096)


def test_range_past_allocation_refused(cuda_backend: CudaBackend) -> None:
    buf = cuda_backend.allocate(4096)
    try:
        with pytest.raises(PolicyViolation, match="past the end"):
            cuda_backend.check_pointer(buf._ptr, 1 << 40)
    finally:
        buf.close()


@pytest.mark.parametrize(("ptr", "size"), [(0, 1), (4096, 0), (-5, 10)])
def test_bad_pointer_arguments(cuda_backend: CudaBackend, ptr: int, size: int) -> None:
    with pytest.raises(InvalidInput):
        cuda_backend.check_pointer(ptr, size)


def test_adopt_wraps_without_freeing(cuda_backend: CudaBackend) -> None:
    n = 3 * (1 << 20) + 4097
    data = np.random.default_rng(9).integers(0, 256, size=n, dtype=np.uint8).tobytes()
    err, dptr = driver.cuMemAlloc(n)
    assert err == OK
    try:
        assert driver.cuMemcpyHtoD(dptr, data, n)[0] == OK
        view = cuda_backend.adopt_pointer(int(dptr), n)
        assert view.adopted
        cuda_backend.check_policy(view)
        for alg in (SHA256_TREE_V1, BLAKE3):
            assert cuda_backend.hash(view, alg) == hash_units(data, alg)
        view.close()
        # Still allocated and untouched: close neither zeroed nor freed it.
        out = bytearray(16)
        assert driver.cuMemcpyDtoH(out, int(dptr) + n - 16, 16)[0] == OK
        assert bytes(out) == data[-16:]
    finally:
        driver.cuMemFree(dptr)


def test_adopt_needs_alignment(cuda_backend: CudaBackend) -> None:
    buf = cuda_backend.allocate(4096)
    try:
        with pytest.raises(InvalidInput, match="aligned"):
            cuda_backend.adopt_pointer(buf._ptr + 8, 64)
    finally:
        buf.close()


def test_integrated_flag_reported(cuda_backend: CudaBackend) -> None:
    # An H200 is a discrete GPU; an integrated one would be refused unless allow_integrated=True.
    assert cuda_backend.integrated is False
    assert "integrated" not in cuda_backend.describe()
