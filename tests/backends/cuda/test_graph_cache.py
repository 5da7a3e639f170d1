"""``_graphs.GraphCache``'s policy, without a GPU: which calls enqueue directly, which one
captures, which ones launch the graph; a failed capture falls back to direct enqueues for good;
the least recently used graph is closed beyond capacity; ``close`` closes the rest. Stand-in
stream, builder and graph objects record what was asked of them; nothing is launched."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from vram_residency.backends.cuda._graphs import GraphCache
from vram_residency.errors import IntegrityViolation


class _Graph:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def launch(self, stream: Any) -> None:
        self.log.append(f"launch {self.name} on {stream.name}")

    def close(self) -> None:
        self.log.append(f"close {self.name}")


class _Builder:
    def __init__(self, log: list[str], fail: str | None) -> None:
        self.log, self.fail = log, fail
        self.stream = _Stream(log, "capturing")
        self.is_building = False

    def begin_building(self, mode: str) -> _Builder:
        self.log.append(f"begin {mode}")
        if self.fail == "begin":
            raise RuntimeError("capture not supported")
        self.is_building = True
        return self

    def end_building(self) -> _Builder:
        self.log.append("end")
        self.is_building = False
        return self

    def complete(self) -> _Graph:
        if self.fail == "complete":
            raise RuntimeError("instantiate failed")
        return _Graph(self.log, f"g{sum(1 for e in self.log if e == 'end')}")

    def close(self) -> None:
        self.log.append("builder closed")


class _Stream:
    def __init__(self, log: list[str], name: str, fail: str | None = None) -> None:
        self.log, self.name, self.fail = log, name, fail

    def create_graph_builder(self) -> _Builder:
        self.builders = getattr(self, "builders", 0) + 1
        return _Builder(self.log, self.fail)


def _enqueue(log: list[str]) -> Any:
    def enqueue(stream: _Stream) -> None:
        log.append(f"enqueue on {stream.name}")

    return enqueue


def test_direct_until_seen_after_times_then_one_capture_then_launches() -> None:
    log: list[str] = []
    cache, s = GraphCache(after=2), _Stream(log, "s")
    ran = [cache.run("k", s, _enqueue(log)) for _ in range(5)]
    assert ran == [False, False, True, True, True]
    assert log == [
        "enqueue on s",
        "enqueue on s",
        "begin relaxed",
        "enqueue on capturing",
        "end",
        "builder closed",
        "launch g1 on s",
        "launch g1 on s",
        "launch g1 on s",
    ]
    assert (cache.captured, cache.launched, len(cache)) == (1, 3, 1)


@pytest.mark.parametrize("fail", ["begin", "complete"])
def test_a_failed_capture_falls_back_to_direct_enqueues_for_good(fail: str) -> None:
    log: list[str] = []
    cache, s = GraphCache(after=1), _Stream(log, "s", fail=fail)
    assert [cache.run("k", s, _enqueue(log)) for _ in range(4)] == [False] * 4
    assert log.count("enqueue on s") == 4
    assert log.count("builder closed") == 1  # one attempt, never again for this key
    assert "end" in log or fail == "begin"
    assert (cache.captured, cache.launched, len(cache)) == (0, 0, 0)


def test_an_error_of_the_work_itself_propagates_and_leaves_no_capture_open() -> None:
    log: list[str] = []
    cache, s = GraphCache(after=0), _Stream(log, "s")

    def enqueue(stream: _Stream) -> None:
        log.append(f"enqueue on {stream.name}")
        raise ValueError("bad row")

    with pytest.raises(ValueError, match="bad row"):
        cache.run("k", s, enqueue)
    # The capture was ended and its builder closed before the direct enqueue raised again.
    assert log == ["begin relaxed", "enqueue on capturing", "end", "builder closed", "enqueue on s"]


def test_least_recently_used_graph_is_closed_beyond_capacity_and_close_closes_the_rest() -> None:
    log: list[str] = []
    cache, s = GraphCache(capacity=2, after=0), _Stream(log, "s")
    for key in ("a", "b", "a", "c"):
        cache.run(key, s, _enqueue(log))
    assert "close g1" not in log and "close g2" in log  # b was the least recently used
    assert len(cache) == 2
    cache.close()
    assert log[-2:] == ["close g1", "close g3"] and len(cache) == 0


def test_invalidate_closes_every_graph_and_forgets_every_key() -> None:
    # The owner frees memory the graphs name (a grown scratch, result or stage buffer) and the new
    # allocation may come back at the same address: the same key must then capture anew.
    log: list[str] = []
    cache, s = GraphCache(after=1), _Stream(log, "s")
    for key in ("a", "a", "b", "b"):
        cache.run(key, s, _enqueue(log))
    failing = _Stream(log, "f", fail="begin")
    cache.run("c", failing, _enqueue(log))
    cache.run("c", failing, _enqueue(log))  # capture fails: "c" is never captured again
    assert (cache.captured, len(cache), cache.invalidated) == (2, 2, 0)
    log.clear()
    cache.invalidate()
    assert sorted(log) == ["close g1", "close g2"] and len(cache) == 0 and cache.invalidated == 1
    log.clear()
    # Seen anew: one direct call (after=1), then a new capture and its launch.
    assert [cache.run("a", s, _enqueue(log)) for _ in range(3)] == [False, True, True]
    assert log[:3] == ["enqueue on s", "begin relaxed", "enqueue on capturing"]
    assert cache.captured == 3 and len(cache) == 1
    # A key whose capture had failed is tried again (once more, failing again here).
    log.clear()
    cache.run("c", failing, _enqueue(log))
    cache.run("c", failing, _enqueue(log))
    assert log.count("begin relaxed") == 1
    log.clear()
    cache.invalidate()  # and again: no graph of the old allocation is ever launched
    assert cache.invalidated == 2 and log == ["close g1"] and len(cache) == 0


def test_a_capture_stream_of_its_own_captures_and_the_run_stream_launches() -> None:
    # The compute lane's cache captures on a stream nothing else queues on (other threads zero
    # allocations on the run stream), and launches the graph on the run stream.
    log: list[str] = []
    capture = _Stream(log, "capture")
    cache, s = GraphCache(after=0, capture_stream=capture), _Stream(log, "s")
    assert cache.run("k", s, _enqueue(log)) is True
    assert cache.run("k", s, _enqueue(log)) is True
    assert log == [
        "begin relaxed",
        "enqueue on capturing",
        "end",
        "builder closed",
        "launch g1 on s",
        "launch g1 on s",
    ]
    assert capture.builders == 1 and not hasattr(s, "builders")


def test_a_key_evicted_again_and_again_waits_twice_as_long_before_each_capture() -> None:
    """A round robin over more keys than the cache holds: each eviction doubles the sightings a
    key needs before its next capture (2, then 5, then 11 with after=2), so captures die out
    instead of costing one every few calls."""
    log: list[str] = []
    cache, s = GraphCache(capacity=2, after=2), _Stream(log, "s")
    captures: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    for rnd in range(40):
        for key in ("a", "b", "c"):
            before = cache.captured
            cache.run(key, s, _enqueue(log))
            if cache.captured > before:
                captures[key].append(rnd)
    # Round 2: first captures. Each later capture of a key follows an eviction, needing 5, 11,
    # 23 direct calls (the evicted count of 1, 2, 3) after the eviction: gaps grow.
    for rounds in captures.values():
        assert rounds[0] == 2
        gaps = [b - a for a, b in itertools.pairwise(rounds)]
        assert gaps == sorted(gaps) and len(rounds) <= 5
    assert sum(map(len, captures.values())) < 15  # without the backoff: one per key every 3 rounds
    assert len(cache) == 2


def test_eviction_counts_are_forgotten_on_invalidate() -> None:
    # (Formerly on close; a closed cache now captures nothing at all, see below.)
    log: list[str] = []
    cache, s = GraphCache(capacity=1, after=0), _Stream(log, "s")
    for key in ("a", "b", "a"):
        cache.run(key, s, _enqueue(log))
    cache.invalidate()
    assert cache.run("a", s, _enqueue(log))  # captured at once again: after=0, no backoff


class _FailingGraph(_Graph):
    def launch(self, stream: Any) -> None:
        self.log.append(f"launch {self.name} on {stream.name} failed")
        raise IntegrityViolation("launching a CUDA graph failed: CUDA_ERROR_UNKNOWN")


def test_a_failed_launch_queues_the_work_directly_and_the_key_is_not_captured_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A launch that returns an error queued nothing (seen once on an H200 beside another thread's
    # allocations): the same work queued directly gives the digest; the graph is closed.
    log: list[str] = []
    monkeypatch.setattr(_Builder, "complete", lambda self: _FailingGraph(self.log, "g1"))
    cache, s = GraphCache(after=0), _Stream(log, "s")
    with caplog.at_level("WARNING", logger="vram_residency.backends.cuda._graphs"):
        assert [cache.run("k", s, _enqueue(log)) for _ in range(3)] == [False] * 3
    assert log == [
        "begin relaxed",
        "enqueue on capturing",
        "end",
        "builder closed",
        "launch g1 on s failed",
        "close g1",
        "enqueue on s",
        "enqueue on s",  # never captured again
        "enqueue on s",
    ]
    assert (cache.captured, cache.launched, cache.launch_failed, len(cache)) == (1, 0, 1, 0)
    assert "CUDA_ERROR_UNKNOWN" in caplog.text


def test_a_failed_launch_whose_direct_work_fails_too_raises_that_error() -> None:
    # A broken context fails the direct work as well; its error reaches the caller.
    log: list[str] = []
    cache, s = GraphCache(after=0), _Stream(log, "s")

    def enqueue(stream: _Stream) -> None:
        log.append(f"enqueue on {stream.name}")
        if stream.name == "s":
            raise IntegrityViolation("context is broken")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_Builder, "complete", lambda self: _FailingGraph(self.log, "g1"))
        with pytest.raises(IntegrityViolation, match="context is broken"):
            cache.run("k", s, enqueue)
    assert cache.launch_failed == 1


class _Gate:
    """A context manager that logs when it is taken and given back."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __enter__(self) -> None:
        self.log.append("gate taken")

    def __exit__(self, *exc: object) -> None:
        self.log.append("gate given back")


