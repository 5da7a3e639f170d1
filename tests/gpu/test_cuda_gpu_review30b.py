"""Review of 2026-11-30 (branch review30b): GPU checks of what the graph and progressive-VMM
merges left open. Each scenario that could fault the context before its fix runs in a child
process of its own, so that a fault (CUDA_ERROR_ILLEGAL_ADDRESS poisons the context for good)
fails that test alone and not every GPU test after it.

VRAM_RESIDENCY_REQUIRE_GPU=1 .venv/bin/python -m pytest tests/gpu/test_cuda_gpu_review30b.py -q
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gpu

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
        with VramManager("gpu-review30b-token-0123456789abcdef", 0, backend="cuda") as m:
            small_chunks(m.store.backend)
            payload = rnd(10 * MiB + 3, 3)
            s = m.seal_model(payload)
            m.offload(s, "host")
            assert m.restore(s) == 0
            assert isinstance(m._entry(s).buf, VmmBuffer)
            m.verify_sealed(s)
        """
    )
