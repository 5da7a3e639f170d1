"""The CUDA backend: real VRAM through NVIDIA's ``cuda.core`` (device, streams, events, kernel
modules and launches, pinned memory; ``cuda-bindings`` only where cuda.core has no API), kernels
compiled at run time with NVRTC through cuda.core's ``Program``, digests computed on the GPU.

    from vram_residency.backends.cuda import open_backend

    backend = open_backend(0)                 # ConfigError if there is no usable GPU
    buf = backend.allocate(n)                 # exact cuMemAlloc (our MemoryResource), zero-filled
    result = backend.write_and_hash(buf, data, "sha256-tree-v1")   # seal: copy + digest, overlapped
    assert backend.digest(buf, "sha256-tree-v1") == result.digest  # verify: nothing copied back
    buf.close()                               # zeroed, then freed

Importing this package needs nothing beyond the base install; ``open_backend`` says what is
missing (the ``cuda`` extra, a driver, a GPU) when the backend cannot be used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vram_residency.backends.cuda._backend import CudaBackend, CudaBuffer

__all__ = ["CudaBackend", "CudaBuffer", "available", "device_count", "open_backend"]


def open_backend(device: int = 0, **opts: Any) -> CudaBackend:
    """A :class:`CudaBackend` on ``device``. Raises ConfigError with the reason (cuda-bindings or
    cuda-core missing, no NVIDIA driver, no GPU, no such device) when that is not possible."""
    from vram_residency.backends.cuda._backend import CudaBackend

    return CudaBackend(device, **opts)


def device_count() -> int:
    """Number of visible CUDA devices; ConfigError when the driver or cuda-bindings is missing."""
    from vram_residency.backends.cuda._backend import device_count as count

    return count()


def available() -> bool:
    """True when at least one CUDA device can be used (for ``backend="auto"``)."""
    from vram_residency.errors import ConfigError

    try:
        return device_count() > 0
    except ConfigError:
        return False


def __getattr__(name: str) -> Any:
    # The classes load cuda-bindings only when asked for.
    if name in ("CudaBackend", "CudaBuffer"):
        from vram_residency.backends.cuda import _backend

        return getattr(_backend, name)
    raise AttributeError(name)
