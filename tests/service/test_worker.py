"""The worker below the HTTP layer: jobs waiting together share one verification pass, every batch
is verified before it runs, and benchmark mode is visible."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from tests.service.service_helpers import EXAMPLE_DIR, tiny_bert
from vram_residency.service.catalog import ModelCatalog
from vram_residency.service.executor import JobOutput
from vram_residency.service.executors.encoder import bert_factory
from vram_residency.service.status import worker_status
from vram_residency.service.worker import ExecuteJob, VerifyPass, Worker, WorkerConfig

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
