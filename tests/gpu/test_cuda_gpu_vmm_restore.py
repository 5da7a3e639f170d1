"""Restore into memory mapped chunk by chunk through CUDA's virtual memory management (issue 13:
restore >= 0.9 x pinned host-to-device bandwidth). ``CudaBackend.allocate_progressive`` gives a
``VmmBuffer``; these tests check on the GPU that the bytes come back bit-identical under the
original seal, that the VRAM-only policy accepts such a buffer (and nothing before it is whole),
that freeing zeroes it before it is unmapped, and that running out of memory at a chunk leaves
free memory where it was and the shard offloaded.

VRAM_RESIDENCY_REQUIRE_GPU=1 .venv/bin/python -m pytest tests/gpu/test_cuda_gpu_vmm_restore.py -q
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.gpu.conftest import random_bytes, two_gpus
from vram_residency import VramManager
from vram_residency import _migrate as mig
from vram_residency.backends.base import COPY_CHUNK, progressive_chunks
from vram_residency.backends.cuda import CudaBackend, _vmm
from vram_residency.backends.cuda._backend import CudaBuffer, VmmBuffer
from vram_residency.errors import InsufficientVram, IntegrityViolation, NotSealed
from vram_residency.formats.tree import BLAKE3, NH_FAST_V1, SHA256_TREE_V1, hash_units

pytestmark = pytest.mark.gpu

TOKEN = "gpu-vmm-restore-token-0123456789abcd"
MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def one() -> Iterator[VramManager]:
    with VramManager(TOKEN, 0, backend="cuda") as m:
        yield m


def _backend(m: VramManager) -> CudaBackend:
    b = m.store.backend
    assert isinstance(b, CudaBackend)
    return b


def _device_bytes(ptr: int, n: int) -> np.ndarray:
    """Read ``n`` bytes of device memory at ``ptr`` (the caller's context is current)."""
    from cuda.bindings import driver

    out = np.empty(n, dtype=np.uint8)
    (err,) = driver.cuMemcpyDtoH(out.ctypes.data, ptr, n)
    assert err == driver.CUresult.CUDA_SUCCESS
    return out


@pytest.mark.parametrize("algorithm", [SHA256_TREE_V1, BLAKE3, NH_FAST_V1])
@pytest.mark.parametrize("to", ["host", "file"])
def test_restore_through_vmm_is_bit_identical(
    one: VramManager, tmp_path: Any, algorithm: str, to: str
) -> None:
    n = 300 * MiB + 77  # chunks of 32, 64 and 206 MiB at a 2 MiB granularity, the last partly used
    payload = random_bytes(n, seed=11)
    s = one.seal_model(payload, digest_algorithm=algorithm)
    assert type(one._entry(s).buf) is CudaBuffer  # sealing allocates with cuMemAlloc
    one.offload(s, to, tmp_path / "s.bin" if to == "file" else None)  # type: ignore[arg-type]
    assert one.restore(s) == 0
    buf = one._entry(s).buf
    assert isinstance(buf, VmmBuffer) and buf.allocation_kind == "cuMemCreate"
    gran = _vmm.granularity(0)[1]
    assert buf.mapped == n and buf.capacity == -(-n // gran) * gran
    assert buf._vmm.chunks == progressive_chunks(buf.capacity, gran)
    assert buf.chunk_count == len(buf._vmm.chunks) == len(buf.chunk_log)
    assert [t.size for t in buf.chunk_log] == buf._vmm.chunks
    if gran == 2 * MiB:
        assert buf._vmm.chunks == [32 * MiB, 64 * MiB, 206 * MiB]
    one.verify_sealed(s)  # the original seal, digested on the device
    assert buf.read(0, n) == payload
    _backend(one).check_policy(buf)
    # The rounding tail past the shard was zeroed, not left with earlier contents.
    assert not _device_bytes(buf.device_pointer + n, buf.capacity - n).any()


def test_restore_repairs_a_unit_in_vmm_memory(one: VramManager) -> None:
    """One byte flipped in VMM memory after its chunk landed (a transfer that corrupted it): the
    restore finds the unit, rewrites it from the offloaded copy and the shard verifies.

    The hook flips once, as the plain-path test (test_cuda_gpu_migrate's ``flip``) does: the
    repair calls the hook again after rewriting the unit, and a hook that flipped every time
    would corrupt each repair too (a transfer that never lands right), which the restore
    rightly gives up on after its retries."""
    s = one.seal_model(random_bytes(200 * MiB, seed=12))
    one.offload(s)
    at = 150 * MiB + 5  # in the third chunk (32 + 64 + 104 MiB at a 2 MiB granularity)
    flipped: list[int] = []

    def flip(target: Any, offset: int, length: int) -> None:
        if not flipped and not isinstance(target, memoryview) and offset <= at < offset + length:
            flipped.append(offset)
            target.write(at, bytes([target.read(at, 1)[0] ^ 0x20]))

    assert mig.restore(one.store, s, on_landed=flip) == 1
    assert len(flipped) == 1
    assert isinstance(one._entry(s).buf, VmmBuffer)
    one.verify_sealed(s)


def test_policy_accepts_whole_vmm_buffer_and_nothing_before(cuda_backend: CudaBackend) -> None:
    bk = cuda_backend
    old = bk.progressive_first_chunk, bk.progressive_max_chunk, bk.progressive_min_size
    bk.progressive_first_chunk, bk.progressive_max_chunk, bk.progressive_min_size = 2 * MiB, 4 * MiB, 2 * MiB
    try:
        n = 10 * MiB + 3
        buf = cuda_backend.allocate_progressive(n)
        try:
            assert isinstance(buf, VmmBuffer)
            assert buf._vmm.chunks == [2 * MiB, 2 * MiB, 4 * MiB, 4 * MiB]
            assert buf.map_chunk_at(0) == 2 * MiB and buf.chunk_count == 1
            buf.map_through(3 * MiB)  # two 2 MiB chunks
            assert buf.mapped == 4 * MiB and buf.chunk_count == 2
            buf.write(0, b"\x5a" * (4 * MiB))
            for refused in (
                lambda: cuda_backend.check_policy(buf),
                lambda: cuda_backend.hash(buf, SHA256_TREE_V1),
                lambda: buf.device_pointer,
                lambda: buf.read(4 * MiB, 1),
            ):
                with pytest.raises(IntegrityViolation):
                    refused()
            payload = random_bytes(n, seed=13)
            got = cuda_backend.write_and_hash(buf, payload, SHA256_TREE_V1)  # maps the rest
            assert got == hash_units(payload, SHA256_TREE_V1)
            assert buf.mapped == n and buf.chunk_count == 4
            cuda_backend.check_policy(buf)
            assert cuda_backend.digest(buf, SHA256_TREE_V1) == got.digest
        finally:
            buf.close()
        # A size of at most progressive_min_size is an ordinary allocation.
        small = cuda_backend.allocate_progressive(2 * MiB)
        try:
            assert type(small) is CudaBuffer and small.mapped == small.size
            cuda_backend.check_policy(small)
        finally:
            small.close()
    finally:
        bk.progressive_first_chunk, bk.progressive_max_chunk, bk.progressive_min_size = old


def test_free_zeroes_the_range_before_unmapping(cuda_backend: CudaBackend) -> None:
    """``close`` zeroes every mapped byte (after the copies into it) and only then unmaps: the
    range is read back at the last moment it is still mapped (``VmmRange.before_unmap``)."""
    n = 3 * COPY_CHUNK + 5
    buf = cuda_backend.allocate_progressive(n)
    assert isinstance(buf, VmmBuffer)
    cuda_backend.write_and_hash(buf, random_bytes(n, seed=14), BLAKE3)
    assert _device_bytes(buf.device_pointer, 4096).any()
    seen: list[tuple[int, bool]] = []

    def look(address: int, nbytes: int) -> None:
        seen.append((nbytes, not _device_bytes(address, nbytes).any()))

    buf._vmm.before_unmap = look
    free_held = cuda_backend.mem_info()[0]
    buf.close()
    assert seen == [(buf.capacity, True)]
    assert cuda_backend.mem_info()[0] >= free_held + n - 2 * MiB  # the chunks went back


def test_chunk_allocation_failure_leaves_free_memory_unchanged(cuda_backend: CudaBackend) -> None:
    free0 = cuda_backend.mem_info()[0]
    hold = cuda_backend.allocate(free0 // 2)  # so that the request fits the device but not what is free
    try:
        free1 = cuda_backend.mem_info()[0]
        want = free1 + GiB
        buf = cuda_backend.allocate_progressive(want)
        with pytest.raises(InsufficientVram, match="at chunk") as info:
            buf.map_through(want)
        assert info.value.retriable and info.value.needed == want
        assert buf.mapped == 0
        assert abs(cuda_backend.mem_info()[0] - free1) <= 2 * MiB  # every chunk released
        with pytest.raises(IntegrityViolation):
            buf.write(0, b"x")
        with pytest.raises(IntegrityViolation, match="released"):
            buf.map_through(64 * MiB)  # the range is gone; it never maps again
        buf.close()
        assert abs(cuda_backend.mem_info()[0] - free1) <= 2 * MiB
    finally:
        hold.close()


def test_restore_running_out_at_a_chunk_keeps_the_shard_offloaded(one: VramManager) -> None:
    """Another allocation takes the device's free memory while the restore lands its first copy
    chunk (64 MiB: memory chunks 0 and 1, 32 + 64 MiB, are mapped by then): cuMemCreate fails at
    chunk 2 (160 MiB, more than the 64 MiB left), the restore raises InsufficientVram, free memory
    is what it was, the shard stays offloaded, and it restores once the memory is back."""
    bk = _backend(one)
    n = 256 * MiB
    s = one.seal_model(random_bytes(n, seed=15))
    one.offload(s)
    one.restore(s)  # warm: digest scratch and the pinned pool exist from here on
    one.offload(s)
    before = one.available_vram()
    held: list[Any] = []

    def grab(target: Any, offset: int, length: int) -> None:
        if offset == 0 and not held:
            held.append(bk.allocate(bk.mem_info()[0] - 64 * MiB))  # less than chunk 2

    expect = "at chunk 2 " if _vmm.granularity(bk.device)[1] == 2 * MiB else "at chunk"
    with pytest.raises(InsufficientVram, match=expect):
        mig.restore(one.store, s, on_landed=grab)
    assert one.offloaded_shards() == [s]
    with pytest.raises(NotSealed):
        one.verify_sealed(s)
    held.pop().close()
    assert abs(one.available_vram() - before) <= 2 * MiB
    assert one.restore(s) == 0
    one.verify_sealed(s)


@two_gpus
def test_restored_vmm_shard_migrates_and_offloads_again() -> None:
    """A restored shard (VMM memory) moves peer to peer (the peer is given access to each
    mapping), and offloads and restores again."""
    with VramManager(TOKEN, 0, backend="cuda") as a, VramManager(TOKEN, 1, backend="cuda") as b:
        payload = random_bytes(200 * MiB + 9, seed=16)
        s = a.seal_model(payload)
        a.offload(s)
        a.restore(s)
        assert isinstance(a._entry(s).buf, VmmBuffer)
        t = a.migrate(s, b)
        b.verify_sealed(t)
        assert b._entry(t).buf.read(0, len(payload)) == payload
        b.offload(t)
        b.restore(t)
        b.verify_sealed(t)
        back = b.migrate(t, a)  # VMM source on device 1 this time
        a.verify_sealed(back)


# -- Seals of at most the staging size into a progressive buffer ---------------------------------
# Each scenario that faulted the context before its fix (the one-copy seal path copied into an
# unmapped reservation) runs in a child process of its own, so that a fault
# (CUDA_ERROR_ILLEGAL_ADDRESS poisons the context for good) fails that test alone and not every
# GPU test after it.
_PRELUDE = """
import numpy as np
from vram_residency.backends.cuda import open_backend
from vram_residency.backends.cuda._backend import VmmBuffer
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1, hash_units
MiB = 1 << 20

def rnd(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()

def small_chunks(bk):
    # 2 MiB chunks (the granularity), and progressive buffers from 2 MiB up, as
    # tests/gpu/test_cuda_gpu_vmm_restore.py sets them
    bk.progressive_first_chunk, bk.progressive_max_chunk, bk.progressive_min_size = 2 * MiB, 4 * MiB, 2 * MiB
"""


def _child(body: str) -> None:
    """Run ``body`` (after the prelude) in a fresh interpreter; fail with its output unless it
    exits 0 having printed OK."""
    code = _PRELUDE + textwrap.dedent(body) + "\nprint('OK')\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), (
        f"rc={done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )


@pytest.mark.parametrize("alg", ["SHA256_TREE_V1", "BLAKE3"])
def test_small_seal_into_fresh_progressive_buffer(alg: str) -> None:
    """write_and_hash of up to 1 MiB into a progressive buffer with nothing mapped yet: before
    the fix it took the one-copy path (_seal_one_copy), which maps nothing, and copied into the
    unmapped reservation (the context faults); now its chunk is mapped first."""
    _child(
        f"""
        bk = open_backend(0)
        small_chunks(bk)
        buf = bk.allocate_progressive(10 * MiB + 3)
        assert isinstance(buf, VmmBuffer) and buf.mapped == 0
        data = rnd(512 << 10, 1)
        got = bk.write_and_hash(buf, data, {alg})
        assert got == hash_units(data, {alg}), "digest differs from the host reference"
        assert buf.read(0, len(data)) == data
        buf.close()
        bk.close()
        """
    )


def test_pinned_seal_past_the_mapped_prefix_of_a_progressive_buffer() -> None:
    """A pinned source of up to the staging size (64 MiB) also took the one-copy path: 10 MiB
    from pinned memory into a range with one 2 MiB chunk mapped wrote 8 MiB past it."""
    _child(
        """
        bk = open_backend(0)
        small_chunks(bk)
        n = 10 * MiB + 3
        buf = bk.allocate_progressive(n)
        buf.map_chunk_at(0)
        assert buf.mapped == 2 * MiB
        data = rnd(n, 2)
        pinned = bk.pinned_host_buffer(n)
        pinned.view[:n] = data
        got = bk.write_and_hash(buf, pinned.view[:n], SHA256_TREE_V1)
        assert got == hash_units(data, SHA256_TREE_V1)
        assert buf.mapped == n
        bk.check_policy(buf)
        assert bk.digest(buf, SHA256_TREE_V1) == got.digest
        buf.close()
        pinned.close()
        bk.close()
        """
    )


def test_restore_of_a_host_offloaded_shard_under_the_staging_size_through_vmm() -> None:
    """The restore path itself (``_migrate._land``: an offload to host memory is pinned, and is
    restored by write_and_hash): a 10 MiB shard restored into a progressive buffer (minimum size
    lowered as the VMM tests and the migrate bench lower it) must come back and verify."""
    _child(
        """
        from vram_residency import VramManager
        with VramManager("gpu-vmm-small-seal-token-0123456789ab", 0, backend="cuda") as m:
            small_chunks(m.store.backend)
            payload = rnd(10 * MiB + 3, 3)
            s = m.seal_model(payload)
            m.offload(s, "host")
            assert m.restore(s) == 0
            assert isinstance(m._entry(s).buf, VmmBuffer)
            m.verify_sealed(s)
        """
    )
