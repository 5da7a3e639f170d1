"""A real ``serve`` process that runs out of file descriptors while it works (a flood of
connections holds them all): requests that need a descriptor get a retriable 503 in the API's
error envelope, the worker keeps running and auditing, nothing leaks, and the same request
succeeds once descriptors are free again.

The exhaustion is exact and needs no flood: the worker's soft RLIMIT_NOFILE is lowered (prlimit,
from outside) to its lowest free descriptor number, so every open/dup/socket in the worker fails
with EMFILE while every descriptor it holds (the test's keep-alive connection among them) stays
usable."""

from __future__ import annotations

import base64
import contextlib
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.service.serve_process import ServeProcess, execute, run_serve

NEEDS_MINILM = False  # the generated example model and raw files only


def _open_fds(pid: int) -> set[int]:
    return {int(n) for n in os.listdir(f"/proc/{pid}/fd")}


def _lowest_free(pid: int) -> int:
    used = _open_fds(pid)
    n = 0
    while n in used:
        n += 1
    return n


@contextlib.contextmanager
def no_free_descriptor(pid: int) -> Iterator[None]:
    """Every new descriptor of process ``pid`` fails with EMFILE inside the block."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    # Twice, the lower: a descriptor the worker held for an instant (a dup) is not counted.
    first = _lowest_free(pid)
    time.sleep(0.05)
    low = min(first, _lowest_free(pid))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (low, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def _assert_retriable_503(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["code"] == "WORKER_NOT_READY"
    assert body["retriable"] is True and body["retry_after_ms"] == 1000
    assert body["details"] == {"reason": "file descriptors exhausted"}
    assert "Too many open files" in body["message"]
    assert r.headers["retry-after"] == "1"


def _assert_still_serving(w: ServeProcess, client: httpx.Client) -> None:
    assert w.proc.poll() is None
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["state"] == "Ready", health
    log = w.log()
    assert "Traceback" not in log and "SECURITY INCIDENT" not in log, log[-3000:]


def test_a_cold_worker_serves_thread_pool_routes_with_no_descriptor_free(tmp_path: Path) -> None:
    # The worker's first request to run in the thread pool comes while no descriptor is free:
    # anyio imported its backend then (an open() of a .py file) and the request failed with a
    # 500 "internal error", the connection closed, a traceback in the log.
    w = run_serve(tmp_path, "--scrub-interval", "0")
    try:
        with w.client as c:
            assert c.get("/health").status_code == 200  # the connection is made (on the loop)
            with no_free_descriptor(w.proc.pid):
                ready = c.get("/worker/ready")
                assert ready.status_code == 200, ready.text
                assert ready.json()["ready"] is True
                status, events, _ = execute(c, {"prompt": "hi", "max_tokens": 2})
                assert status == 200 and events[-1][0] == "end", events[-1:]
            _assert_still_serving(w, c)
    finally:
        assert w.stop() == 0


def test_commits_with_no_descriptor_free_are_retriable_and_succeed_afterwards(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "first.bin").write_bytes(os.urandom(64 * 1024))
    second = models / "second.bin"
    second.write_bytes(os.urandom(64 * 1024))
    w = run_serve(
        tmp_path,
        "--scrub-interval",
        "0",
        "--model-dir",
        str(models),
        "--model",
        "first.bin",
        "--max-models",
        "4",
    )
    pid = w.proc.pid
    inline = {"base64": base64.b64encode(os.urandom(8 * 1024)).decode()}
    attempts = [
        {"model_ref": "second.bin", "model_bytes": str(second)},  # by path: the model's open()
        {"model": "second.bin"},  # by name: the same open()
        {"model_ref": "inline.bin", "model_bytes": inline},  # by bytes: the spool file's mkstemp
    ]
    try:
        with w.client as c:
            assert c.get("/worker/ready").status_code == 200
            before = _open_fds(pid)
            with no_free_descriptor(pid):
                for body in attempts:
                    # Before: 422 MODEL_LOAD_FAILED "cannot open ...: Too many open files" (a
                    # client does not retry that), and a 500 "internal error" for the bytes.
                    _assert_retriable_503(c.post("/worker/commit", json=body))
            # Nothing was left open by the failed commits (the spool file is removed too).
            assert _open_fds(pid) == before
            assert not list((tmp_path / "state" / "spool").glob("commit-*"))
            _assert_still_serving(w, c)
            # The same commits succeed now that descriptors are free again.
            r = c.post("/worker/commit", json=attempts[0])
            assert r.status_code == 200, r.text
            r = c.post("/worker/commit", json=attempts[2])
            assert r.status_code == 200, r.text
            assert {h["model_ref"] for h in c.get("/worker/ready").json()["handles"]} == {
                "first.bin",
                "second.bin",
                "inline.bin",
            }
    finally:
        assert w.stop() == 0
    audit = (tmp_path / "state" / "audit.jsonl").read_text()
    assert audit.count('"ModelCommitted"') == 3 and "SecurityIncident" not in audit
