"""nh_fast.cu's unit and top-level kernels (nhf_units with NHF_UNITS_SMEM on and off,
nhf_top_chunks, nhf_finalize) run on the CPU: their bodies, extracted from the kernel source,
built as host code by nvcc with one thread per CUDA thread, a barrier per __syncthreads and
__shared__ as static storage (tests/gpu/harness/nhf_kernel_emu.cu), under AddressSanitizer, against
the pure-Python reference (formats/nhfast.py). Covers the launcher's unit ranges (whole tables,
and the seal path's partial ranges that do not start on a block of NHF_UNITS_PER_BLOCK units),
partial last units, shards of fewer than 256 leaves, n = 0, and the top level's chunk
boundaries. Runs where nvcc exists; no GPU needed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vram_residency.formats import nhfast

ROOT = Path(__file__).parents[3]
KERNEL = ROOT / "src" / "vram_residency" / "backends" / "cuda" / "kernels" / "nh_fast.cu"
EMU = ROOT / "tests" / "gpu" / "harness" / "nhf_kernel_emu.cu"
NVCC = shutil.which("nvcc")
MIB = 1 << 20

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


def _kernel_bodies() -> str:
    src = KERNEL.read_text()
    tag_bytes = re.search(
        r"#define NHF_CHUNKS_PER_UNIT.*?\n__device__ __forceinline__ u32 nhf_unit_tag_bytes.*?\n}\n",
        src,
        re.S,
    )
    kernels = re.search(r"#ifndef NHF_UNITS_SMEM\n.*?(?=// Test entry)", src, re.S)
    assert tag_bytes is not None and kernels is not None, "kernel source layout changed"
    return tag_bytes.group(0) + "\n" + kernels.group(0)


@pytest.fixture(scope="module", params=["smem", "global"])
def emu(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("emu")
    (d / "nhf_kernels.inc").write_text(_kernel_bodies())
    out = d / "emu"
    smem = "1" if request.param == "smem" else "0"
    assert NVCC is not None
    cmd = [
        NVCC,
        "-std=c++20",
        "-O1",
        "-g",
        "-x",
        "cu",
        f"-DNHF_UNITS_SMEM={smem}",
        "-I",
        str(d),
        "-I",
        str(KERNEL.parent),
        "-Xcompiler",
        "-fsanitize=address",
        "-Xcompiler",
        "-fsanitize=undefined",
        "-Xcompiler",
        "-pthread",
        "-o",
        str(out),
        str(EMU),
    ]
    subprocess.run(cmd, check=True, timeout=600)
    return out


def _run(emu: Path, tmp: Path, key: bytes, data: bytes, *args: int) -> str:
    (tmp / "k").write_bytes(key)
    (tmp / "d").write_bytes(data)
    mode = "units" if len(args) == 2 else "top"
    cmd = [str(emu), mode, str(tmp / "k"), str(tmp / "d"), *map(str, args)]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="halt_on_error=1")
    return subprocess.run(
        cmd, check=True, capture_output=True, text=True, timeout=120, env=env
    ).stdout.strip()


# Leaves: 1..6 chunks of tags in the last unit, fewer than 256 leaves, and unit counts that are
# not multiples of 4 (5, 6 units), with the seal path's ranges [first, end) off a 4-unit block.
@pytest.mark.parametrize(
    ("leaves", "ranges"),
    [
        (1, [(0, 1)]),
        (42, [(0, 1)]),
        (43, [(0, 1)]),
        (171, [(0, 1)]),
        (255, [(0, 1)]),
        (256, [(0, 1)]),
        (257, [(0, 2)]),
        (256 * 4 + 100, [(0, 5)]),
        (256 * 6, [(0, 1), (1, 3), (3, 6)]),
        (256 * 5 + 214, [(2, 3), (3, 6)]),
    ],
)
def test_nhf_units_kernel_matches_the_reference(
    emu: Path, tmp_path: Path, leaves: int, ranges: list[tuple[int, int]]
) -> None:
    key = os.urandom(32)
    sched = nhfast.key_schedule(key)
    tags = os.urandom(24 * leaves)
    want = nhfast.unit_digests_from_tags(sched, tags, 4096 * leaves)
    units = len(want) // 32
    for first, end in ranges:
        got = bytes.fromhex(_run(emu, tmp_path, sched.unit_key, tags, first, end))
        assert len(got) == 32 * units
        for u in range(units):
            expect = want[32 * u : 32 * u + 32] if first <= u < end else b"\xaa" * 32
            assert got[32 * u : 32 * u + 32] == expect, (first, end, u)


@pytest.mark.parametrize("units", [1, 2, 31, 32, 33, 63, 64, 65, 97, 1000, 1025])
def test_top_chunks_and_finalize_kernels_match_the_reference(emu: Path, tmp_path: Path, units: int) -> None:
    key = os.urandom(32)
    sched = nhfast.key_schedule(key)
    digests = os.urandom(32 * units)
    for n in ((units - 1) * MIB + 12345, 0 if units == 1 else units * MIB):
        got = _run(emu, tmp_path, sched.top_key, digests, n)
        assert got == nhfast.finalize(sched, digests, n).hex()
