"""Run-time compilation of the package's ``.cu`` kernels with NVRTC, to CUBIN for one architecture,
through NVIDIA's ``cuda.core`` (``Program``, ``ProgramOptions``, ``ObjectCode``).

CUBIN rather than PTX: the NVRTC wheel installed beside cuda-bindings may be newer than the
driver, and a driver refuses PTX of a newer ISA than its own, while machine code for the device's
own architecture loads on any driver that supports the device. Results are cached in memory per
(kernel, architecture, options), and on disk across processes (``_kcache``: keyed by source,
options, architecture, NVRTC and driver versions, checked before use); there is no nvcc step at
install.
"""

from __future__ import annotations

import importlib.resources
import io
import threading
from collections.abc import Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Final

from vram_residency.backends.cuda import _kcache
from vram_residency.errors import ConfigError

__all__ = ["KERNELS", "compile_cubin", "kernel_source", "nvrtc_version"]

#: Kernel sources shipped in the package (``kernels/<name>.cu``).
KERNELS: Final = ("sha256_tree", "blake3", "nh_fast")
#: Headers they include (from the kernels folder, cuda.core's include path); part of the cache key.
HEADERS: Final = ("vr_common.cuh",)

# What every compilation gets (ProgramOptions below); listed for the disk cache's key. "cuda.core"
# marks entries compiled through cuda.core's Program, which sets its own NVRTC flags.
_BASE_OPTIONS: Final = ("--std=c++17", "-default-device", "cuda.core")

_cache: dict[tuple[str, str, tuple[str, ...]], bytes] = {}
_cache_lock = threading.Lock()
_nvrtc_version: tuple[int, int] | None = None


def kernel_source(name: str) -> bytes:
    if name not in KERNELS:
        raise ValueError(f"unknown kernel source {name!r}")
    return (_kernels_dir() / f"{name}.cu").read_bytes()


def _kernels_dir() -> Traversable:
    return importlib.resources.files(__package__) / "kernels"


def _headers() -> list[bytes]:
    return [(_kernels_dir() / h).read_bytes() for h in HEADERS]


def _nvrtc() -> Any:
    # cuda-bindings' NVRTC module, for nvrtcVersion only: cuda.core's Program does not expose the
    # compiler's version, which the disk cache's key needs.
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:  # pragma: no cover - depends on the installed extra
        raise ConfigError(
            "NVRTC is not available: install the CUDA extra (pip install 'vram-residency[cuda]')"
        ) from exc
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    global _nvrtc_version
    if _nvrtc_version is not None:
        return _nvrtc_version
    nvrtc = _nvrtc()
    err, major, minor = nvrtc.nvrtcVersion()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise ConfigError(f"nvrtcVersion failed: {err}")
    _nvrtc_version = (int(major), int(minor))
    return _nvrtc_version


#: Where the last compile_cubin call got its CUBIN: "memory", "disk" or "nvrtc" (benchmarks, tests).
last_source = ""


def compile_cubin(
    name: str, arch: str, extra_options: Sequence[str] = (), *, driver_version: int | None = None
) -> bytes:
    """CUBIN of kernel source ``name`` for ``arch`` (for example ``"sm_90"``), cached in memory and
    on disk (``driver_version``, from cuDriverGetVersion where a driver exists, is part of the disk
    key: a driver update may change what loads)."""
    global last_source
    if not arch.startswith("sm_") or not arch[3:].rstrip("af").isdigit():
        raise ValueError(f"not a real GPU architecture: {arch!r}")
    key = (name, arch, tuple(extra_options))
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        last_source = "memory"
        return hit
    disk = _kcache.cache_dir()
    disk_key = b""
    if disk is not None:
        sources = [kernel_source(name), *_headers()]
        opts = (*_BASE_OPTIONS, *extra_options)
        disk_key = _kcache.entry_key(sources, opts, arch, nvrtc_version(), driver_version)
        cached = _kcache.load(disk, disk_key)
        if cached is not None:
            with _cache_lock:
                _cache[key] = cached
            last_source = "disk"
            return cached
    cubin = _compile_nvrtc(name, arch, extra_options)
    if disk is not None:
        _kcache.store(disk, disk_key, cubin)
    with _cache_lock:
        _cache[key] = cubin
    last_source = "nvrtc"
    return cubin


def _program_options(name: str, arch: str, extra_options: Sequence[str]) -> Any:
    """cuda.core ProgramOptions for our option strings: ``-DNAME=VALUE`` (tuning defines) and
    ``--ptxas-options=...``; nothing else is used by the package, so anything else is refused."""
    try:
        from cuda.core import ProgramOptions
    except ImportError as exc:  # pragma: no cover - depends on the installed extra
        raise ConfigError(
            "cuda.core is not available: install the CUDA extra (pip install 'vram-residency[cuda]')"
        ) from exc
    defines: list[str | tuple[str, str]] = []
    ptxas: list[str] = []
    for opt in extra_options:
        if opt.startswith("-D") and len(opt) > 2:
            macro, eq, value = opt[2:].partition("=")
            defines.append((macro, value) if eq else macro)
        elif opt.startswith("--ptxas-options="):
            ptxas.append(opt.split("=", 1)[1])
        else:
            raise ValueError(f"unsupported kernel compile option {opt!r}")
    folder = _kernels_dir()
    if not isinstance(folder, Path):  # pragma: no cover - a zipped install
        raise ConfigError("the kernel sources must be installed as files (not inside a zip)")
    return ProgramOptions(
        name=f"{name}.cu",
        arch=arch,
        std="c++17",
        device_as_default_execution_space=True,
        include_path=[str(folder)],
        define_macro=defines or None,
        ptxas_options=ptxas or None,
    )


def _compile_program(name: str, arch: str, extra_options: Sequence[str]) -> tuple[bytes, str]:
    """(CUBIN, compiler log) of one source through cuda.core's Program (NVRTC underneath)."""
    from cuda.core import Program

    options = _program_options(name, arch, extra_options)
    log = io.StringIO()
    try:
        program = Program(kernel_source(name).decode(), "c++", options=options)
        try:
            obj = program.compile("cubin", logs=log)
        finally:
            program.close()
    except Exception as exc:
        # cuda.core raises its own NVRTC error types, with the log in the message.
        raise ConfigError(f"NVRTC could not compile {name}.cu for {arch}: {exc}\n{log.getvalue()}") from exc
    cubin = bytes(obj.code)
    if not cubin.startswith(b"\x7fELF"):
        raise ConfigError(f"NVRTC produced no CUBIN for {name}.cu ({arch})")
    return cubin, log.getvalue()


def _compile_nvrtc(name: str, arch: str, extra_options: Sequence[str]) -> bytes:
    return _compile_program(name, arch, extra_options)[0]


def compile_log(name: str, arch: str, extra_options: Sequence[str] = ()) -> str:
    """The compiler's log for one compilation (warnings; ptxas resource usage with -v)."""
    return _compile_program(name, arch, extra_options)[1]
