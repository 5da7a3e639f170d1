"""The pool manager's callbacks (``service/callbacks.py``) over real HTTP: the failure callback
goes out at a security incident, not only when the process exits."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.service.serve_process import Receiver
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
