"""The kernels' SHA-256 and BLAKE3 cores are __host__ __device__: built by nvcc as host code they
must agree with hashlib and the blake3 package. Runs where nvcc exists (no GPU needed)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import blake3
import pytest

HARNESS = Path(__file__).parents[2] / "gpu" / "harness" / "host_harness.cu"
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("harness") / "host_harness"
    assert NVCC is not None
    subprocess.run([NVCC, "-O2", "-x", "cu", "-o", str(out), str(HARNESS)], check=True, timeout=600)
    return out


def _run(harness: Path, mode: str, data: bytes, tmp_path: Path) -> str:
    f = tmp_path / "in.bin"
    f.write_bytes(data)
    return subprocess.run(
        [str(harness), mode, str(f)], check=True, capture_output=True, text=True
    ).stdout.strip()


LENGTHS = [
    0,
    1,
    55,
    56,
    63,
    64,
    65,
    119,
    120,
    1023,
    1024,
    1025,
    2049,
    4095,
    4096,
    4097,
    10000,
    1 << 20,
    3 << 20,
]


@pytest.mark.parametrize("n", LENGTHS)
def test_cores_on_the_cpu(harness: Path, tmp_path: Path, n: int) -> None:
    data = os.urandom(n)
    assert _run(harness, "sha256", data, tmp_path) == hashlib.sha256(data).hexdigest()
    assert _run(harness, "leaf", data, tmp_path) == hashlib.sha256(data + b"\x00").hexdigest()
    assert _run(harness, "blake3-rt-iv", data, tmp_path) == blake3.blake3(data).hexdigest()


def test_parent_on_the_cpu(harness: Path, tmp_path: Path) -> None:
    data = os.urandom(64)
    assert _run(harness, "parent", data, tmp_path) == hashlib.sha256(data + b"\x01").hexdigest()


KEYED_LENGTHS = [0, 1, 63, 64, 65, 1023, 1024, 1025, 2048, 4096, 4097, (1 << 20) - 1, 1 << 20, (1 << 20) + 1]


@pytest.mark.parametrize("n", KEYED_LENGTHS)
def test_keyed_core_on_the_cpu(harness: Path, tmp_path: Path, n: int) -> None:
    """BLAKE3 keyed mode (the attest-v1 probe): the runtime key policy of the table kernels, key
    words as the chaining value and KEYED_HASH on every compression, against the blake3 package."""
    key = os.urandom(32)
    data = os.urandom(n)
    assert _run(harness, "blake3-keyed", key + data, tmp_path) == blake3.blake3(data, key=key).hexdigest()
    # The IV as a runtime "key" with no flag is the plain hash: what unkeyed table rows run.
    assert _run(harness, "blake3-rt-iv", data, tmp_path) == blake3.blake3(data).hexdigest()


KiB = 1 << 10
MiB = 1 << 20
# blake3_units_split's edges: one piece (ROOT inside the block: a lone chunk, or the block's final
# parent), 128 KiB pieces with a partial last one (one chunk, one byte), whole units and more, and
# over 256 pieces (two blake3_reduce levels, the second group of one node).
SPLIT_LENGTHS = [
    0,
    1,
    1023,
    1024,
    1025,
    3073,
    128 * KiB - 1,
    128 * KiB,
    128 * KiB + 1,
    129 * KiB,
    129 * KiB + 1,
    MiB - 1,
    MiB,
    MiB + 1,
    MiB + 128 * KiB,
    3 * MiB + 4097,
    32 * MiB + 1,
]


@pytest.mark.parametrize("n", SPLIT_LENGTHS)
def test_split_tree_decomposition_on_the_cpu(harness: Path, tmp_path: Path, n: int) -> None:
    """The decomposition blake3_units_split relies on (128-chunk pieces with global chunk counters,
    each reduced as one block reduces it, then reduced 256 at a time with ROOT on the last parent),
    with the kernels' own compression and parent functions, is BLAKE3."""
    data = os.urandom(n)
    assert _run(harness, "blake3-split", data, tmp_path) == blake3.blake3(data).hexdigest()
