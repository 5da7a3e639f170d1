"""``POST /worker/attest`` over real HTTP: an in-process worker on uvicorn (to corrupt its memory
and drain its rate limit), and several real ``vram-residency serve`` processes on loopback asked by
the ``vram-residency attest`` command, one and as a fleet."""

from __future__ import annotations

import http.server
import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import httpx
import pytest

from vram_residency.attest import (
    AttestationRefused,
    NonceStore,
    check_attestation,
    fetch_seal_records,
    request_attestation,
)
from vram_residency.cli.main import main
from vram_residency.errors import InvalidInput
from vram_residency.service.server import ServeOptions, ServerThread, build

SECOND = 10**9


def _token_file(path: Path) -> str:
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _model_dir(root: Path, size: int = 300_000) -> Path:
    d = root / "models"
    d.mkdir(exist_ok=True)
    (d / "w.bin").write_bytes(secrets.token_bytes(size))
    return d


# -- in-process worker ----------------------------------------------------------------------------
@pytest.fixture
def inproc(tmp_path: Path) -> Iterator[tuple[Any, ServerThread, str, Path]]:
    token = _token_file(tmp_path / "token")
    models = _model_dir(tmp_path)
    built = build(
        ServeOptions(
            model_dir=models,
            model="w.bin",
            token_file=tmp_path / "token",
            state_dir=tmp_path / "state",
            backend="host",
            worker_id="w-inproc",
            scrub_interval=0.0,
            capacity_bytes=64 << 20,
        )
    )
    server = ServerThread(built.app).start()
    try:
        yield built, server, token, models / "w.bin"
    finally:
        server.stop()
        built.worker.close()


