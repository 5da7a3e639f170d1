"""The low lane's wait mode (``_backend.LOW_WAIT``) is decided once, when the lane is built: its
``done`` event is created for it (blocking synchronization for "block"). Found in review: the mode
used to be read again at each wait, so a lane built under "poll" and waiting under "block" called
Event.sync on an event without blocking synchronization, a busy-wait holding a CPU core for the
whole scrub pass. Stand-in device and events record the options they were created with and what
was called; nothing runs on a GPU."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from vram_residency.backends.cuda import _backend


class _Event:
    def __init__(self, options: Any) -> None:
        self.blocking_sync = bool(options.blocking_sync)
        self.calls: list[str] = []

    @property
    def is_done(self) -> bool:
        self.calls.append("query")
        return True

    def sync(self) -> None:
        self.calls.append("sync (blocking)" if self.blocking_sync else "sync (spinning)")


class _Stream:
    def record(self, event: Any = None, options: Any = None) -> Any:
        return event


class _Dev:
    def create_event(self, options: Any) -> _Event:
        return _Event(options)

    def create_stream(self, options: Any = None) -> _Stream:
        return _Stream()


def _lane() -> Any:
    backend = SimpleNamespace(_dev=_Dev(), _stream=_Stream(), _lock=None, _graphs=None, _capture_gate=None)
    return _backend._Lane(backend, low=True)  # type: ignore[arg-type]


def test_a_lane_built_under_poll_never_spins_when_the_mode_turns_to_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_backend, "LOW_WAIT", "poll")
    lane = _lane()
    monkeypatch.setattr(_backend, "LOW_WAIT", "block")
    lane._wait()
    assert "sync (spinning)" not in lane.done.calls
    assert lane.done.calls == ["query"]  # the poll it was built for


def test_a_lane_built_under_block_waits_in_a_blocking_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_backend, "LOW_WAIT", "block")
    lane = _lane()
    lane._wait()
    assert lane.done.calls == ["sync (blocking)"]
