"""The scrubber: a background thread that verifies every shard, within a wall-time budget.

A failure stops the worker with a security incident (the worker's ``scrub_once`` reports it to
the lifecycle); the thread then ends, since a Stopped worker has nothing left to protect.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from vram_residency.errors import VramError

__all__ = ["Scrubber", "scrub_delay"]

log = logging.getLogger("vram_residency.service")


class _Pass(Protocol):
    @property
    def seconds(self) -> float: ...


def scrub_delay(spent: float, interval: float, budget: float) -> float:
    """Rest after a scrub pass of ``spent`` seconds: at least ``interval``, and long enough that
    verification takes at most ``budget`` of wall time (spent / (spent + rest) <= budget)."""
    return max(interval, spent * (1.0 / budget - 1.0))


class Scrubber:
    """Calls ``scrub_once`` every ``interval`` seconds (or less often, to stay within ``budget``)."""

    def __init__(self, scrub_once: Callable[[], _Pass | None], interval: float, budget: float) -> None:
        self._scrub_once = scrub_once
        self._interval = interval
        self._budget = budget
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vram-scrub", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        delay = self._interval
        while not self._stop.wait(delay):
            try:
                result = self._scrub_once()
            except VramError:
                return  # the worker is Stopped; the incident is raised and audited
            except Exception:
                log.exception("scrub pass failed unexpectedly")
                result = None
            delay = scrub_delay(result.seconds if result is not None else 0.0, self._interval, self._budget)

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)
