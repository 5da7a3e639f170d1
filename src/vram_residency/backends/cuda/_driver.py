"""Thin access to the CUDA driver API (``cuda.bindings.driver``) with errors mapped to ours.

The backend runs on ``cuda.core`` (``_core``); this module serves what cuda.core 1.2 cannot do
(initialization with a reason for every failure, device count, pointer attributes, exact
allocations, range copies, peer access, module globals), each call commented where it is made.

cuda-bindings is an optional dependency: it is imported on first use, and every way of not
having a usable GPU (package missing, driver library missing, no device) becomes a ConfigError
that says ``backend='cuda' requested but ...``.

Error classes, following the starting design: out of memory is retriable (InsufficientVram where
the request size is known, CudaAllocationFailed elsewhere); a bad argument that slipped past our
own checks is InvalidInput; a missing or unusable driver or device is ConfigError; anything else
(illegal address, launch failure, ECC error, lost context) means device memory can no longer be
trusted and is IntegrityViolation, which is fatal. Messages carry the CUDA error name and the
operation, never a pointer value.
"""

from __future__ import annotations

import threading
from typing import Any

from vram_residency.errors import (
    ConfigError,
    CudaAllocationFailed,
    IntegrityViolation,
    InvalidInput,
    VramError,
)

__all__ = ["check", "driver", "error_name", "init", "map_error", "map_name", "request_error"]

_driver: Any = None
_init_lock = threading.Lock()
_initialized = False

_CONFIG_ERRORS = frozenset(
    {
        "CUDA_ERROR_NO_DEVICE",
        "CUDA_ERROR_INVALID_DEVICE",
        "CUDA_ERROR_NOT_INITIALIZED",
        "CUDA_ERROR_DEINITIALIZED",
        "CUDA_ERROR_INSUFFICIENT_DRIVER",
        "CUDA_ERROR_NOT_SUPPORTED",
        "CUDA_ERROR_NO_BINARY_FOR_GPU",
        "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
        "CUDA_ERROR_INVALID_IMAGE",
        "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
        "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
        "CUDA_ERROR_DEVICE_UNAVAILABLE",
        "CUDA_ERROR_SYSTEM_NOT_READY",
        "CUDA_ERROR_OPERATING_SYSTEM",
    }
)
_INPUT_ERRORS = frozenset({"CUDA_ERROR_INVALID_VALUE"})
_OOM = "CUDA_ERROR_OUT_OF_MEMORY"


def request_error(reason: str) -> ConfigError:
    return ConfigError(f"backend='cuda' requested but {reason}")


def driver() -> Any:
    """The ``cuda.bindings.driver`` module (imported once)."""
    global _driver
    if _driver is None:
        try:
            from cuda.bindings import driver as drv
        except ImportError as exc:
            raise request_error(
                "the cuda-bindings package is not installed (pip install 'vram-residency[cuda]')"
            ) from exc
        _driver = drv
    return _driver


def error_name(err: Any) -> str:
    drv = driver()
    try:
        res, name = drv.cuGetErrorName(err)
        if res == drv.CUresult.CUDA_SUCCESS and name:
            return bytes(name).decode(errors="replace")
    except Exception:  # noqa: S110 - a name is a nicety; fall through to the enum's own
        pass
    return getattr(err, "name", str(err))


def map_error(err: Any, what: str) -> VramError:
    return map_name(error_name(err), what)


def map_name(name: str, what: str) -> VramError:
    """Our error for a CUDA error given by name (``CUDA_ERROR_...``): a driver result here, or
    the name at the start of a cuda.core ``CUDAError`` (``_core.core_errors``)."""
    msg = f"{what} failed: {name}"
    if name == _OOM:
        return CudaAllocationFailed(msg)
    if name in _INPUT_ERRORS:
        return InvalidInput(msg)
    if name in _CONFIG_ERRORS:
        return ConfigError(msg)
    return IntegrityViolation(msg)


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-bindings result tuple ``(err, *values)``: raise on error, else return the
    single value, a tuple of values, or None."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != driver().CUresult.CUDA_SUCCESS:
        raise map_error(err, what)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def init() -> None:
    """cuInit once per process, with every failure a ConfigError saying why."""
    global _initialized
    drv = driver()
    with _init_lock:
        if _initialized:
            return
        try:
            (err,) = drv.cuInit(0)
        except ImportError as exc:  # pragma: no cover - defensive
            raise request_error(f"the CUDA driver could not be loaded ({exc})") from exc
        except Exception as exc:
            # cuda-pathfinder raises its own error when libcuda.so is not on the system.
            raise request_error(
                f"the NVIDIA driver library (libcuda) could not be loaded: {type(exc).__name__}"
            ) from exc
        if err != drv.CUresult.CUDA_SUCCESS:
            name = error_name(err)
            if name == "CUDA_ERROR_NO_DEVICE":
                raise request_error("no CUDA GPU is visible to this process (CUDA_ERROR_NO_DEVICE)")
            raise request_error(f"the CUDA driver did not initialize ({name})")
        _initialized = True
