"""Run-time compilation of the package's ``.cu`` kernels with NVRTC, to CUBIN for one architecture.

CUBIN rather than PTX: the NVRTC wheel installed beside cuda-bindings may be newer than the
driver, and a driver refuses PTX of a newer ISA than its own, while machine code for the device's
own architecture loads on any driver that supports the device. Results are cached in memory per
(kernel, architecture, options); there is no nvcc step at install.
"""

from __future__ import annotations

import importlib.resources
import threading
from collections.abc import Sequence
from importlib.resources.abc import Traversable
from typing import Any, Final

from vram_residency.errors import ConfigError

__all__ = ["KERNELS", "compile_cubin", "kernel_source", "nvrtc_version"]

#: Kernel sources shipped in the package (``kernels/<name>.cu``).
KERNELS: Final = ("sha256_tree", "blake3", "nh_fast")
#: Headers they include, handed to NVRTC by name (it has no file system search path here).
HEADERS: Final = ("vr_common.cuh",)

_BASE_OPTIONS: Final = ("--std=c++17", "-default-device")

_cache: dict[tuple[str, str, tuple[str, ...]], bytes] = {}
_cache_lock = threading.Lock()


def kernel_source(name: str) -> bytes:
    if name not in KERNELS:
        raise ValueError(f"unknown kernel source {name!r}")
    return (_kernels_dir() / f"{name}.cu").read_bytes()


def _kernels_dir() -> Traversable:
    return importlib.resources.files(__package__) / "kernels"


def _headers() -> tuple[int, list[bytes], list[bytes]]:
    srcs = [(_kernels_dir() / h).read_bytes() for h in HEADERS]
    return len(HEADERS), srcs, [h.encode() for h in HEADERS]


def _nvrtc() -> Any:
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:  # pragma: no cover - depends on the installed extra
        raise ConfigError(
            "NVRTC is not available: install the CUDA extra (pip install 'vram-residency[cuda]')"
        ) from exc
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    err, major, minor = nvrtc.nvrtcVersion()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise ConfigError(f"nvrtcVersion failed: {err}")
    return int(major), int(minor)


def compile_cubin(name: str, arch: str, extra_options: Sequence[str] = ()) -> bytes:
    """CUBIN of kernel source ``name`` for ``arch`` (for example ``"sm_90"``), cached."""
    if not arch.startswith("sm_") or not arch[3:].rstrip("af").isdigit():
        raise ValueError(f"not a real GPU architecture: {arch!r}")
    key = (name, arch, tuple(extra_options))
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    nvrtc = _nvrtc()
    ok = nvrtc.nvrtcResult.NVRTC_SUCCESS
    src = kernel_source(name)
    err, prog = nvrtc.nvrtcCreateProgram(src, f"{name}.cu".encode(), *_headers())
    if err != ok:
        raise ConfigError(f"nvrtcCreateProgram({name}) failed: {err}")
    try:
        opts = [o.encode() for o in (*_BASE_OPTIONS, f"--gpu-architecture={arch}", *extra_options)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != ok:
            raise ConfigError(f"NVRTC could not compile {name}.cu for {arch}: {err}\n{_log(nvrtc, prog)}")
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        if err != ok or size == 0:
            raise ConfigError(f"NVRTC produced no CUBIN for {name}.cu ({arch}): {err}")
        cubin = b" " * int(size)
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        if err != ok:
            raise ConfigError(f"nvrtcGetCUBIN({name}) failed: {err}")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    with _cache_lock:
        _cache[key] = cubin
    return cubin


def compile_log(name: str, arch: str, extra_options: Sequence[str] = ()) -> str:
    """The compiler's log for one compilation (warnings; ptxas resource usage with -v)."""
    nvrtc = _nvrtc()
    err, prog = nvrtc.nvrtcCreateProgram(kernel_source(name), f"{name}.cu".encode(), *_headers())
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise ConfigError(f"nvrtcCreateProgram({name}) failed: {err}")
    try:
        opts = [o.encode() for o in (*_BASE_OPTIONS, f"--gpu-architecture={arch}", *extra_options)]
        nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        return _log(nvrtc, prog)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _log(nvrtc: Any, prog: Any) -> str:
    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS or size <= 1:
        return ""
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    text: str = buf.rstrip(b"\x00").decode(errors="replace")
    return text
