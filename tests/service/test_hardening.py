"""The service items of the adversarial pass (#17): each the way the report found it, with real
processes or real HTTP."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.serve_process import clean_env, execute, run_serve, sse
from tests.service.service_helpers import Running
from vram_residency.service.executors.example_model import EXAMPLE_NAMES
from vram_residency.testing import flip_bit

NEEDS_MINILM = False
EXAMPLE = EXAMPLE_NAMES["small"]


def _serve_cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    tmp.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "vram_residency.cli.main",
            "serve",
            "--backend",
            "host",
            "--state-dir",
            str(tmp / "state"),
            *args,
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )


# -- #17.12: options out of range are errors, not tracebacks -------------------------------------
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--port", "70000"), "--port must be from 1 to 65535"),
        (("--max-body-bytes", "-1"), "--max-body-bytes must be at least 1024"),
        (("--audit-log", "/proc/x/audit.jsonl"), "--audit-log /proc/x/audit.jsonl"),
        (("--max-models", "0"), "--max-models must be at least 1"),
        (("--scrub-budget", "0"), "--scrub-budget"),
    ],
)
def test_17_12_bad_options_are_clear_errors(tmp_path: Path, args: tuple[str, ...], fragment: str) -> None:
    r = _serve_cli(tmp_path, *args)
    assert r.returncode != 0 and fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert "listening" not in r.stdout


# -- #17.19: a busy port fails before the banner ---------------------------------------------------
def test_17_19_a_busy_port_fails_before_the_banner(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = _serve_cli(tmp_path, "--port", str(s.getsockname()[1]))
    assert r.returncode != 0 and "cannot listen on 127.0.0.1" in r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr  # not even "starting"


# -- #17.7: a bounded local flood of half-open connections ---------------------------------------
def test_17_7_half_open_flood_under_a_low_fd_limit_keeps_health_answering(tmp_path: Path) -> None:
    limit = 256  # the child's soft AND hard limit: serve cannot raise it, the flood exhausts it
    flood = 300
    w = run_serve(
        tmp_path,
        "--header-timeout",
        "1",
        "--max-connections",
        "64",
        env={"PYTHONUNBUFFERED": "1"},
        preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
    )
    host, port = w.url.removeprefix("http://").split(":")
    socks = []
    try:
        for _ in range(flood):
            s = socket.socket()
            s.connect((host, int(port)))  # connected, never sends a byte
            socks.append(s)
        t0 = time.monotonic()
        status = None
        while time.monotonic() - t0 < 30:
            try:
                status = httpx.get(w.url + "/health", timeout=5).status_code
                if status == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert status == 200, "health did not answer during the flood"
        ready = httpx.get(w.url + "/worker/ready", headers={"Authorization": f"Bearer {w.token}"}, timeout=10)
        assert ready.status_code == 200
    finally:
        for s in socks:
            s.close()
    assert w.stop() == 0
    log = w.log()
    # asyncio's accept-error line is rate-limited: a handful of lines, not one per attempt.
    n = log.count("socket.accept() out of system resource")
    assert 1 <= n <= 5, n  # the flood did exhaust the descriptors; the line was rate-limited
    assert len(log) < 200_000


# -- #17.4: Stopped ends a running execute at its next token --------------------------------------
def test_17_4_stopped_ends_running_streams_with_an_error(worker_factory: Callable[..., Running]) -> None:
    w = worker_factory(model=EXAMPLE)
    mgr = w.worker.manager
    (shard,) = mgr.shards()
    events: list[tuple[str, dict[str, Any]]] = []
    after: list[tuple[str, dict[str, Any]]] = []
    detected = threading.Event()
    with w.client.stream("POST", "/worker/execute", json={"prompt": "long", "max_tokens": 1500}) as r:
        for event, data in sse(r.iter_lines()):
            (after if detected.is_set() else events).append((event, data))
            if event == "token" and data["i"] == 3 and not detected.is_set():
                flip_bit(mgr, shard, 8 * 4096 + 1)
                v = httpx.post(
                    w.url + "/worker/verify", headers={"Authorization": f"Bearer {w.token}"}, timeout=60
                )
                assert v.status_code == 500 and v.json()["code"] == "SEAL_VERIFICATION_FAILED"
                detected.set()
    stream = events + after
    assert stream[-1][0] == "error" and stream[-1][1]["code"] in (
        "WORKER_STOPPED",
        "SEAL_VERIFICATION_FAILED",
    )
    assert "end" not in [e for e, _ in stream]
    assert sum(e == "token" for e, _ in stream) < 1500
    # Tokens read after detection were on the wire before it: few, from the socket's buffer.
    assert sum(e == "token" for e, _ in after) < 200


# -- #17.14: committed models keep serving while another loads -------------------------------------
def test_17_14_executes_continue_while_another_model_loads(
    worker_factory: Callable[..., Running], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    big = models / "big.bin"
    with big.open("wb") as f:
        f.truncate(256 << 20)  # a raw model that takes a while to stream and seal
    w = worker_factory(model_dir=models, model=None, max_models=2)
    from vram_residency.formats.tree import SHA256_TREE_V1
    from vram_residency.service.executors.example_model import ensure_example

    ensure_example(models / EXAMPLE, "small", SHA256_TREE_V1)
    assert w.client.post("/worker/commit", json={"model": EXAMPLE}).status_code == 200
    result: dict[str, Any] = {}

    def commit_big() -> None:
        result["r"] = httpx.post(
            w.url + "/worker/commit",
            json={"model": "big.bin"},
            headers={"Authorization": f"Bearer {w.token}"},
            timeout=300,
        )

    t = threading.Thread(target=commit_big)
    t.start()
    statuses = []
    saw_loading = False
    while t.is_alive():
        ready = w.client.get("/worker/ready").json()
        saw_loading = saw_loading or ready["loading"] == ["big.bin"]
        statuses.append(execute(w.client, {"model": EXAMPLE, "prompt": "hi", "params": {"max_tokens": 2}})[0])
    t.join()
    assert result["r"].status_code == 200
    assert statuses and all(s == 200 for s in statuses), statuses
    assert saw_loading or len(statuses) <= 1


# -- #17.18 / the README's curl line: no handle_id runs the first model --------------------------
def test_17_18_execute_without_a_handle_runs_the_first_model(tmp_path: Path) -> None:
    w = run_serve(tmp_path)  # a bare serve: the example model, room for a second
    blob = tmp_path / "state" / "example-models" / "extra.bin"
    blob.write_bytes(b"\x01" * 8192)
    c = w.client
    r = c.post("/worker/commit", json={"model_ref": "extra", "model_bytes": str(blob)})
    assert r.status_code == 200, r.text
    status, events, _ = execute(c, {"prompt": "hello world"})  # the README's curl body
    assert status == 200 and events[0][1]["model"] == EXAMPLE and events[-1][0] == "end"
    assert w.stop() == 0


# -- #17.8: a shutdown that failed exits non-zero ------------------------------------------------
def test_17_8_a_failed_shutdown_exits_non_zero(tmp_path: Path) -> None:
    import signal

    from tests.service.serve_process import write_token

    token = tmp_path / "token"
    write_token(token)
    audit = tmp_path / "audit" / "audit.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vram_residency.cli.main",
            "serve",
            "--backend",
            "host",
            "--port",
            "0",
            "--token-file",
            str(token),
            "--state-dir",
            str(tmp_path / "state"),
            "--audit-log",
            str(audit),
            "--scrub-interval",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=clean_env(),
        # A write past RLIMIT_FSIZE then fails with EFBIG instead of killing the process.
        preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
    )
    assert proc.stdout is not None
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, b"")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    deadline = time.monotonic() + 120
    while not any(b"listening:" in ln for ln in lines):
        assert proc.poll() is None and time.monotonic() < deadline, b"".join(lines).decode()
        time.sleep(0.05)
    time.sleep(0.5)  # the startup records are on disk
    # The disk is "full" for this process from now on: the audit log cannot grow any more.
    size = audit.stat().st_size
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (size, size))
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(60)
    reader.join(5)
    assert rc != 0, b"".join(lines).decode(errors="replace")[-3000:]
    reader.join(5)
    out = b"".join(lines).decode(errors="replace")
    assert "stopped (shards zeroed and freed)" not in out
    assert "SHUTDOWN FAILED" in out, out[-2000:]


# -- the failure callback goes out at the incident, not only at exit -------------------------------
def test_failure_callback_at_a_security_incident(worker_factory: Callable[..., Running]) -> None:
    from tests.service.serve_process import Receiver

    receiver = Receiver()
    try:
        w = worker_factory(model=EXAMPLE, readiness_callback_url=receiver.url, pool_id="pool-x")
        mgr = w.worker.manager
        (shard,) = mgr.shards()
        flip_bit(mgr, shard, 8 * 4096 + 1)
        v = w.client.post("/worker/verify")
        assert v.status_code == 500 and v.json()["code"] == "SEAL_VERIFICATION_FAILED"
        deadline = time.monotonic() + 20
        while not receiver.received:
            assert time.monotonic() < deadline, "no failure callback"
            time.sleep(0.05)
        (got,) = receiver.received
        assert got["event"] == "failed" and got["pool_id"] == "pool-x" and got["state"] == "Stopped"
        assert "SealVerificationFailed" in got["reason"]
    finally:
        receiver.shutdown()
