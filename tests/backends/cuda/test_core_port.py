"""The CUDA backend is built on NVIDIA's cuda.core (issue 10, item 3), checked without a GPU.

Every module of the backend imports, and the modules that do device work import cuda.core (through
``_core``) rather than talking to the driver alone. The AST walk reads the real source files; the
imports below load the real modules (cuda.core and cuda-bindings are installed here, only the
driver is missing).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

from vram_residency.backends import cuda as cuda_pkg
from vram_residency.errors import (
    ConfigError,
    CudaAllocationFailed,
    IntegrityViolation,
    InvalidInput,
)

_DIR = Path(cuda_pkg.__file__).parent
_MODULES = sorted(m.name for m in pkgutil.iter_modules([str(_DIR)]))


def _imports(module: str) -> set[str]:
    """Every module name ``module``'s source imports, at any depth (lazy imports included)."""
    tree = ast.parse((_DIR / f"{module}.py").read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("name", _MODULES)
def test_every_backend_module_imports(name: str) -> None:
    mod = importlib.import_module(f"vram_residency.backends.cuda.{name}")
    assert mod.__name__.endswith(name)


def test_the_module_list_is_what_the_port_covers() -> None:
    # A new module must be placed in one of the lists below (device work or not).
    assert set(_MODULES) == {
        "_backend",
        "_batch",
        "_compile",
        "_core",
        "_driver",
        "_graphs",
        "_kcache",
        "_kernels",
        "_nh_fast",
        "_staging",
        "_vmm",
    }


#: The modules that do device work: streams, events, launches and pinned memory through cuda.core.
_DEVICE_MODULES = ("_backend", "_graphs", "_kernels", "_nh_fast", "_staging", "_vmm")


def test_core_module_imports_cuda_core() -> None:
    assert "cuda.core" in _imports("_core")


@pytest.mark.parametrize("name", _DEVICE_MODULES)
def test_device_modules_go_through_cuda_core(name: str) -> None:
    # Streams, events, launches, modules and pinned memory come from cuda.core via _core.
    assert "vram_residency.backends.cuda._core" in _imports(name)


def test_compile_goes_through_cuda_core_program() -> None:
    assert "cuda.core.Program" in _imports("_compile")
    assert "cuda.core.ProgramOptions" in _imports("_compile")


@pytest.mark.parametrize(
    "name",
    [
        "cuStreamCreate",
        "cuStreamCreateWithPriority",
        "cuEventCreate",
        "cuEventRecord",
        "cuEventQuery",
        "cuEventSynchronize",
        "cuStreamSynchronize",
        "cuStreamWaitEvent",
        "cuLaunchKernel",
        "cuModuleLoadData",
        "cuModuleGetFunction",
        "cuMemHostAlloc",
        "cuDevicePrimaryCtxRetain",
        "cuCtxSetCurrent",
        "cuOccupancyMaxActiveBlocksPerMultiprocessor",
    ],
)
def test_no_driver_call_that_cuda_core_covers(name: str) -> None:
    # These are cuda.core's now; only _core's exact memory resource and the calls cuda.core has no
    # API for (pointer attributes, range copies, peer access, memory info) stay on cuda-bindings.
    for module in (*_DEVICE_MODULES, "_core"):
        source = (_DIR / f"{module}.py").read_text(encoding="utf-8")
        if module == "_core" and name == "cuDevicePrimaryCtxRetain":
            # The one exception: _PrimaryContextWarmup creates the primary context while cuda.core
            # is still being imported, so cuda.core cannot do it; cuda.core's own set_current then
            # retains the same context, and the warm-up's retain is released.
            source = source.replace("drv.cuDevicePrimaryCtxRetain(cudev)", "", 1)
        assert f"drv.{name}(" not in source and f"driver().{name}(" not in source, (module, name)


def _async_driver_calls_without_a_stream_handle(source: str) -> list[str]:
    """Every cuda-bindings ``cu...Async(...)`` call in ``source`` whose stream (the last argument)
    is neither ``<x>.handle`` nor a name the same function assigned from ``<x>.handle``: a
    cuda.core ``Stream`` object given to the driver where it wants a ``CUstream``."""
    tree = ast.parse(source)
    bad: list[str] = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        handles = {
            t.id
            for node in ast.walk(fn)
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "handle"
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        for node in ast.walk(fn):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name = node.func.attr
            if not (name.startswith("cu") and name.endswith("Async")) or not node.args:
                continue
            last = node.args[-1]
            ok = (isinstance(last, ast.Attribute) and last.attr == "handle") or (
                isinstance(last, ast.Name) and last.id in handles
            )
            if not ok:
                bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    return bad


@pytest.mark.parametrize("name", [*_DEVICE_MODULES, "_core"])
def test_driver_copies_get_the_streams_handle(name: str) -> None:
    # cuda-bindings copies and memsets stay (byte ranges at offsets); their stream must be the
    # cuda.core Stream's CUstream handle, which is what the nh-fast launcher got wrong at first.
    source = (_DIR / f"{name}.py").read_text(encoding="utf-8")
    assert _async_driver_calls_without_a_stream_handle(source) == [], name


def test_the_stream_handle_check_catches_a_stream_object() -> None:
    # Known answers for the walk above, so that it cannot pass by finding no calls: the code
    # _nh_fast.py had before the port is caught, and the ported forms pass.
    source = (
        "def f(drv, s, host, dev, n):\n"
        "    h = s.handle\n"
        "    drv.cuMemcpyDtoHAsync(host, dev, n, h)\n"
        "    drv.cuMemcpyDtoHAsync(host, dev, n, s.handle)\n"
        "    drv.cuMemcpyDtoHAsync(host, dev, n, s)\n"
        "    check(driver().cuMemcpyHtoDAsync(dev, host, n, backend._stream), 'x')\n"
    )
    assert _async_driver_calls_without_a_stream_handle(source) == [
        "line 5: drv.cuMemcpyDtoHAsync(host, dev, n, s)",
        "line 6: driver().cuMemcpyHtoDAsync(dev, host, n, backend._stream)",
    ]
    # And the real modules have such calls to check.
    ported = (_DIR / "_nh_fast.py").read_text(encoding="utf-8")
    assert ported.count("Async(") >= 3


def test_cuda_core_is_the_installed_one() -> None:
    core = importlib.import_module("cuda.core")
    for attr in (
        "Device",
        "Stream",
        "StreamOptions",
        "Event",
        "EventOptions",
        "ObjectCode",
        "Program",
        "ProgramOptions",
        "LaunchConfig",
        "launch",
        "LegacyPinnedMemoryResource",
        "MemoryResource",
        "Buffer",
    ):
        assert hasattr(core, attr), attr


def test_exact_resource_is_a_cuda_core_memory_resource() -> None:
    from vram_residency.backends.cuda import _core

    core = _core.core()
    cls = _core.exact_resource_class()
    assert issubclass(cls, core.MemoryResource)
    assert cls.__name__ == "ExactDeviceMemoryResource"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("CUDA_ERROR_OUT_OF_MEMORY: out of memory", CudaAllocationFailed),
        ("CUDA_ERROR_INVALID_VALUE: invalid argument", InvalidInput),
        ("CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected", ConfigError),
        ("CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered", IntegrityViolation),
        ("CUDA_ERROR_LAUNCH_FAILED: unspecified launch failure", IntegrityViolation),
        ("something unexpected", IntegrityViolation),
    ],
)
def test_cuda_core_errors_map_like_driver_results(message: str, expected: type[Exception]) -> None:
    from cuda.core._utils.cuda_utils import CUDAError

    from vram_residency.backends.cuda._core import core_errors

    with pytest.raises(expected) as info, core_errors("the operation"):
        raise CUDAError(message)
    assert str(info.value).startswith("the operation failed: ")
    assert type(info.value) is expected


