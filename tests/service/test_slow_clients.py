"""Slow clients at the connection limit of a real ``serve`` process: a request body trickled in a
byte at a time must not hold a connection for ever (enough of them, without the token, kept the
worker at ``--max-connections``: 503 to everyone, /health included)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.service.serve_process import run_serve

NEEDS_MINILM = False


@pytest.mark.parametrize("path", ["/health", "/worker/execute"])
def test_trickled_request_bodies_do_not_hold_the_connection_limit(tmp_path: Path, path: str) -> None:
    # /health: the body middleware waits for the whole body before anything answers. The
    # execute route without the token: answered 401 at once, then uvicorn read the rest of the
    # body to throw it away, each byte restarting its keep-alive timer.
    limit = 16
    w = run_serve(tmp_path, "--scrub-interval", "0", "--max-connections", str(limit), "--header-timeout", "1")
    host, port = w.url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000\r\n\r\n{"
    ).encode()
    socks: list[socket.socket] = []
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            for s in socks:
                with contextlib.suppress(OSError):  # closed by the worker
                    s.send(b" ")
            stop.wait(0.3)

    try:
        # One below the limit, one after another: each request is let in (a request that finds
        # the limit reached gets the busy 503 and its connection is closed).
        for _ in range(limit - 1):
            s = socket.create_connection((host, int(port)))
            s.sendall(head)
            socks.append(s)
            time.sleep(0.02)
        feeder = threading.Thread(target=trickle, daemon=True)
        feeder.start()
        time.sleep(0.5)
        # At the limit (this probe is the last connection): the busy 503.
        assert httpx.get(w.url + "/health", timeout=5).status_code == 503
        # The trickled bodies get the head's time limit (1 s), then must come at a real rate:
        # their connections are closed, and /health answers again while they still trickle.
        deadline = time.monotonic() + 6
        status = 0
        while time.monotonic() < deadline and status != 200:
            time.sleep(0.3)
            status = httpx.get(w.url + "/health", timeout=5).status_code
        assert status == 200, "the trickling clients still hold the connection limit"
        for s in socks:
            s.settimeout(3)
            try:
                while s.recv(65536):
                    pass  # a 401 (execute), then the close
            except ConnectionResetError:
                pass  # closed with bytes of ours unread: closed all the same
    finally:
        stop.set()
        for s in socks:
            s.close()
    assert w.stop() == 0
