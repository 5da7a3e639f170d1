"""Corruption injected while serving: the next execute fails, the worker stops, the incident is
audited; the scrubber finds it without any execute; the scrubber keeps to its time budget."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.service.serve_process import Receiver
from tests.service.service_helpers import EXAMPLE_DIR, Running, audit_events, execute
from vram_residency import SealVerificationFailed
from vram_residency.audit.verify import verify_log
from vram_residency.service.executors.safetensors_view import parse_header
from vram_residency.service.lifecycle import Incident
from vram_residency.service.worker import scrub_delay
from vram_residency.testing import flip_bit

TENSOR = "encoder.layer.3.attention.self.query.weight"


def _tensor_bit(name: str) -> int:
    """Index of a high exponent bit inside the tensor ``name`` of the example model."""
    assert EXAMPLE_DIR is not None
    path = EXAMPLE_DIR / "model.safetensors"
    with path.open("rb") as f:
        head = f.read(1 << 20)
    _, tensors = parse_header(head, path.stat().st_size)
    info = tensors[name]
    byte = info.start + 4 * 1000 + 3  # float 1000 of the tensor, its most significant byte
    return 8 * byte + 6  # bit 30 of the float: the top exponent bit


def _metric(url: str, prefix: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


def test_corruption_fails_the_next_execute_and_stops_the_worker(
    worker_factory: Callable[..., Running],
) -> None:
    incidents: list[Incident] = []
    w = worker_factory(on_incident=incidents.append)
    assert execute(w.client, prompt="before the flip")[0] == 200
    mgr = w.worker.manager
    (shard,) = mgr.shards()
    bit = _tensor_bit(TENSOR)

    flip_bit(mgr, shard, bit)  # behind the seal's back, on the live worker

    status, body = execute(w.client, prompt="hello world")
    assert status == 500
    assert body["code"] == "SEAL_VERIFICATION_FAILED"
    details = body["details"]
    assert details["shard_id"] == shard.shard_id and details["tag_valid"] is True
    assert details["expected_digest"] == shard.digest != details["actual_digest"]
    assert any(a <= bit // 8 < b for a, b in details["corrupted_ranges"])
    # Named from the sealed file's tensor index: every tensor in the changed 1 MiB unit.
    assert TENSOR in details["corrupted_tensors"]

    ready = w.client.get("/worker/ready").json()
    assert ready["ready"] is False and ready["state"] == "Stopped"
    assert ready["incident"]["error_type"] == "SealVerificationFailed"
    assert ready["incident"]["shard_id"] == shard.shard_id
    assert httpx.get(w.url + "/health").json()["status"] == "stopped"

    # A Stopped worker refuses all further work.
    later = execute(w.client, prompt="after")
    assert later[0] == 503 and later[1]["code"] == "WORKER_STOPPED"
    assert w.client.post("/worker/verify", json={}).json()["code"] == "WORKER_STOPPED"
    assert w.client.post("/worker/commit", json={"model": "all-minilm-l6-v2"}).status_code == 503

    assert len(incidents) == 1 and incidents[0].shard_id == shard.shard_id
    assert _metric(w.url, 'vram_verifications_total{result="failed",trigger="execute"}') == 1
    assert _metric(w.url, "vram_security_incidents_total") == 1
    assert _metric(w.url, 'vram_worker_state{state="Stopped"}') == 1

    path, token = w.audit_path, w.token
    w.close()
    records = list(audit_events(path))
    failed = [r for r in records if r["event"] == "SealVerificationFailed"]
    assert len(failed) == 1 and failed[0]["critical"] is True
    assert failed[0]["fields"]["shard_id"] == shard.shard_id
    incident = [r for r in records if r["event"] == "SecurityIncident"]
    assert len(incident) == 1 and incident[0]["critical"] is True
    stopped = [
        r for r in records if r["event"] == "WorkerStateChanged" and r["fields"]["to_state"] == "Stopped"
    ]
    assert stopped
    assert verify_log([path], token).ok


def test_simultaneous_failures_one_failure_callback_every_detection_audited(
    worker_factory: Callable[..., Running],
) -> None:
    """Several verifications fail at the same moment: each detection is evidence (its
    SealVerificationFailed and SecurityIncident records, its incident callback), but the worker
    enters Stopped once, so the pool manager gets one failure callback; the later incidents'
    records say the worker was already Stopped, and by which incident."""
    pool = Receiver()
    pool.fail_first = 0
    incidents: list[Incident] = []
    w = worker_factory(on_incident=incidents.append, readiness_callback_url=pool.url)
    try:
        mgr = w.worker.manager
        (shard,) = mgr.shards()
        flip_bit(mgr, shard, _tensor_bit(TENSOR))
        n = 4
        # Each thread makes a real detection (a verification of the flipped shard, as
        # Worker.verify runs it), then all report theirs at once, as concurrent requests do.
        gate = threading.Barrier(n)
        reported: list[Incident | None] = []

        def detect_and_report() -> None:
            try:
                mgr.verify_sealed(shard)
            except SealVerificationFailed as exc:
                gate.wait(30)
                reported.append(w.worker.lifecycle.report_failure(exc))

        threads = [threading.Thread(target=detect_and_report) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(reported) == n and all(i is not None for i in reported), reported
        callbacks = w.built.callbacks
        assert callbacks is not None
        callbacks.join(30)
    finally:
        pool.shutdown()
    # Exactly one failure callback, for the incident that stopped the worker.
    failed = [b for b in pool.received if b["event"] == "failed"]
    assert len(failed) == 1 and failed[0]["state"] == "Stopped", pool.received
    first = [i for i in incidents if not i.already_stopped]
    assert len(incidents) == n and len(first) == 1, incidents
    assert first[0].id in failed[0]["reason"]
    later = [i for i in incidents if i.already_stopped]
    assert all(i.state_before.value == "Stopped" for i in later)

    path, token = w.audit_path, w.token
    w.close()
    records = list(audit_events(path))
    detections = [r for r in records if r["event"] == "SealVerificationFailed"]
    audited = [r for r in records if r["event"] == "SecurityIncident"]
    assert len(detections) == n and len(audited) == n, [r["event"] for r in records]
    assert {r["fields"]["incident_id"] for r in audited} == {i.id for i in incidents}
    by_id = {r["fields"]["incident_id"]: r["fields"] for r in audited}
    assert by_id[first[0].id]["already_stopped"] is False
    assert by_id[first[0].id]["state_before"] == "Ready"
    for i in later:
        f = by_id[i.id]
        assert f["already_stopped"] is True and f["state_before"] == "Stopped"
        assert first[0].id in f["stop_reason"]
    stopped = [
        r for r in records if r["event"] == "WorkerStateChanged" and r["fields"]["to_state"] == "Stopped"
    ]
    assert len(stopped) == 1
    assert verify_log([path], token).ok


def test_scrubber_finds_corruption_without_any_execute(worker_factory: Callable[..., Running]) -> None:
    w = worker_factory(scrub_interval=0.2, scrub_budget=1.0)
    mgr = w.worker.manager
    (shard,) = mgr.shards()
    flip_bit(mgr, shard, 12345)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(w.url + "/health").json()["state"] == "Stopped":
            break
        time.sleep(0.05)
    ready = w.client.get("/worker/ready").json()
    assert ready["ready"] is False and ready["state"] == "Stopped"
    assert _metric(w.url, 'vram_verifications_total{result="failed",trigger="scrub"}') == 1
    assert execute(w.client, prompt="x")[1]["code"] == "WORKER_STOPPED"
    path = w.audit_path
    w.close()
    assert any(r["event"] == "SecurityIncident" for r in audit_events(path))


def test_scrubber_keeps_to_its_time_budget(worker_factory: Callable[..., Running]) -> None:
    budget = 0.25
    w = worker_factory(scrub_interval=0.01, scrub_budget=budget)
    time.sleep(0.5)  # let the scrubber settle into its rhythm
    spent0 = _metric(w.url, 'vram_verify_seconds_sum{trigger="scrub"}')
    passes0 = _metric(w.url, "vram_scrub_passes_total")
    start = time.monotonic()
    time.sleep(4.0)
    elapsed = time.monotonic() - start
    spent = _metric(w.url, 'vram_verify_seconds_sum{trigger="scrub"}') - spent0
    passes = _metric(w.url, "vram_scrub_passes_total") - passes0
    assert passes >= 2
    # Each pass of d seconds is followed by d * (1/budget - 1) seconds of rest. The window's two
    # ends may each cut a cycle short (pass durations vary on a busy machine): allow two passes.
    assert spent / elapsed <= budget + 2 * spent / passes / elapsed + 0.03
    assert w.client.get("/worker/ready").json()["last_scrub"]["shards"] == 1


def test_scrub_delay_keeps_the_budget() -> None:
    assert scrub_delay(0.1, 60.0, 0.05) == 60.0  # the interval wins for short passes
    assert scrub_delay(10.0, 60.0, 0.05) == pytest.approx(190.0)  # 10 / (10 + 190) = 5%
    for spent in (0.001, 0.5, 3.0, 100.0):
        for budget in (0.01, 0.05, 0.5, 1.0):
            rest = scrub_delay(spent, 0.0, budget)
            assert spent / (spent + rest) <= budget + 1e-12


def test_stopped_worker_still_deallocates(worker_factory: Callable[..., Running]) -> None:
    w = worker_factory()
    mgr = w.worker.manager
    (shard,) = mgr.shards()
    flip_bit(mgr, shard, 7)
    assert w.client.post("/worker/verify", json={}).json()["code"] == "SEAL_VERIFICATION_FAILED"
    # Freeing (and zeroing) the memory is not work: it is allowed after the incident.
    r = w.client.delete(f"/worker/shards/{shard.shard_id}")
    assert r.status_code == 200
    body: dict[str, Any] = w.client.get("/worker/ready").json()
    assert body["models"] == [] and body["state"] == "Stopped"
