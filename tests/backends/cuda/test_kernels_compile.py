"""Every kernel source compiles with NVRTC (through cuda.core's Program) to sm_90 machine code, on any
machine (no GPU needed).

CI installs cuda-bindings and NVRTC through the ``cuda`` extra; the test skips only where
``cuda.bindings.nvrtc`` cannot be imported at all.
"""

from __future__ import annotations

import importlib.resources
import re

import pytest

from vram_residency.backends.cuda import _compile

nvrtc_missing = False
try:
    from cuda.bindings import nvrtc  # noqa: F401
except ImportError:
    nvrtc_missing = True

needs_nvrtc = pytest.mark.skipif(nvrtc_missing, reason="cuda.bindings.nvrtc is not installed")

# Spill bytes allowed per unit kernel: none for SHA-256; blake3_units is capped at 64 registers for
# occupancy (4 blocks per SM measured fastest) and spills a few words, outside the per-block loop
# (read off the SASS: no local loads or stores in the compression loop).
UNIT_KERNELS = {
    "sha256_tree": ("sha256_tree_units", 0),
    "blake3": ("blake3_units", 512),
    "nh_fast": ("nhf_leaf_tags", 0),  # the streaming loop must not touch local memory
}
# The segment-table kernels (batched digests, keyed BLAKE3) under the same budgets, and the small-
# shard kernels (one block per part of a unit: sha256_tree_units_split, blake3_units_split with one
# chunk per thread and no register cap), which must not spill at all.
TABLE_KERNELS = [
    ("sha256_tree", "sha256_table_units", 0),
    ("blake3", "blake3_table_units", 512),
    ("sha256_tree", "sha256_tree_units_split", 0),
    ("blake3", "blake3_units_split", 0),
]
# nh-fast-v1's fused leaf + unit kernel: the same 128-register cap as nhf_leaf_tags. ptxas (NVRTC
# 13.0, sm_90) reports 20 bytes of spill stores and 8 of loads: registers saved around the
# out-of-line unit digest (nhf_units_finish, once per unit) and one word refilled per group of
# leaves; the loaded data stays in registers (checked in the SASS with nvdisasm: no local loads
# or stores of the data between its LDG.E.EF.128 loads and the NH arithmetic).
FUSED_KERNEL = ("nh_fast", "nhf_leaf_tags_units", 64)


def test_kernel_sources_are_package_data() -> None:
    folder = importlib.resources.files("vram_residency.backends.cuda") / "kernels"
    names = {p.name for p in folder.iterdir()}
    assert {f"{k}.cu" for k in _compile.KERNELS} | set(_compile.HEADERS) <= names


@needs_nvrtc
@pytest.mark.parametrize("name", _compile.KERNELS)
def test_compiles_to_sm90_cubin(name: str) -> None:
    cubin = _compile.compile_cubin(name, "sm_90")
    assert cubin[:4] == b"\x7fELF"
    assert _compile.compile_cubin(name, "sm_90") is cubin  # cached


@needs_nvrtc
@pytest.mark.parametrize("name", _compile.KERNELS)
def test_unit_kernels_spill_at_most_budget(name: str) -> None:
    log = _compile.compile_log(name, "sm_90", ["--ptxas-options=-v"])
    entry, allowed = UNIT_KERNELS[name]
    block = log.split(f"Compiling entry function '{entry}'", 1)[1].split("Compiling entry function", 1)[0]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
    assert spills is not None, log
    assert max(int(spills.group(1)), int(spills.group(2))) <= allowed, block


@needs_nvrtc
@pytest.mark.parametrize(("name", "entry", "allowed"), TABLE_KERNELS)
def test_table_and_split_kernels_spill_at_most_budget(name: str, entry: str, allowed: int) -> None:
    log = _compile.compile_log(name, "sm_90", ["--ptxas-options=-v"])
    block = log.split(f"Compiling entry function '{entry}'", 1)[1].split("Compiling entry function", 1)[0]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
    assert spills is not None, log
    assert max(int(spills.group(1)), int(spills.group(2))) <= allowed, block


