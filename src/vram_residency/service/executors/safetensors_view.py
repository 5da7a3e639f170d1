"""Tensors of a sealed safetensors shard, viewed in place.

The header is parsed from the sealed shard's own memory (not from the file on disk), so the tensor
table the executor uses is covered by the seal as well. Every array returned here is a view over
that memory (read-only ``numpy`` on the host, CuPy over VRAM): no byte of a tensor is copied
between verification and use.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from vram_residency.errors import InvalidInput
from vram_residency.service.executor import DeviceMemory, SealedWeights

__all__ = [
    "CupySafetensorsView",
    "InPlaceExecutor",
    "SafetensorsView",
    "TensorInfo",
    "open_view",
    "parse_header",
]

#: Upper bound on the JSON header; the format's reference implementation uses the same 100 MB.
_MAX_HEADER: Final = 100_000_000
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


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str  # the safetensors name (F32, I64, ...)
    shape: tuple[int, ...]
    start: int  # offset in the shard (header included), half-open
    end: int


def parse_header(head: bytes | memoryview, size: int) -> tuple[int, dict[str, TensorInfo]]:
    """Parse a safetensors header from the first bytes of a ``size``-byte file or shard.

    Returns the offset of the data section and the tensors by name, with offsets relative to the
    start of the file. Bounds are checked against ``size`` so that a malformed header can never
    make a view reach outside the shard.
    """
    if size < 8 or len(head) < 8:
        raise InvalidInput("not a safetensors file: shorter than its 8-byte header length")
    (n,) = struct.unpack_from("<Q", head, 0)
    if n > _MAX_HEADER or 8 + n > size or 8 + n > len(head):
        raise InvalidInput(f"safetensors header length {n} is out of range")
    try:
        raw: Any = json.loads(bytes(head[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidInput("safetensors header is not a JSON object")
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, meta in raw.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise InvalidInput(f"safetensors entry {name!r} is not an object")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise InvalidInput(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidInput(f"tensor {name!r}: bad shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise InvalidInput(f"tensor {name!r}: bad data_offsets")
        begin, end = offsets
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not 0 <= begin <= end or base + end > size or end - begin != count * itemsize:
            raise InvalidInput(f"tensor {name!r}: data_offsets out of range or inconsistent with shape")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), base + begin, base + end)
    return base, tensors


class SafetensorsView:
    """Read-only, zero-copy numpy views of the tensors in a safetensors image held in ``memory``.

    ``memory`` is the emulated device memory of a sealed shard (``HostBuffer.host_view()``). Call
    :meth:`close` before the shard is deallocated: it drops every view so that the memory can be
    zeroed and unmapped.
    """

    xp: Any = np

    def __init__(self, memory: memoryview) -> None:
        self._memory: memoryview | None = memory
        _, self.tensors = parse_header(memory[: min(len(memory), 8 + _MAX_HEADER)], len(memory))
        self._arrays: dict[str, Any] = {}

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
        dtype = np.dtype(_DTYPES[info.dtype])
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
        (n,) = struct.unpack("<Q", memory.read(0, 8)) if memory.size >= 8 else (0,)
        if n > _MAX_HEADER or 8 + n > memory.size:
            raise InvalidInput(f"safetensors header length {n} is out of range")
        _, self.tensors = parse_header(memory.read(0, 8 + n), memory.size)
        unowned = cupy.cuda.UnownedMemory(memory.ptr, memory.size, memory.owner, device_id=memory.device)
        self._base: Any = cupy.cuda.MemoryPointer(unowned, 0)
        self._memory = memoryview(b"")  # marks the view open for _info
        self._arrays = {}

    def array(self, name: str) -> Any:
        cached = self._arrays.get(name)
        if cached is not None:
            return cached
        info = self._info(name)
        arr = self.xp.ndarray(info.shape, dtype=np.dtype(_DTYPES[info.dtype]), memptr=self._base + info.start)
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
