"""A short version of bench/service_load.py: 8 concurrent clients executing for 5 seconds against
a real server on loopback, no errors, every batch verified, and an audit chain that verifies."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import httpx

from tests.service.service_helpers import Running
from vram_residency.audit.verify import verify_log

BENCH = Path(__file__).resolve().parents[2] / "bench" / "service_load.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("service_load_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_short_load(worker_factory: Callable[..., Running]) -> None:
    bench = _bench()
    w = worker_factory(scrub_interval=1.0)  # the scrubber runs alongside, as in production
    result = bench.run_clients(w.url, w.token, 8, 5.0)
    summary = result.summary()
    assert summary["errors"] == 0, summary["error_samples"]
    assert summary["ok"] >= 8
    m = _metrics(w.url)
    batches = m["vram_execute_batch_size_count"]
    assert m['vram_verify_seconds_count{trigger="execute"}'] == batches  # one pass per batch
    assert m["vram_execute_batch_size_sum"] == summary["ok"]
    assert m.get('vram_verifications_total{result="failed",trigger="execute"}', 0.0) == 0
    path, token = w.audit_path, w.token
    w.close()
    report = verify_log([path], token)
    assert report.ok, report.first_break
    assert report.records > 2 * batches  # state changes and a SealVerified per batch
