"""Loaded kernel modules of one device, and kernel launches, through cuda.core.

Each ``.cu`` source is compiled once per (architecture, options) by :mod:`._compile` and loaded
once per backend as a cuda.core ``ObjectCode`` (CUBIN); kernels are its ``Kernel`` objects and run
through ``cuda.core.launch`` with a ``LaunchConfig``. Arguments go as NumPy scalars of the exact
C type (``np.uint64`` for pointers and sizes, ``np.uint32`` for counts): cuda.core reads a plain
Python int as a pointer-sized signed integer, which would be wrong for a 32-bit parameter.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from vram_residency.backends.cuda import _compile
from vram_residency.backends.cuda._core import core, core_errors
from vram_residency.backends.cuda._driver import check, driver

__all__ = ["U32", "U64", "Arg", "Module", "launch"]

#: Argument kinds: device pointers and 64-bit sizes are U64, the rest U32.
U32: Final = np.uint32
U64: Final = np.uint64
Arg = tuple[type[np.uint32] | type[np.uint64], int]

# FIPS 180-4, 4.2.2: the first 32 bits of the fractional parts of the cube roots of the first 64
# primes.
# fmt: off
_SHA256_K: Final = (
    0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1, 0x923F82A4, 0xAB1C5ED5,
    0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3, 0x72BE5D74, 0x80DEB1FE, 0x9BDC06A7, 0xC19BF174,
    0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F, 0x4A7484AA, 0x5CB0A9DC, 0x76F988DA,
    0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7, 0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967,
    0x27B70A85, 0x2E1B2138, 0x4D2C6DFC, 0x53380D13, 0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85,
    0xA2BFE8A1, 0xA81A664B, 0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070,
    0x19A4C116, 0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
    0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208, 0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7, 0xC67178F2,
)
# fmt: on


class Module:
    """One kernel source loaded as a cuda.core ``ObjectCode`` (call with the backend's device
    current: the ``__constant__`` data is set for the current context)."""

    def __init__(self, source: str, arch: str, defines: Mapping[str, str] | None = None) -> None:
        opts = [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
        self.source = source
        self.options = tuple(opts)
        drv = driver()
        # The driver version is part of the disk cache's key; cuda.core 1.2 does not expose it.
        version = int(check(drv.cuDriverGetVersion(), "cuDriverGetVersion"))
        self.cubin = _compile.compile_cubin(source, arch, opts, driver_version=version)
        with core_errors(f"loading the {source} kernels"):
            self._code: Any = core().ObjectCode.from_cubin(self.cubin)
        self._functions: dict[str, Any] = {}
        self._init_constants()

    def _init_constants(self) -> None:
        # vr_common.cuh: the multipliers 2^k that move integer work to the FMA pipe, and SHA-256's
        # round constants for the variant that adds them on that pipe. They live in __constant__
        # memory that only the host fills, so that the compiler cannot fold them.
        self._set_constant("vr_mulc", [1 << k for k in range(32)])
        if self.source == "sha256_tree":
            self._set_constant("vr_sha_k", list(_SHA256_K))

    def _set_constant(self, name: str, words: Sequence[int]) -> None:
        # cuda-bindings: cuda.core 1.2 has no access to a module's global (``__constant__``)
        # symbols. ``ObjectCode.handle`` is the CUlibrary cuda.core loaded the CUBIN into;
        # cuLibraryGetGlobal gives the symbol's address in the current context.
        drv = driver()
        with core_errors(f"loading the {self.source} kernels"):
            handle = self._code.handle
        if isinstance(handle, drv.CUmodule):
            found = drv.cuModuleGetGlobal(handle, name.encode())
        else:
            found = drv.cuLibraryGetGlobal(handle, name.encode())
        dptr, size = check(found, f"finding {name}")
        values = (ctypes.c_uint32 * len(words))(*words)
        if int(size) != ctypes.sizeof(values):
            raise RuntimeError(f"{name} has an unexpected size in the kernel image")
        check(drv.cuMemcpyHtoD(dptr, ctypes.addressof(values), ctypes.sizeof(values)), f"setting {name}")

    def function(self, name: str) -> Any:
        """The cuda.core ``Kernel`` called ``name``."""
        fn = self._functions.get(name)
        if fn is None:
            with core_errors(f"kernel {name}"):
                fn = self._code.get_kernel(name)
            self._functions[name] = fn
        return fn

    def blocks_per_sm(self, name: str, block: int) -> int:
        """Resident blocks per multiprocessor of kernel ``name`` at ``block`` threads (cuda.core's
        occupancy query, cuOccupancyMaxActiveBlocksPerMultiprocessor underneath)."""
        fn = self.function(name)
        with core_errors("occupancy"):
            return int(fn.occupancy.max_active_blocks_per_multiprocessor(block, 0))

    def unload(self) -> None:
        # cuda.core unloads the library when the last reference to the ObjectCode goes.
        self._functions.clear()
        self._code = None


_configs: dict[tuple[int, int], Any] = {}


def _config(grid: int, block: int) -> Any:
    # LaunchConfig validates its fields on construction; the few (grid, block) pairs of a
    # steady-state verify are built once.
    key = (grid, block)
    cfg = _configs.get(key)
    if cfg is None:
        cfg = core().LaunchConfig(grid=grid, block=block, shmem_size=0)
        if len(_configs) < 4096:
            _configs[key] = cfg
    return cfg


def launch(fn: Any, grid: int, block: int, stream: Any, args: Sequence[Arg], *, what: str) -> None:
    """Launch cuda.core ``Kernel`` ``fn`` on a 1-D grid on cuda.core ``Stream`` ``stream``, with
    arguments given as (NumPy scalar type, value) pairs."""
    global _launch
    if _launch is None:
        _launch = core().launch
    values = [kind(value) for kind, value in args]
    with core_errors(what):
        _launch(stream, _config(grid, block), fn, *values)


# cuda.core.launch, looked up once: this is the verify path's innermost call.
_launch: Any = None
