"""Tensors of a sealed safetensors shard, viewed in place.

The header is parsed from the sealed shard's own memory (not from the file on disk), so the tensor
table the executor uses is covered by the seal as well. It is parsed by the one strict parser of
the package, :func:`vram_residency.sources.parse_safetensors_header`, the same one that checked
the file when it was sealed: what is trusted here cannot drift from what was checked there. Every
array returned here is a view over that memory (read-only ``numpy`` on the host, CuPy over VRAM):
no byte of a tensor is copied between verification and use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

import numpy as np

from vram_residency.errors import InvalidInput
from vram_residency.service.executor import DeviceMemory, SealedWeights
from vram_residency.sources import (
    MAX_SAFETENSORS_HEADER,
    SafetensorsEntry,
    parse_safetensors_header,
    safetensors_header_size,
)

__all__ = [
    "CupySafetensorsView",
    "InPlaceExecutor",
    "SafetensorsView",
    "TensorInfo",
    "open_view",
    "parse_header",
]

#: What error messages call the memory being parsed.
_WHAT: Final = "sealed shard"
#: The safetensors dtypes the executors can view as arrays (little-endian, as the format stores
#: them). The header parser knows every dtype of the format; a tensor of any other dtype (BF16,
#: the float8 and sub-byte formats, ...) is refused by name when an executor asks for it.
_DTYPES: Final[Mapping[str, str]] = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}

#: A tensor of the shard: name, safetensors dtype, shape and its half-open byte range in the shard
#: (header included).
TensorInfo = SafetensorsEntry


def parse_header(head: bytes | memoryview, size: int) -> tuple[int, dict[str, TensorInfo]]:
    """Parse a safetensors header from the first bytes of a ``size``-byte file or shard.

    Returns the offset of the data section and the tensors by name, with offsets relative to the
    start of the file. This is :func:`vram_residency.sources.parse_safetensors_header`, the strict
    parser sealing uses: bounds, sizes and exact coverage are checked against ``size``, so a
    malformed header can never make a view reach outside the shard.
    """
    header = parse_safetensors_header(head, size, _WHAT)
    return header.data_start, header.by_name()


def _numpy_dtype(info: TensorInfo) -> np.dtype[Any]:
    code = _DTYPES.get(info.dtype)
    if code is None:
        raise InvalidInput(
            f"tensor {info.name!r} has dtype {info.dtype}, which the executors cannot view "
            f"(they view {', '.join(_DTYPES)})"
        )
    return np.dtype(code)


class SafetensorsView:
    """Read-only, zero-copy numpy views of the tensors in a safetensors image held in ``memory``.

    ``memory`` is the emulated device memory of a sealed shard (``HostBuffer.host_view()``). Call
    :meth:`close` before the shard is deallocated: it drops every view so that the memory can be
    zeroed and unmapped.
    """

    xp: Any = np

    def __init__(self, memory: memoryview) -> None:
        self._memory: memoryview | None = memory
        self._arrays: dict[str, Any] = {}
        try:
            # The slice is released on the way out, error or not: a traceback holding it would keep
            # the shard's memory exported, and the shard could not be freed while the error is
            # being handled. The view owns ``memory`` (``close`` releases it), so a failed
            # construction releases it too.
            with memory[: min(len(memory), 8 + MAX_SAFETENSORS_HEADER)] as head:
                _, self.tensors = parse_header(head, len(memory))
        except BaseException:
            self.close()
            raise

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def _info(self, name: str) -> TensorInfo:
        if self._memory is None:
            raise InvalidInput("tensor view is closed")
        info = self.tensors.get(name)
        if info is None:
            raise InvalidInput(f"tensor {name!r} is not in the model")
        return info

    def array(self, name: str) -> Any:
        """The tensor ``name`` as a read-only array over the shard's memory (no copy)."""
        cached = self._arrays.get(name)
        if cached is not None:
            return cached
        info = self._info(name)
        dtype = _numpy_dtype(info)
        arr = np.frombuffer(
            self._memory,  # type: ignore[arg-type]  # checked open by _info
            dtype=dtype,
            count=(info.end - info.start) // dtype.itemsize,
            offset=info.start,
        ).reshape(info.shape)
        # The weights are evidence: nothing in the executor may write through a view.
        arr.flags.writeable = False
        self._arrays[name] = arr
        return arr

    def close(self) -> None:
        """Drop every array and release the memory view (idempotent)."""
        self._arrays.clear()
        if self._memory is not None:
            mem, self._memory = self._memory, None
            mem.release()


class CupySafetensorsView(SafetensorsView):
    """CuPy arrays over a sealed shard in VRAM, at the tensor offsets of the header in the shard.

    The header (a few kB) is copied to the host to be parsed; the tensors are views of the device
    allocation (``cupy.cuda.UnownedMemory``), never copies. CuPy has no read-only arrays: the
    executor's code is what keeps from writing to them.
    """

    def __init__(self, memory: DeviceMemory) -> None:
        import cupy

        self.xp = cupy
        self._device = memory
        # Exactly the header's bytes are copied: its length field first, checked, then the rest.
        prefix = memory.read(0, 8) if memory.size >= 8 else b""
        header_end = safetensors_header_size(prefix, memory.size, _WHAT)
        _, self.tensors = parse_header(memory.read(0, header_end), memory.size)
        unowned = cupy.cuda.UnownedMemory(memory.ptr, memory.size, memory.owner, device_id=memory.device)
        self._base: Any = cupy.cuda.MemoryPointer(unowned, 0)
        self._memory = memoryview(b"")  # marks the view open for _info
        self._arrays = {}

    def array(self, name: str) -> Any:
        cached = self._arrays.get(name)
        if cached is not None:
            return cached
        info = self._info(name)
        arr = self.xp.ndarray(info.shape, dtype=_numpy_dtype(info), memptr=self._base + info.start)
        self._arrays[name] = arr
        return arr

    def close(self) -> None:
        self._arrays.clear()
        self._base = None
        self._memory = None


def open_view(
    host_memory: memoryview | None, device_memory: DeviceMemory | None
) -> tuple[SafetensorsView, str]:
    """The view an executor runs on (numpy over the host backend's memory, else CuPy over the CUDA
    allocation) and where that is, in words."""
    if host_memory is not None:
        return SafetensorsView(host_memory), "numpy on the host"
    if device_memory is None:
        raise InvalidInput("an executor needs the shard's memory (host or CUDA)")
    return CupySafetensorsView(device_memory), f"CuPy on GPU {device_memory.device}"


class InPlaceExecutor:
    """What the built-in executors share: the shard's tensors as views of one safetensors view,
    bound once, and every view dropped on close, the attributes holding them before the view
    itself. A subclass names those attributes in ``_VIEW_ATTRS`` (its per-layer views live in
    ``_layers``) and calls ``_open`` with its binding step."""

    _VIEW_ATTRS: tuple[str, ...] = ()
    _layers: list[Any]
    _view: SafetensorsView
    _where: str
    _xp: Any

    def _open(self, weights: SealedWeights, bind: Callable[[], None]) -> None:
        # Raises InvalidInput when the shard has neither host nor CUDA memory to run on.
        self._view, self._where = open_view(weights.host_memory, weights.device_memory)
        self._xp = self._view.xp
        try:
            bind()
        except BaseException:
            self.close()  # no view of the shard outlives a failed construction
            raise

    def close(self) -> None:
        self._layers = []
        for attr in self._VIEW_ATTRS:
            if hasattr(self, attr):
                delattr(self, attr)
        self._view.close()
