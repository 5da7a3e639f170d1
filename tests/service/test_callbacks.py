"""The pool manager's callbacks (``service/callbacks.py``) over real HTTP: the failure callback
goes out at a security incident, not only when the process exits."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.service.serve_process import Receiver, clean_env, write_token
from tests.service.service_helpers import Running
from vram_residency.service.executors.example_model import EXAMPLE_NAMES
from vram_residency.testing import flip_bit

NEEDS_MINILM = False  # see conftest.py
EXAMPLE = EXAMPLE_NAMES["small"]


def test_failure_callback_at_a_security_incident(worker_factory: Callable[..., Running]) -> None:
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


def test_failure_callback_when_the_startup_model_does_not_load(tmp_path: Path) -> None:
    # WORKER-4020s: readiness after load, and failure, are reported to readiness_callback_url. A
    # spec-mode worker whose model_path does not load exits non-zero (fail fast) and tells the
    # pool manager why first: it is waiting for one callback or the other.
    token = tmp_path / "token"
    write_token(token)
    bad = tmp_path / "models" / "model.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff" * 64)  # not a safetensors file: its header length is absurd
    receiver = Receiver()
    try:
        cfg = tmp_path / "worker.json"
        cfg.write_text(
            json.dumps(
                {
                    "worker_id": "worker-cb-0",
                    "pool_id": "pool-cb",
                    "model_path": str(bad),
                    "rpc_port": 8001,
                    "readiness_callback_url": receiver.url,
                    "gpu_device": 0,
                    "api_token_file": str(token),
                    "state_dir": str(tmp_path / "state"),
                }
            )
        )
        r = subprocess.run(
            [sys.executable, "-m", "vram_residency.cli.main", "serve", "--config", str(cfg), "--port", "0"],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=120,
        )
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "listening" not in r.stdout
        (got,) = receiver.received
        assert got["event"] == "failed" and got["ready"] is False
        assert got["worker_id"] == "worker-cb-0" and got["pool_id"] == "pool-cb"
        assert "model.safetensors" in got["reason"] and str(token) not in json.dumps(got)
    finally:
        receiver.shutdown()
