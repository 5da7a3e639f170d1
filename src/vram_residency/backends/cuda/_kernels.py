"""Loaded kernel modules of one device context, and kernel launches.

Each ``.cu`` source is compiled once per (architecture, options) by :mod:`._compile` and loaded
once per backend. Kernel arguments are packed with ctypes into the ``void*[]`` that
cuLaunchKernel takes, which works the same on every cuda-bindings version.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from typing import Any, Final

from vram_residency.backends.cuda import _compile
from vram_residency.backends.cuda._driver import check, driver

__all__ = ["U32", "U64", "Arg", "Module", "launch"]

#: Argument kinds: device pointers and 64-bit sizes are U64, the rest U32.
U32: Final = ctypes.c_uint32
U64: Final = ctypes.c_uint64
Arg = tuple[type[ctypes.c_uint32 | ctypes.c_uint64], int]

# FIPS 180-4, 4.2.2: the first 32 bits of the fractional parts of the cube roots of the first 64
# primes.
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


class Module:
    """One kernel source loaded into the current context."""

    def __init__(self, source: str, arch: str, defines: Mapping[str, str] | None = None) -> None:
        opts = [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
        self.source = source
        self.options = tuple(opts)
        drv = driver()
        version = int(check(drv.cuDriverGetVersion(), "cuDriverGetVersion"))
        self.cubin = _compile.compile_cubin(source, arch, opts, driver_version=version)
        self._module = check(drv.cuModuleLoadData(self.cubin), f"loading the {source} kernels")
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
        drv = driver()
        dptr, size = check(drv.cuModuleGetGlobal(self._module, name.encode()), f"finding {name}")
        values = (ctypes.c_uint32 * len(words))(*words)
        if int(size) != ctypes.sizeof(values):
            raise RuntimeError(f"{name} has an unexpected size in the kernel image")
        check(drv.cuMemcpyHtoD(dptr, ctypes.addressof(values), ctypes.sizeof(values)), f"setting {name}")

    def function(self, name: str) -> Any:
        fn = self._functions.get(name)
        if fn is None:
            fn = check(driver().cuModuleGetFunction(self._module, name.encode()), f"kernel {name}")
            self._functions[name] = fn
        return fn

    def unload(self) -> None:
        if self._module is not None:
            driver().cuModuleUnload(self._module)
            self._module = None
            self._functions.clear()


def launch(fn: Any, grid: int, block: int, stream: Any, args: Sequence[Arg], *, what: str) -> None:
    """Launch ``fn`` on a 1-D grid with arguments given as (ctypes type, value) pairs."""
    values = [kind(value) for kind, value in args]
    ptrs = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    check(
        driver().cuLaunchKernel(fn, grid, 1, 1, block, 1, 1, 0, stream, ctypes.addressof(ptrs), 0),
        what,
    )
