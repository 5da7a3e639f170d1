"""CUDA graphs of repeated digest calls, through cuda.core's ``GraphBuilder`` and ``Graph``.

A verify of the same shard (or the same table of shards) enqueues the same work every time:
per row a key upload from a fixed pinned stage, a leaf kernel, a unit kernel or the device
finish, and a copy back, all at the same addresses. Each of those calls costs the host 4-15 us
through cuda.core and cuda-bindings on the H200's host (2026-11-30, checkpointed: the leaf kernel
started ~50 us into a 1 GiB nh-fast verify). Captured once into a graph, the whole sequence is
one launch.

When a graph is used: a key (everything the captured work depends on: addresses, sizes, the
lane's buffers) must have been seen ``after`` times before, so that a one-off call (a seal, a
first verify) never pays for a capture and an instantiation (hundreds of microseconds). What the
captured work reads at launch time, it reads then: the data, and the pinned stage that the
caller rewrites before each launch. Nothing is read at capture time.

A key whose graph was closed to make room (more keys in use than ``capacity``: a verify loop
over many shards) needs twice as many sightings before each new capture (``after``, then
``2 after + 1``, ...): a round robin over more keys than the cache holds would otherwise pay a
capture (hundreds of microseconds) every few calls per key to save ~10-20 us per call, and with
the backoff its captures die out geometrically (the count is kept for ``16 x capacity`` keys).

Any failure to capture or instantiate is not an error of the digest: the work is enqueued
directly, as without a graph, and that key is never captured again (a driver or cuda.core that
cannot capture costs one failed attempt per key, not a failure). The same holds for a graph
whose launch fails: a launch that returns an error has queued nothing, so the work is queued
directly instead; if the context itself is broken, that fails too and its error is raised. A
``gate`` (``_core.capture_gate``) keeps the process's own allocations and frees out of the
capture window, which makes such failed launches rarer (not rarer still with the launches
gated too: see ``_core.capture_gate``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from typing import Any, Final

from vram_residency.backends.cuda._core import core_errors
from vram_residency.errors import VramError

__all__ = ["GraphCache"]

log = logging.getLogger(__name__)

_FAILED: Final = object()


class GraphCache:
    """Executable graphs of one lane (one stream, used under the lane's lock), by key.

    :meth:`run` enqueues ``enqueue``'s work on ``stream``: directly while the key is new, as a
    launch of the key's graph once the key has come ``after`` times. ``capacity`` graphs are
    kept, the least recently used one closed first. ``capture_stream``: a stream used only for
    capturing (under the lane's lock), for a lane whose run stream other threads queue on too;
    it should have the run stream's priority, which captured kernel nodes keep. :meth:`close`
    closes the graphs (before the context and the kernel modules they name go away); the owner
    closes its capture stream."""

    def __init__(
        self,
        capacity: int = 16,
        after: int = 2,
        *,
        capture_stream: Any = None,
        gate: AbstractContextManager[Any] | None = None,
    ) -> None:
        self._capacity = max(1, int(capacity))
        #: Held from the start of a capture to its instantiated graph (``_core.capture_gate``).
        self._gate: AbstractContextManager[Any] = gate if gate is not None else contextlib.nullcontext()
        #: Where graphs are captured: a stream used for nothing else (see :meth:`_capture`), or
        #: None to capture on the stream the work is run on.
        self._capture_stream = capture_stream
        self._after = max(0, int(after))
        self._graphs: OrderedDict[Hashable, Any] = OrderedDict()
        self._seen: OrderedDict[Hashable, int] = OrderedDict()
        # Keys whose graph was evicted, and how often: their next capture waits longer.
        self._evicted: OrderedDict[Hashable, int] = OrderedDict()
        # The lane's lock serializes runs; this one only guards the tables against close().
        self._lock = threading.Lock()
        self.captured = 0  # graphs built (for tests and benchmarks)
        self.launched = 0  # runs that were one graph launch
        self.launch_failed = 0  # graph launches that failed, their work then queued directly
        self.invalidated = 0  # invalidate() calls: memory the graphs named was about to be freed
        #: Set by close(): no graph is captured any more (see :meth:`run`).
        self._closed = False

    def __len__(self) -> int:
        return sum(1 for g in self._graphs.values() if g is not _FAILED)

    def run(self, key: Hashable, stream: Any, enqueue: Callable[[Any], None]) -> bool:
        """Enqueue the work of ``enqueue(s)`` (which queues everything on ``s``, a cuda.core
        ``Stream``) on ``stream``; True when it ran as a graph launch. ``enqueue`` may be called
        on a capturing stream: it must only enqueue work (no synchronization, no reads of
        results), and it runs on every call that is not a graph launch."""
        seen, after = 0, self._after
        with self._lock:
            closed = self._closed
            graph = None if closed else self._graphs.get(key)
            if graph is not None:
                self._graphs.move_to_end(key)
            elif not closed:
                seen = self._seen.pop(key, 0) + 1
                self._seen[key] = seen
                while len(self._seen) > 4 * self._capacity:
                    self._seen.popitem(last=False)
                evictions = self._evicted.get(key, 0)
                if evictions:
                    after = (after + 1) * (1 << min(evictions, 16)) - 1
        if closed or graph is _FAILED or (graph is None and seen <= after):
            # Closed (its lane or backend is closing): a graph captured now would be closed by
            # nobody and would name memory and kernel modules freed right after; queued directly.
            enqueue(stream)
            return False
        if graph is None:
            graph = self._capture(key, stream, enqueue)
            if graph is None:
                enqueue(stream)
                return False
        try:
            # Not under the gate: on an H200 (2026-11-30) first launches beside another thread's
            # allocations failed no less often with the launches gated too (45 in 80,760; 17 in
            # 24,120) than with the captures alone gated (16 in 78,120). Lock order: the lane's
            # lock, then the gate; whoever holds the gate takes no other lock.
            with core_errors("launching a CUDA graph"):
                graph.launch(stream)
        except VramError as exc:
            # An error returned by the launch means nothing was queued; the same work queued
            # directly gives the digest (or fails with the context's own error, which is raised).
            log.warning("a CUDA graph launch failed, enqueuing directly (not captured again): %s", exc)
            with self._lock:
                if self._graphs.get(key) is graph:
                    self._graphs[key] = _FAILED
            _close(graph)
            self.launch_failed += 1
            enqueue(stream)
            return False
        self.launched += 1
        return True

    def _capture(self, key: Hashable, stream: Any, enqueue: Callable[[Any], None]) -> Any:
        """The executable graph of ``enqueue``'s work, kept under ``key``; None (and the key
        marked never to capture again) when capturing or instantiating failed."""
        with self._gate:
            graph = self._build(stream, enqueue)
        with self._lock:
            if self._closed:
                # Closed while this capture ran (close() does not wait for the owner's lock):
                # the graph is not kept, and this run queues its work directly.
                _close(graph)
                return None
            self._graphs[key] = graph if graph is not None else _FAILED
            self._seen.pop(key, None)
            while len(self._graphs) > self._capacity:
                gone, old = self._graphs.popitem(last=False)
                _close(old)
                if old is not _FAILED:
                    self._evicted[gone] = self._evicted.pop(gone, 0) + 1
                    while len(self._evicted) > 16 * self._capacity:
                        self._evicted.popitem(last=False)
        if graph is not None:
            self.captured += 1
        return graph

    def _build(self, stream: Any, enqueue: Callable[[Any], None]) -> Any:
        """Capture and instantiate ``enqueue``'s work; None when either failed."""
        graph: Any = None
        builder: Any = None
        try:
            # Capturing on a stream that other threads also queue on would take their work into
            # the graph, and their synchronization would fail the capture (the compute stream
            # zeroes allocations and frees outside the lane's lock: a free would go unzeroed).
            # So the owner gives a stream of its own when its run stream is shared; the graph
            # then launches on the run stream like any other work.
            source = stream if self._capture_stream is None else self._capture_stream
            builder = source.create_graph_builder()
            # "relaxed": other threads (the other lane, an engine) may call CUDA meanwhile.
            builder.begin_building("relaxed")
            try:
                enqueue(builder.stream)
            finally:
                if builder.is_building:
                    builder.end_building()
            graph = builder.complete()
        except Exception as exc:  # any failure: the work is enqueued directly instead
            log.debug("CUDA graph capture failed, enqueuing directly: %s", exc)
            graph = None
        finally:
            if builder is not None:
                with contextlib.suppress(Exception):
                    builder.close()
        return graph

    def invalidate(self) -> None:
        """Close every graph and forget every key: the owner calls this before it frees memory
        that graphs of this cache may name (a scratch, result or stage buffer it grows). A key
        holds addresses, but a new allocation can come back at a freed one's address (a grown
        scratch did, from cuMemAlloc, on an H200) and then matches the old key, while the graph
        captured with it still refers to the freed allocation: CUDA requires the memory a graph
        uses to outlive it. On an H200 (2026-11-30) such a stale graph's launch crashed the
        process (SIGSEGV) or failed the context with CUDA_ERROR_LAUNCH_FAILED: a verify of a
        small shard after a larger one had grown the scratch. Keys that had failed to capture
        may be tried again. A graph still running when it is closed is freed when it completes
        (cuGraphExecDestroy)."""
        with self._lock:
            graphs = list(self._graphs.values())
            self._graphs.clear()
            self._seen.clear()
            self._evicted.clear()
            self.invalidated += 1
        for g in graphs:
            _close(g)

    def close(self) -> None:
        """Close every graph (idempotent; errors are not reported: teardown). Later runs queue
        their work directly and capture nothing."""
        with self._lock:
            self._closed = True
            graphs = list(self._graphs.values())
            self._graphs.clear()
            self._seen.clear()
            self._evicted.clear()
        for g in graphs:
            _close(g)


def _close(graph: Any) -> None:
    if graph is not _FAILED and graph is not None:
        with contextlib.suppress(Exception):
            graph.close()