def test_the_gate_is_held_from_the_start_of_a_capture_to_the_instantiated_graph() -> None:
    # The gate (_core.capture_gate) keeps the process's own cuMemAlloc and cuMemFree out of
    # the capture window; launches and direct enqueues do not take it.
    log: list[str] = []
    cache, s = GraphCache(after=1, gate=_Gate(log)), _Stream(log, "s")
    for _ in range(3):
        cache.run("k", s, _enqueue(log))
    assert log == [
        "enqueue on s",
        "gate taken",
        "begin relaxed",
        "enqueue on capturing",
        "end",
        "builder closed",
        "gate given back",
        "launch g1 on s",
        "launch g1 on s",
    ]


def test_a_closed_cache_captures_nothing_and_queues_the_work_directly() -> None:
    # A lane closed while one of its users waited for the lane's lock: a graph captured after
    # close() would be closed by nobody and would name the lane's freed memory and the
    # backend's unloaded kernel modules.
    log: list[str] = []
    cache, s = GraphCache(after=1), _Stream(log, "s")
    for _ in range(3):
        cache.run("k", s, _enqueue(log))
    cache.close()
    log.clear()
    ran = [cache.run(k, s, _enqueue(log)) for k in ("k", "k", "k", "new", "new", "new")]
    assert ran == [False] * 6
    assert log == ["enqueue on s"] * 6
    assert len(cache) == 0 and cache.captured == 1


def test_a_cache_closed_while_a_capture_runs_keeps_no_graph() -> None:
    # close() takes only the cache's own lock: a capture in progress on the owner's thread
    # finishes after it, and its graph must be closed rather than kept.
    log: list[str] = []
    cache, s = GraphCache(after=0), _Stream(log, "s")

    def enqueue(stream: _Stream) -> None:
        log.append(f"enqueue on {stream.name}")
        if stream.name == "capturing":
            cache.close()

    assert cache.run("k", s, enqueue) is False
    assert log == [
        "begin relaxed",
        "enqueue on capturing",
        "end",
        "builder closed",
        "close g1",
        "enqueue on s",
    ]
    assert len(cache) == 0 and cache.captured == 0
