"""``CudaBackend._table_kernels`` without a GPU: the first call for a set of algorithms loads under
the backend's lock; later calls return the same kernels without taking it, so that a background
table does not wait behind a foreground verify holding it. The backend is made without its
constructor; its module loading is a stand-in that records what was loaded."""

from __future__ import annotations

import threading
from typing import Any

from vram_residency.backends.cuda._backend import CudaBackend
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1


class _Module:
    def __init__(self, source: str, loads: list[str]) -> None:
        self.source, self.loads = source, loads

    def function(self, name: str) -> str:
        self.loads.append(name)
        return f"{self.source}:{name}"


def _backend(loads: list[str]) -> Any:
    b: Any = CudaBackend.__new__(CudaBackend)
    b._lock = threading.RLock()
    b._table_fns = {}
    b._activate = lambda: None
    b._source_module = lambda source: _Module(source, loads)
    b._blocks_per_sm = lambda mod, name, threads=256: 4
    return b


def test_loaded_once_then_read_without_the_lock() -> None:
    loads: list[str] = []
    b = _backend(loads)
    first = b._table_kernels({BLAKE3, SHA256_TREE_V1})
    assert first and loads
    n = len(loads)
    got: list[object] = []
    with b._lock:  # a foreground verify holds the backend's lock
        t = threading.Thread(target=lambda: got.append(b._table_kernels(frozenset({SHA256_TREE_V1, BLAKE3}))))
        t.start()
        t.join(10)
        assert not t.is_alive(), "a loaded set waited for the backend's lock"
    assert got == [first] and len(loads) == n  # nothing loaded again
    only = b._table_kernels({BLAKE3})  # another set is loaded on its own
    assert only and set(only) <= set(first) and len(loads) > n
