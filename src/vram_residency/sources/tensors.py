"""Adopting tensors that already live in device memory: sealed in place, never copied.

``seal_tensors`` takes a PyTorch ``nn.Module`` (its named parameters and buffers), a mapping of
names to tensors, a sequence of tensors, or one tensor. A tensor is anything exposing
``__cuda_array_interface__`` (PyTorch, CuPy, Numba, JAX) or DLPack (``__dlpack__``); on the host
emulation backend, CPU memory is adopted through the buffer protocol or DLPack (numpy arrays,
CPU tensors).

Representation: the tensors of a framework are separate allocations, not one range, so each
distinct memory region becomes its own shard of one ``vram-model-v1`` model (``sources.model``):
the adopted region is digested where it is, and the model_ref binds every tensor's name, size
and digest in order. Names that alias the same region (tied weights) share one shard, whose
tensor index lists them all, so a failed verification names every one of them.

What adopting cannot promise, stated plainly:

- The framework still owns that memory. The manager keeps a reference to each tensor object, so
  Python will not free it while it is sealed, but ``deallocate`` and ``close`` only forget the
  seal: they never zero or free adopted memory.
- Anything the framework itself writes there (an optimizer step, an in-place op, a KV-cache
  reuse of the storage) is, to the seal, indistinguishable from corruption; seal weights that are
  meant to stay constant.
- If the framework releases the storage anyway (``resize_``, ``torch.cuda.empty_cache`` after the
  tensor's storage was swapped, a sleep mode that unmaps weights), the seal points at memory that
  may be reused: verifying it then reads someone else's data. That is the framework's
  use-after-free; the seal can only report a mismatch.
- Pending writes on the framework's streams are not waited for: adopt after the weights are
  loaded and synchronized (for PyTorch, ``torch.cuda.synchronize()``).
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from vram_residency._core import ShardStore, TensorSpan
from vram_residency.audit.events import POLICY_VIOLATION
from vram_residency.backends.base import Backend, DeviceBuffer
from vram_residency.errors import InvalidInput, PolicyViolation
from vram_residency.formats.tree import SHA256_TREE_V1, check_algorithm
from vram_residency.sources.model import PartSource, SealedModel, seal_parts

__all__ = ["AdoptedSource", "TensorInfo", "describe_dlpack", "named_tensors", "seal_tensors"]

log = logging.getLogger("vram_residency")

# DLPack device types (dlpack.h).
KDL_CPU: Final = 1
KDL_CUDA: Final = 2
KDL_CUDA_HOST: Final = 3
KDL_CUDA_MANAGED: Final = 13
_DEVICE_NAMES: Final = {
    1: "CPU",
    2: "CUDA",
    3: "CUDA pinned host",
    13: "CUDA managed",
    4: "OpenCL",
    10: "ROCm",
}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where a tensor's bytes are: a contiguous ``nbytes`` range at ``ptr`` on a DLPack device."""

    ptr: int
    nbytes: int
    device_type: int
    device_id: int

    @property
    def device_name(self) -> str:
        return _DEVICE_NAMES.get(self.device_type, f"DLPack device type {self.device_type}")


@dataclass(slots=True)
class AdoptedSource:
    """Kept with an adopted shard: the tensor objects (so Python does not free them while they
    are sealed) and their names. There is no file to repair from."""

    names: tuple[str, ...]
    owners: tuple[object, ...] = field(repr=False)


# -- DLPack ---------------------------------------------------------------------------------------


