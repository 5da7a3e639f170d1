"""nh_fast.cu's __host__ __device__ cores, built by nvcc as host code, against the pure-Python
reference of docs/specs/nh-fast-v1.md: the per-lane loads (including the zero-padded last leaf),
key chunks and NH sums of all 32 lanes, and the keyed-BLAKE3 unit digests in the kernel's order.
Runs where nvcc exists (no GPU needed); the kernels themselves run in tests/gpu."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vram_residency.formats import nhfast

HARNESS = Path(__file__).parents[2] / "gpu" / "harness" / "nhf_harness.cu"
NVCC = shutil.which("nvcc")
MIB = 1 << 20

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nhf") / "nhf_harness"
    assert NVCC is not None
    subprocess.run([NVCC, "-O2", "-x", "cu", "-o", str(out), str(HARNESS)], check=True, timeout=600)
    return out


def _run(harness: Path, mode: str, key: bytes, data: bytes, tmp_path: Path) -> str:
    (tmp_path / "k").write_bytes(key)
    (tmp_path / "d").write_bytes(data)
    args = [str(harness), mode, str(tmp_path / "k"), str(tmp_path / "d")]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.parametrize("n", [0, 1, 7, 8, 15, 16, 17, 511, 513, 4095, 4096, 4097, 8191, MIB - 1, MIB + 1])
def test_lane_cores_match_the_reference(harness: Path, tmp_path: Path, n: int) -> None:
    data, key = os.urandom(n), os.urandom(32)
    sched = nhfast.key_schedule(key)
    leaves = max(1, -(-n // 4096))
    want = b"".join(
        nhfast.reference_leaf_tag(data[i * 4096 : (i + 1) * 4096], sched.nh_key) for i in range(leaves)
    )
    assert _run(harness, "tags", sched.nh_key, data, tmp_path) == want.hex()
    units = nhfast.unit_digests_from_tags(sched, want, n)
    assert _run(harness, "units", sched.unit_key, want, tmp_path) == units.hex()
    assert _run(harness, "unitsfused", sched.unit_key, want, tmp_path) == units.hex()


# 1..6 chunks of tags per unit: 42 | 43, 85 | 86, 128 | 170 | 171, 213 | 214, 256 leaves.
SHAPES = [1, 2, 42, 43, 44, 85, 86, 128, 170, 171, 213, 214, 255, 256, 257, 512 + 1, 512 + 100]


@pytest.mark.parametrize("leaves", SHAPES)
def test_unit_digest_tree_shapes(harness: Path, tmp_path: Path, leaves: int) -> None:
    # 42/43 leaves: one chunk / two chunks of tags; 85/86: three / four; 256: six full chunks.
    key = os.urandom(32)
    tags = os.urandom(24 * leaves)
    sched = nhfast.key_schedule(key)
    want = nhfast.unit_digests_from_tags(sched, tags, 4096 * leaves)
    assert _run(harness, "units", sched.unit_key, tags, tmp_path) == want.hex()
    # The fused kernel's order (lane per chunk with L2 loads, then lane per node per level).
    assert _run(harness, "unitsfused", sched.unit_key, tags, tmp_path) == want.hex()


# Unit counts around the top level's chunk boundaries (31 units + the length fit one 1 KiB chunk;
# 32 do not), odd and even level counts, and a 140 GB model's 133,514 units.
@pytest.mark.parametrize("units", [1, 2, 31, 32, 33, 63, 64, 65, 96, 97, 1000, 16384, 133_514])
def test_finalize_tree_matches_the_reference(harness: Path, tmp_path: Path, units: int) -> None:
    # nhf_finalize's order (chunk values, then the tree level by level with the odd node carried)
    # against formats.nhfast.finalize (the blake3 package): the same digest for any unit count.
    key = os.urandom(32)
    digests = os.urandom(32 * units)
    n = (units - 1) * MIB + 12345
    sched = nhfast.key_schedule(key)
    (tmp_path / "k").write_bytes(sched.top_key)
    (tmp_path / "d").write_bytes(digests)
    args = [str(harness), "top", str(tmp_path / "k"), str(tmp_path / "d"), str(n)]
    got = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
    assert got == nhfast.finalize(sched, digests, n).hex()