def _post(url: str, token: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{url}/worker/attest", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def test_round_trip_replay_and_ready(inproc: tuple[Any, ServerThread, str, Path]) -> None:
    _, server, token, model = inproc
    worker_id, records = fetch_seal_records(server.url, token)
    assert worker_id == "w-inproc" and len(records) == 1
    store = NonceStore()
    issued = store.issue(worker_id)
    doc = request_attestation(server.url, token, issued.nonce, probe=True)
    args = (
        doc,
        token,
        issued.nonce,
        records,
        issued.issued_at_ns,
        10 * SECOND,
        {records[0]["shard_id"]: model},
    )
    res = check_attestation(*args, nonces=store)
    assert res.probed == (records[0]["shard_id"],)
    with pytest.raises(AttestationRefused, match="replay"):
        check_attestation(*args, nonces=store)
    ready = httpx.get(f"{server.url}/worker/ready", headers={"Authorization": f"Bearer {token}"}).json()
    assert ready["models"][0]["last_verified_ns"] == doc["shards"][0]["verified_at_ns"]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'vram_attestations_total{result="ok"} 1.0' in metrics
    assert "vram_seal_age_max_seconds" in metrics


@pytest.mark.parametrize("nonce", ["00" * 15, "00" * 65, "0" * 33, "zz" * 16, ""])
def test_bad_nonces_refused(inproc: tuple[Any, ServerThread, str, Path], nonce: str) -> None:
    _, server, token, _ = inproc
    r = _post(server.url, token, {"nonce": nonce})
    assert r.status_code == 400 and r.json()["code"] == "INVALID_PARAMS"


def test_unauthenticated_and_unknown_shard(inproc: tuple[Any, ServerThread, str, Path]) -> None:
    _, server, token, _ = inproc
    assert httpx.post(f"{server.url}/worker/attest", json={"nonce": "00" * 16}).status_code == 401
    r = _post(server.url, token, {"nonce": "00" * 16, "shard_ids": ["shard-" + "0" * 32]})
    assert r.status_code == 404


def test_rate_limited_with_retry_after(inproc: tuple[Any, ServerThread, str, Path]) -> None:
    _, server, token, _ = inproc
    codes = [_post(server.url, token, {"nonce": secrets.token_hex(16)}) for _ in range(12)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited, [r.status_code for r in codes]
    body = limited[0].json()
    assert body["code"] == "RATE_LIMITED" and body["retriable"] and body["retry_after_ms"] >= 1
    assert int(limited[0].headers["Retry-After"]) >= 1
    # Waiting as long as a refusal says is enough (requests in between could spend what had
    # accumulated, so ask once more right now and wait what that answer says).
    now = _post(server.url, token, {"nonce": secrets.token_hex(16)})
    if now.status_code == 429:
        time.sleep(now.json()["retry_after_ms"] / 1000 + 0.02)
        assert _post(server.url, token, {"nonce": secrets.token_hex(16)}).status_code == 200
    else:
        assert now.status_code == 200


def test_mismatch_answers_the_statement_and_stops_the_worker(
    inproc: tuple[Any, ServerThread, str, Path],
) -> None:
    built, server, token, _ = inproc
    worker_id, records = fetch_seal_records(server.url, token)
    mgr = built.worker.manager
    shard = next(s for s in mgr.shards() if s.shard_id == records[0]["shard_id"])
    mgr.device_buffer(shard).write(12_345, b"\x00\xff")  # flip bytes behind its back
    store = NonceStore()
    issued = store.issue(worker_id)
    doc = request_attestation(server.url, token, issued.nonce)
    assert doc["verdict"] == "mismatch" and doc["shards"][0]["shard_id"] == records[0]["shard_id"]
    with pytest.raises(AttestationRefused) as ei:
        check_attestation(doc, token, issued.nonce, records, issued.issued_at_ns, 10 * SECOND, nonces=store)
    assert ei.value.check == 5
    assert httpx.get(f"{server.url}/health").json()["status"] == "stopped"
    r = _post(server.url, token, {"nonce": secrets.token_hex(16)})
    assert r.status_code == 503 and r.json()["code"] == "WORKER_STOPPED"


# -- real serve processes and the CLI --------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], Path, Path]]:
    root = tmp_path_factory.mktemp("fleet")
    _token_file(root / "token")
    models = _model_dir(root, 1_000_003)
    env = {k: v for k, v in os.environ.items() if k not in ("WORKER_API_TOKEN_FILE", "CREDENTIALS_DIRECTORY")}
    procs: list[subprocess.Popen[str]] = []
    urls = []
    try:
        for i in range(3):
            port = _free_port()
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "vram_residency.cli.main",
                        "serve",
                        "--port",
                        str(port),
                        "--backend",
                        "host",
                        "--model-dir",
                        str(models),
                        "--model",
                        "w.bin",
                        "--token-file",
                        str(root / "token"),
                        "--state-dir",
                        str(root / f"s{i}"),
                        "--worker-id",
                        f"fleet-{i}",
                        "--scrub-interval",
                        "0",
                        "--host-capacity-gib",
                        "0.1",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=env,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        for p, u in zip(procs, urls, strict=True):
            while True:
                assert p.poll() is None, p.communicate()[0]
                try:
                    if httpx.get(f"{u}/health", timeout=1).json().get("status") == "ok":
                        break
                except (httpx.TransportError, ValueError):
                    pass
                assert time.monotonic() < deadline, "serve did not become healthy"
                time.sleep(0.1)
        yield urls, root / "token", models / "w.bin"
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def _cli(*argv: str) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["attest", *argv])
    return rc, buf.getvalue()


def test_cli_one_worker_with_probe_from_the_file(fleet: tuple[list[str], Path, Path], tmp_path: Path) -> None:
    urls, token_file, model = fleet
    store = tmp_path / "nonces.jsonl"
    rc, out = _cli(
        urls[0], "--token-file", str(token_file), "--files", str(model), "--nonce-store", str(store)
    )
    assert rc == 0, out
    assert "fleet-0" in out and "ok (probed 1)" in out
    assert len(store.read_text().splitlines()) == 2  # issued, then used


def test_cli_fleet_all_ok_then_one_dead_and_late(fleet: tuple[list[str], Path, Path], tmp_path: Path) -> None:
    urls, token_file, model = fleet
    workers = tmp_path / "workers.txt"
    workers.write_text("# the fleet\n" + "\n".join(urls) + "\n")
    rc, out = _cli(
        "--workers-file",
        str(workers),
        "--token-file",
        str(token_file),
        "--files",
        str(model),
        "--concurrency",
        "2",
    )
    assert rc == 0, out
    lines = out.splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == ["worker", "verdict", "age", "time taken"]
    assert sum(" | ok (probed 1)" in ln for ln in lines) == 3

    dead = f"http://127.0.0.1:{_free_port()}"
    rc, out = _cli(*urls, dead, "--token-file", str(token_file), "--timeout", "5")
    assert rc == 1
    assert sum(" | ok" in ln for ln in out.splitlines()) == 3
    assert any(dead in ln and "NO ANSWER" in ln for ln in out.splitlines()), out

    rc, out = _cli(*urls[:2], "--token-file", str(token_file), "--max-delay-ms", "0.000001")
    assert rc == 1 and out.count("LATE") == 2, out


def test_cli_refuses_another_token_and_kept_seals(
    fleet: tuple[list[str], Path, Path], tmp_path: Path
) -> None:
    urls, token_file, _ = fleet
    wrong = tmp_path / "wrong"
    _token_file(wrong)
    rc, out = _cli(urls[1], "--token-file", str(wrong))
    assert rc == 1 and "NO ANSWER" in out  # 401 from the worker
    # Seal records this orchestrator kept from another worker do not cover this one.
    ready = httpx.get(
        f"{urls[0]}/worker/ready", headers={"Authorization": f"Bearer {token_file.read_text().strip()}"}
    )
    seals = tmp_path / "seals.json"
    seals.write_text(ready.text)
    rc, out = _cli(urls[0], urls[1], "--token-file", str(token_file), "--seals", str(seals))
    lines = out.splitlines()
    assert rc == 1
    assert any("fleet-0" in ln and " | ok" in ln for ln in lines), out
    assert any("fleet-1" in ln and "no seal records held" in ln for ln in lines), out


# -- seal age in the service --------------------------------------------------------------------------
@pytest.fixture
def byte_lm(tmp_path: Path) -> Iterator[tuple[Any, ServerThread, str]]:
    token = _token_file(tmp_path / "token")
    built = build(
        ServeOptions(
            token_file=tmp_path / "token",
            state_dir=tmp_path / "state",
            backend="host",
            worker_id="w-age",
            scrub_interval=0.0,
            capacity_bytes=256 << 20,
        )
    )
    server = ServerThread(built.app).start()
    try:
        yield built, server, token
    finally:
        server.stop()
        built.worker.close()


def _execute(url: str, token: str) -> httpx.Response:
    r = httpx.post(
        f"{url}/worker/execute",
        json={"prompt": "hi", "max_tokens": 2},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    return r


@pytest.mark.parametrize("policy", ["refuse", "reverify"])
def test_seal_age_policy_on_execute(byte_lm: tuple[Any, ServerThread, str], policy: str) -> None:
    """Without pre-verification (the only mode where a shard can age while executions run), a
    shard last verified longer ago than max_seal_age is refused (503, retriable, until a verify)
    or re-verified before the batch runs."""
    import dataclasses

    built, server, token = byte_lm
    w = built.worker
    w.config = dataclasses.replace(w.config, pre_verify=False, max_seal_age=1.0, seal_age_policy=policy)
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.post(f"{server.url}/worker/verify", headers=auth).status_code == 200
    assert _execute(server.url, token).status_code == 200  # just verified: fresh
    before = httpx.get(f"{server.url}/worker/ready", headers=auth).json()["models"][0]["last_verified_ns"]
    time.sleep(1.2)
    r = _execute(server.url, token)
    after = httpx.get(f"{server.url}/worker/ready", headers=auth).json()["models"][0]["last_verified_ns"]
    if policy == "refuse":
        assert r.status_code == 503 and r.json()["retriable"] and r.json()["details"]["stale_shards"]
        assert after == before
        assert httpx.post(f"{server.url}/worker/verify", headers=auth).status_code == 200
        assert _execute(server.url, token).status_code == 200
    else:
        assert r.status_code == 200 and after > before
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # stale is not an incident


def test_cli_waits_out_the_rate_limit(inproc: tuple[Any, ServerThread, str, Path], tmp_path: Path) -> None:
    """A worker at its attestation rate answers 429 with retry_after_ms; the command waits that
    long (with a fresh nonce per attempt) while its timeout allows, and gives up when it does not."""
    _, server, token, _ = inproc
    while _post(server.url, token, {"nonce": secrets.token_hex(16)}).status_code != 429:
        pass
    rc, out = _cli(server.url, "--token-file", str(tmp_path / "token"), "--timeout", "10")
    assert rc == 0, out
    while _post(server.url, token, {"nonce": secrets.token_hex(16)}).status_code != 429:
        pass
    rc, out = _cli(server.url, "--token-file", str(tmp_path / "token"), "--timeout", "0.05")
    assert rc == 1 and "rate limited" in out, out


@pytest.mark.parametrize("status", [200, 500])
def test_a_hostile_worker_answering_deeply_nested_json_is_invalid_input(status: int) -> None:
    """The orchestrator asks a worker it does not trust yet: an answer of 100 000 nested
    brackets (well under the answer size cap) is InvalidInput, as any answer that is not JSON
    is; the 200 answer raised RecursionError out of request_attestation and fetch_seal_records."""
    body = b"[" * 100_000

    class Hostile(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        token = "hostile-worker-test-token-0123456789"
        with pytest.raises(InvalidInput):
            request_attestation(url, token, secrets.token_bytes(32), timeout=10)
        with pytest.raises(InvalidInput):
            fetch_seal_records(url, token, timeout=10)
    finally:
        server.shutdown()
        server.server_close()


def test_cli_seal_records_file_deeply_nested_is_refused(tmp_path: Path) -> None:
    """``attest --seals FILE`` whose text nests 100 000 deep: refused like any file that is not
    seal records (exit status, message), not a RecursionError traceback out of the CLI."""
    token_file = tmp_path / "token"
    _token_file(token_file)
    seals = tmp_path / "seals.json"
    seals.write_text("[" * 100_000)
    rc, _out = _cli("http://127.0.0.1:9", "--token-file", str(token_file), "--seals", str(seals))
    assert rc != 0
