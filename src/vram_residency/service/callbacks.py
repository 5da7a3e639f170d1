"""Callbacks to the pool manager (llama-orch's ``readiness_callback_url``).

* After a successful commit: ``{"event": "ready", "worker_id", "pool_id", "ready": true,
  "handles": [...], "url"}``.
* When the worker stops (an orderly shutdown, or Stopped after an incident): ``{"event":
  "failed" | "stopped", "worker_id", "pool_id", "ready": false, "state", "reason"}``.

Each is a JSON POST, retried with exponential backoff (0.2 s doubling, at most 2 s apart) up to a
bound of attempts; 2xx ends it. The ready callback runs on a background thread so a slow pool
manager never holds a commit; the stop callback is sent before the process exits (bounded by the
same attempts). The worker token is never sent: the pool manager knows which worker called from
``worker_id``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any, Final

from vram_residency.errors import ConfigError

__all__ = ["Callbacks", "check_callback_url"]

log = logging.getLogger("vram_residency.service.callbacks")

DEFAULT_ATTEMPTS: Final = 5
_FIRST_DELAY: Final = 0.2
_MAX_DELAY: Final = 2.0
_TIMEOUT: Final = 5.0


def check_callback_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"readiness_callback_url {url!r} must be an http(s) URL with a host")
    return url


class Callbacks:
    """Sends the pool manager's callbacks (see the module docstring)."""

    def __init__(
        self, url: str, *, worker_id: str, pool_id: str | None, attempts: int = DEFAULT_ATTEMPTS
    ) -> None:
        self.url = check_callback_url(url)
        if attempts < 1:
            raise ConfigError("callback attempts must be at least 1")
        self._attempts = attempts
        self._base = {"worker_id": worker_id, "pool_id": pool_id}
        self._threads: list[threading.Thread] = []
        #: The failure callback went out already (at the incident): not again at exit.
        self.failure_sent = False

    def _post(self, body: Mapping[str, Any]) -> bool:
        data = json.dumps({**self._base, **body}, separators=(",", ":")).encode()
        delay = _FIRST_DELAY
        for attempt in range(1, self._attempts + 1):
            req = urllib.request.Request(  # noqa: S310 - the scheme is checked to be http(s)
                self.url, data=data, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=_TIMEOUT) as resp:  # noqa: S310
                    if 200 <= resp.status < 300:
                        log.info("callback %s delivered (attempt %d)", body.get("event"), attempt)
                        return True
            except urllib.error.HTTPError as exc:
                log.warning("callback %s: HTTP %d (attempt %d)", body.get("event"), exc.code, attempt)
            except (OSError, ValueError) as exc:
                log.warning("callback %s failed: %s (attempt %d)", body.get("event"), exc, attempt)
            if attempt < self._attempts:
                time.sleep(delay)
                delay = min(delay * 2, _MAX_DELAY)
        log.error("callback %s not delivered after %d attempts", body.get("event"), self._attempts)
        return False

    def ready(self, handles: list[dict[str, Any]], url: str) -> None:
        """The readiness callback, in the background."""
        t = threading.Thread(
            target=self._post,
            args=({"event": "ready", "ready": True, "handles": handles, "url": url},),
            name="vram-callback",
            daemon=True,
        )
        t.start()
        self._threads.append(t)

    def failed_now(self, reason: str) -> None:
        """The failure callback, in the background (called at a security incident)."""
        self.failure_sent = True
        t = threading.Thread(
            target=self._post,
            args=({"event": "failed", "ready": False, "state": "Stopped", "reason": reason},),
            name="vram-callback",
            daemon=True,
        )
        t.start()
        self._threads.append(t)

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds in all for the background callbacks to be delivered (or
        to give up): before the process exits, which would end their daemon threads."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def stopped(self, state: str, reason: str, *, failed: bool) -> bool:
        """The failure (or stop) callback, sent now; True when delivered."""
        for t in self._threads:
            t.join(_TIMEOUT)  # the ready callback first, so the pool manager sees them in order
        return self._post(
            {"event": "failed" if failed else "stopped", "ready": False, "state": state, "reason": reason}
        )
