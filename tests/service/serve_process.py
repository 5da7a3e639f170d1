"""A real ``vram-residency serve`` process for the conformance tests: its own port (``--port 0``,
read back from the banner), a token file, a log file with everything it printed."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

_LISTENING = re.compile(r"listening:\s+(http://\S+)")


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str
    token: str = field(repr=False)

    @property
    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("serve did not stop in time") from None


def write_token(path: Path, token: str = "conformance-token-0123456789abcdef") -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("WORKER_") and k != "CREDENTIALS_DIRECTORY"
    }
    env.update(extra or {})
    return env


def run_serve(
    tmp: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    preexec: Callable[[], None] | None = None,
    program: Sequence[str] = ("-m", "vram_residency.cli.main"),
) -> ServeProcess:
    """Start serve and wait for its banner's URL and a /health answer. ``program``: what the
    interpreter runs (a test wrapper of the CLI, such as serve_fault_child.py)."""
    tmp.mkdir(parents=True, exist_ok=True)
    token_file = tmp / "worker.token"
    token = write_token(token_file) if not token_file.exists() else token_file.read_text().strip()
    log_path = tmp / f"serve-{time.monotonic_ns()}.log"
    # VRAM_RESIDENCY_TEST_BACKEND=cuda runs the same processes on the GPU.
    backend = os.environ.get("VRAM_RESIDENCY_TEST_BACKEND", "host")
    cmd = [sys.executable, *program, "serve", "--backend", backend, "--port", "0"]
    if "--config" not in args:
        cmd += ["--token-file", str(token_file), "--state-dir", str(tmp / "state")]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, *args], stdout=out, stderr=subprocess.STDOUT, env=clean_env(env), preexec_fn=preexec
        )
    deadline = time.monotonic() + timeout
    url = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        m = _LISTENING.search(log_path.read_text(errors="replace"))
        if m:
            url = m.group(1)
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.TransportError:
                pass
        time.sleep(0.05)
    else:
        proc.kill()
        raise AssertionError(f"serve did not start:\n{log_path.read_text()[-3000:]}")
    return ServeProcess(proc, log_path, url, token)


def sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a Server-Sent Events stream."""
    event = ""
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])


def execute(
    client: httpx.Client, body: dict[str, Any], **headers: str
) -> tuple[int, list[tuple[str, dict[str, Any]]], httpx.Headers]:
    with client.stream("POST", "/worker/execute", json=body, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [("error", r.json())], r.headers
        return 200, list(sse(r.iter_lines())), r.headers


class Receiver(http.server.ThreadingHTTPServer):
    """A pool manager's callback endpoint on loopback: records every JSON POST (the first one
    answered 503, to see the worker retry)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.fail_first = 1  # the first call fails: the worker must retry

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    self.send_response(503)
                else:
                    outer.received.append(body)
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/callback"