def test_core_errors_leave_other_exceptions_alone() -> None:
    from vram_residency.backends.cuda._core import core_errors

    with pytest.raises(KeyError), core_errors("x"):
        raise KeyError("k")


def test_exact_resource_implements_the_whole_interface() -> None:
    # Instantiable (no abstract member left) without touching the driver; the properties are ours.
    from vram_residency.backends.cuda import _core

    class _Dev:
        device_id = 3

    mr = _core.exact_resource(_Dev(), None, zero=True)
    assert mr.is_device_accessible is True
    assert mr.is_host_accessible is False
    assert mr.device_id == 3


def test_capture_gate_is_one_reentrant_lock_per_device() -> None:
    from vram_residency.backends.cuda import _core

    gate = _core.capture_gate(5)
    assert _core.capture_gate(5) is gate and _core.capture_gate(6) is not gate
    with gate, gate:  # reentrant: the capturing thread's own work is not blocked by it
        pass


def test_exact_resource_allocates_and_frees_under_the_capture_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    # cuMemAlloc and cuMemFree (calls CUDA calls potentially unsafe beside a capture) run only
    # with the device's capture gate held, so none falls inside this process's graph captures.
    from vram_residency.backends.cuda import _core

    gate = _core.capture_gate(7)
    calls: list[tuple[str, bool]] = []

    class _Result:
        CUDA_SUCCESS = 0

    class _Drv:
        CUresult = _Result

        def cuMemAlloc(self, size: int) -> tuple[int, int]:
            calls.append(("cuMemAlloc", gate._is_owned()))  # type: ignore[attr-defined]
            return 0, 0x1000

        def cuMemFree(self, ptr: int) -> tuple[int]:
            calls.append(("cuMemFree", gate._is_owned()))  # type: ignore[attr-defined]
            return (0,)

    class _Dev:
        device_id = 7

        def set_current(self) -> None:
            pass

    mr = _core.exact_resource(_Dev(), None, zero=False)
    monkeypatch.setattr(_core, "driver", lambda: _Drv())

    class _NoBuffers:  # wrapping the pointer fails: the allocation is freed again, under the gate
        class Buffer:
            @staticmethod
            def from_handle(*args: object, **kwargs: object) -> None:
                raise RuntimeError("no driver here")

    monkeypatch.setattr(_core, "core", lambda: _NoBuffers)
    with pytest.raises(RuntimeError, match="no driver here"):
        mr.allocate(4096)
    mr.deallocate(0x2000, 0)  # what cuda.core calls when a Buffer is closed
    assert calls == [("cuMemAlloc", True), ("cuMemFree", True), ("cuMemFree", True)]
    assert not gate._is_owned()  # type: ignore[attr-defined]