@needs_nvrtc
@pytest.mark.parametrize("entry", ["nhf_units", "nhf_top_chunks", "nhf_finalize"])
def test_nh_fast_tail_kernels_use_no_local_memory(entry: str) -> None:
    # The serial BLAKE3 chains after the leaf kernel: a message block indexed at run time put
    # them in local memory (a 128-256 byte stack frame, read on every compression) until
    # nhf_b3_block filled the words with constant indices.
    log = _compile.compile_log("nh_fast", "sm_90", ["--ptxas-options=-v"])
    block = log.split(f"Compiling entry function '{entry}'", 1)[1].split("Compiling entry function", 1)[0]
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
    assert frame is not None, log
    assert frame.groups() == ("0", "0", "0"), block


@needs_nvrtc
def test_fused_nh_fast_kernel_keeps_the_leaf_loops_registers() -> None:
    name, entry, allowed = FUSED_KERNEL
    log = _compile.compile_log(name, "sm_90", ["--ptxas-options=-v"])

    def usage(kernel: str) -> tuple[int, int, int]:
        after = log.split(f"Compiling entry function '{kernel}'", 1)[1]
        block = after.split("Compiling entry function", 1)[0]
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        regs = re.search(r"Used (\d+) registers", block)
        assert spills is not None and regs is not None, block
        return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))

    fused, plain = usage(entry), usage("nhf_leaf_tags")
    assert fused[0] <= plain[0] <= 128  # two blocks of 256 threads per SM (NHF_MIN_BLOCKS)
    assert max(fused[1:]) <= allowed, (fused, plain)


@needs_nvrtc
@pytest.mark.parametrize(
    ("name", "macro", "values"),
    [
        ("sha256_tree", "VR_SHA_VARIANT", (0, 15, 65)),
        ("blake3", "VR_B3_VARIANT", (0, 2)),
        ("nh_fast", "NHF_PIPELINE", (0, 1)),
        ("nh_fast", "NHF_INFLIGHT", (1, 3, 4)),
        ("nh_fast", "NHF_FUSED_UNITS", (0,)),
    ],
)
def test_tuning_variants_compile(name: str, macro: str, values: tuple[int, ...]) -> None:
    for v in values:
        assert _compile.compile_cubin(name, "sm_90", [f"-D{macro}={v}"])[:4] == b"\x7fELF"


def test_rejects_virtual_architectures() -> None:
    with pytest.raises(ValueError, match="real GPU architecture"):
        _compile.compile_cubin("sha256_tree", "compute_90")


def test_program_options_take_defines_and_ptxas_only() -> None:
    pytest.importorskip("cuda.core")
    opts = _compile._program_options("blake3", "sm_90", ["-DVR_B3_VARIANT=2", "-DFLAG", "--ptxas-options=-v"])
    assert opts.arch == "sm_90"
    assert opts.name == "blake3.cu"
    assert list(opts.define_macro) == [("VR_B3_VARIANT", "2"), "FLAG"]
    assert list(opts.ptxas_options) == ["-v"]
    for bad in ("-G", "--use_fast_math", "-D", "-I/tmp"):
        with pytest.raises(ValueError, match="unsupported kernel compile option"):
            _compile._program_options("blake3", "sm_90", [bad])


def test_blake3_split_piece_matches_the_kernel() -> None:
    """The host's piece size and block size for blake3_units_split (grid = pieces, 128 threads) are
    the kernel's: a mismatch would hash the wrong bytes or leave chunks out."""
    from vram_residency.backends.cuda import _backend
    from vram_residency.formats.tree import UNIT_SIZE

    src = (importlib.resources.files("vram_residency.backends.cuda") / "kernels" / "blake3.cu").read_text()
    shift = re.search(r"#define B3_SPLIT_SHIFT (\d+)\n", src)
    chunks = re.search(r"#define B3_SPLIT_CHUNKS (\d+)u\n", src)
    assert shift is not None and chunks is not None
    assert _backend._B3_PIECE == 1 << int(shift.group(1)) == 1024 * int(chunks.group(1))
    assert int(chunks.group(1)) == _backend._B3_PIECE_THREADS
    assert UNIT_SIZE % _backend._B3_PIECE == 0
