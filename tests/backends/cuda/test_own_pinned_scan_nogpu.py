"""``CudaBackend._is_pinned`` scans the backend's own pinned buffers (a ``weakref.WeakSet``
that ``pinned_host_buffer`` adds to, on any thread, without the backend's lock) before it asks
the driver. A WeakSet is iterated by a Python generator, so another thread may add a buffer
between two steps of the scan; the scan must not fail with "Set changed size during
iteration" (a seal or write of pinned bytes raising RuntimeError because another thread was
allocating a pinned buffer).

No GPU: the method runs on a stand-in backend (only ``_own_pinned``) with stand-in pinned
buffers (``address``, ``size``, ``closed``), one of which covers the address asked, so the scan
answers before any driver call. Each stand-in's ``closed`` adds another buffer to the set, as
the other thread's ``pinned_host_buffer`` would at that moment of the scan. (The fix scans a
snapshot taken under a lock that ``pinned_host_buffer`` takes to add: this test shows the
snapshot; the lock closes the window of the snapshot itself.)"""

from __future__ import annotations

import threading
import weakref
from types import SimpleNamespace

from vram_residency.backends.cuda._backend import CudaBackend


class _Pinned:
    """Test double of a PinnedHostBuffer: an address range, open."""

    def __init__(self, owner: weakref.WeakSet[_Pinned], address: int, size: int) -> None:
        self._owner = owner
        self.address = address
        self.size = size

    @property
    def closed(self) -> bool:
        # Another thread's pinned_host_buffer() adds to the set at this point of the scan.
        other = _Pinned(self._owner, 1 << 50, 4096)
        keep.append(other)  # alive, as the other thread's buffer is
        self._owner.add(other)
        return False


keep: list[object] = []


def test_a_buffer_added_during_the_scan_does_not_break_it() -> None:
    own: weakref.WeakSet[_Pinned] = weakref.WeakSet()
    items = [_Pinned(own, (i + 1) << 32, 1 << 20) for i in range(8)]
    for p in items:
        own.add(p)
    backend = SimpleNamespace(_own_pinned=own, _own_pinned_lock=threading.Lock())
    for p in items:
        assert CudaBackend._is_pinned(backend, p.address + 4096, 4096)  # type: ignore[arg-type]
    keep.clear()