class _DLDevice(ctypes.Structure):
    _fields_ = (("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32))


class _DLDataType(ctypes.Structure):
    _fields_ = (("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16))


class _DLTensor(ctypes.Structure):
    _fields_ = (
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    )


class _DLManagedTensor(ctypes.Structure):
    _fields_ = (("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p))


_capsule_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_get_pointer.restype = ctypes.c_void_p
_capsule_get_pointer.argtypes = (ctypes.py_object, ctypes.c_char_p)
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype = ctypes.c_int
_capsule_is_valid.argtypes = (ctypes.py_object, ctypes.c_char_p)


def _dl_info(t: _DLTensor, what: str) -> TensorInfo:
    ndim = int(t.ndim)
    if ndim < 0:
        raise InvalidInput(f"{what}: DLPack tensor has a negative ndim")
    shape = [int(t.shape[i]) for i in range(ndim)]
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{what}: DLPack tensor has a negative dimension")
    bits = int(t.dtype.bits) * int(t.dtype.lanes)
    nbits = math.prod(shape) * bits
    if nbits % 8:
        raise InvalidInput(f"{what}: DLPack tensor of {nbits} bits does not fill whole bytes")
    if t.strides and math.prod(shape) > 1:
        # Compact row-major (C order) strides, in elements; size-1 dimensions may carry any
        # stride. Anything else leaves gaps or overlaps that the framework can write freely.
        expected = 1
        for i in reversed(range(ndim)):
            if shape[i] != 1 and int(t.strides[i]) != expected:
                raise InvalidInput(
                    f"{what}: tensor is not contiguous; only contiguous tensors can be adopted"
                )
            expected *= shape[i]
    data = int(t.data or 0) + int(t.byte_offset)
    return TensorInfo(data, nbits // 8, int(t.device.device_type), int(t.device.device_id))


def describe_dlpack(obj: Any, what: str = "tensor") -> TensorInfo:
    """Read where ``obj``'s bytes are from its DLPack capsule, without taking ownership.

    The capsule is left unconsumed: when it is collected, the producer's own destructor releases
    what it allocated for the export. ``obj`` itself keeps the memory alive."""
    try:
        capsule = obj.__dlpack__()
    except (TypeError, BufferError, RuntimeError, ValueError) as exc:
        raise InvalidInput(f"{what}: cannot export through DLPack: {exc}") from None
    if not _capsule_is_valid(capsule, b"dltensor"):
        raise InvalidInput(f"{what}: __dlpack__ did not return an unconsumed 'dltensor' capsule")
    ptr = _capsule_get_pointer(capsule, b"dltensor")
    managed = _DLManagedTensor.from_address(ptr)
    info = _dl_info(managed.dl_tensor, what)
    del managed, capsule
    return info


# -- __cuda_array_interface__ ------------------------------------------------------------------------


def describe_cai(obj: Any, what: str = "tensor") -> TensorInfo:
    """Where ``obj``'s bytes are, from ``__cuda_array_interface__`` (version 2 or 3)."""
    cai = obj.__cuda_array_interface__
    try:
        ptr = int(cai["data"][0])
        shape = [int(d) for d in cai["shape"]]
        itemsize = int(str(cai["typestr"])[2:])
        strides = cai.get("strides")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InvalidInput(f"{what}: malformed __cuda_array_interface__: {exc}") from None
    if any(d < 0 for d in shape) or itemsize <= 0:
        raise InvalidInput(f"{what}: malformed __cuda_array_interface__ shape or typestr")
    if strides is not None and math.prod(shape) > 1:
        expected = itemsize
        for d, s in zip(reversed(shape), reversed([int(x) for x in strides]), strict=True):
            if d != 1 and s != expected:
                raise InvalidInput(
                    f"{what}: tensor is not contiguous; only contiguous tensors can be adopted"
                )
            expected *= d
    if cai.get("mask") is not None:
        raise InvalidInput(f"{what}: masked arrays cannot be adopted")
    # The interface has no device field: the backend's pointer check says which GPU it is on.
    return TensorInfo(ptr, math.prod(shape) * itemsize, KDL_CUDA, -1)


# -- collecting names ---------------------------------------------------------------------------


def _detach(obj: Any) -> Any:
    # A PyTorch parameter that requires grad refuses both export protocols; detach() is a view
    # of the same storage, not a copy.
    detach = getattr(obj, "detach", None)
    return detach() if callable(detach) and hasattr(obj, "requires_grad") else obj


def _module_tensors(module: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for method in ("named_parameters", "named_buffers"):
        fn = getattr(module, method)
        try:
            items = fn(remove_duplicate=False)  # keep tied names: each alias gets reported
        except TypeError:
            items = fn()
        out.extend((str(n), t) for n, t in items if t is not None)
    return out


def named_tensors(tensors: Any) -> list[tuple[str, Any]]:
    """``(name, tensor)`` pairs of a module, mapping, sequence or single tensor, in order."""
    if callable(getattr(tensors, "named_parameters", None)) and callable(
        getattr(tensors, "named_buffers", None)
    ):
        return _module_tensors(tensors)
    if isinstance(tensors, Mapping):
        items = list(tensors.items())
        if not all(isinstance(k, str) for k, _ in items):
            raise InvalidInput("tensor names must be strings")
        return items
    if isinstance(tensors, (list, tuple)):
        return [(str(i), t) for i, t in enumerate(tensors)]
    return [("tensor", tensors)]


def _default_name(tensors: Any) -> str:
    if callable(getattr(tensors, "named_parameters", None)):
        return type(tensors).__name__
    return "tensors"


# -- host adoption ----------------------------------------------------------------------------


def _host_view(obj: Any, what: str) -> memoryview:
    """The writable bytes of a CPU object, in place (buffer protocol, else DLPack through numpy)."""
    try:
        view = memoryview(obj)
    except TypeError:
        if not hasattr(obj, "__dlpack__"):
            raise InvalidInput(
                f"{what}: {type(obj).__name__} exposes neither the buffer protocol nor DLPack"
            ) from None
        device = obj.__dlpack_device__() if hasattr(obj, "__dlpack_device__") else (KDL_CPU, 0)
        if int(device[0]) != KDL_CPU:
            raise InvalidInput(
                f"{what}: the host emulation backend can only adopt CPU memory, not "
                f"{_DEVICE_NAMES.get(int(device[0]), device[0])} memory"
            ) from None
        import numpy as np

        try:
            arr: Any = np.from_dlpack(obj, copy=False)
            view = memoryview(arr)
        except (TypeError, BufferError, RuntimeError, ValueError) as exc:
            raise InvalidInput(f"{what}: cannot adopt through DLPack: {exc}") from None
    if not view.c_contiguous:
        raise InvalidInput(f"{what}: tensor is not contiguous; only contiguous tensors can be adopted")
    if view.readonly:
        # Device memory is writable; a read-only buffer cannot stand in for it (repair and the
        # fault-injection tools write to it).
        raise InvalidInput(f"{what}: read-only memory cannot be adopted")
    import numpy as np

    # The same memory as flat bytes, whatever the element format (frombuffer never copies).
    flat: Any = np.frombuffer(view, dtype=np.uint8)
    return memoryview(flat)


def _address(view: memoryview) -> int:
    import numpy as np

    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


# -- sealing ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Region:
    key: tuple[int, int, int]
    names: list[str]
    owners: list[object]
    nbytes: int
    acquire: Callable[[str], DeviceBuffer]


def _gpu_info(obj: Any, what: str) -> TensorInfo:
    if hasattr(obj, "__cuda_array_interface__"):
        try:
            return describe_cai(obj, what)
        except (AttributeError, RuntimeError, TypeError) as exc:  # e.g. a CPU tensor's property raising
            if not hasattr(obj, "__dlpack__"):
                raise InvalidInput(f"{what}: {exc}") from None
    if hasattr(obj, "__dlpack__"):
        return describe_dlpack(obj, what)
    raise PolicyViolation(
        f"{what}: {type(obj).__name__} is not device memory (no CUDA array interface or DLPack)"
    )


def _regions(store: ShardStore, named: Iterable[tuple[str, Any]]) -> list[_Region]:
    backend: Backend = store.backend
    caps = backend.capabilities
    device = store.device
    regions: dict[tuple[int, int, int], _Region] = {}
    for name, raw in named:
        obj = _detach(raw)
        what = f"tensor {name!r}"
        # Which memory can be adopted is declared by the backend: host memory on the emulation,
        # device pointers on a GPU backend.
        if caps.adopt_host:
            view = _host_view(obj, what)
            if not len(view):
                log.debug("not sealing %s: it has no bytes", what)
                continue
            key = (KDL_CPU, _address(view), len(view))
            acquire: Callable[[str], DeviceBuffer] = _host_acquire(backend, view)
        elif caps.adopt_pointer:
            info = _gpu_info(obj, what)
            if info.device_type != KDL_CUDA or info.device_id not in (-1, device):
                where = info.device_name + (f" {info.device_id}" if info.device_type == KDL_CUDA else "")
                raise PolicyViolation(f"{what} is in {where} memory, not VRAM of device {device}")
            if not info.nbytes:
                log.debug("not sealing %s: it has no bytes", what)
                continue
            # The VRAM-only policy (plain device memory of this GPU, not managed, not host) is
            # checked by adopt_pointer itself, before anything is sealed.
            key = (KDL_CUDA, info.ptr, info.nbytes)
            acquire = _gpu_acquire(backend, info)
        else:
            raise InvalidInput(f"the {backend.name} backend cannot adopt memory")
        region = regions.get(key)
        if region is None:
            regions[key] = _Region(key, [name], [raw], key[2], acquire)
        else:
            region.names.append(name)
            region.owners.append(raw)
    return list(regions.values())


def _host_acquire(backend: Backend, view: memoryview) -> Callable[[str], DeviceBuffer]:
    return lambda _shard_id: backend.adopt_host(view)


def _gpu_acquire(backend: Backend, info: TensorInfo) -> Callable[[str], DeviceBuffer]:
    return lambda _shard_id: backend.adopt_pointer(info.ptr, info.nbytes)


def seal_tensors(
    store: ShardStore,
    tensors: Any,
    *,
    device: int | None = None,
    model_name: str | None = None,
    digest_algorithm: str = SHA256_TREE_V1,
) -> SealedModel:
    check_algorithm(digest_algorithm, keyed=True)
    named = named_tensors(tensors)
    if not named:
        raise InvalidInput("no tensors to seal")
    if len(named) > store.max_tensors:
        # Each distinct region becomes a shard with its own seal and audit records: 100,000
        # tensors took 10 s to seal and made a 54 MB model record.
        raise InvalidInput(
            f"{len(named)} tensors: more than {store.max_tensors} tensors (max_tensors; "
            "VramManager(max_tensors=...) raises it)"
        )
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise InvalidInput("tensor names must be unique")
    try:
        regions = _regions(store, named)
    except PolicyViolation as exc:
        store.emit(POLICY_VIOLATION, critical=True, reason=str(exc), vram_bytes=0)
        raise
    if not regions:
        raise InvalidInput("every tensor is empty: nothing to seal")
    parts = [
        PartSource(
            name=r.names[0],
            size=r.nbytes,
            acquire=r.acquire,
            tensors=tuple(TensorSpan(n, 0, r.nbytes) for n in r.names),
            source=AdoptedSource(tuple(r.names), tuple(r.owners)),
        )
        for r in regions
    ]
    return seal_parts(
        store,
        parts,
        model_name=model_name or _default_name(tensors),
        digest_algorithm=digest_algorithm,
        device=device,
    )
