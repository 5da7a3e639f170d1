"""Step definitions for tests/features/service.feature (a real uvicorn server on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from tests.service.service_helpers import Running, audit_events, execute, start_worker, tiny_bert
from vram_residency import check_seal_record
from vram_residency.audit.verify import verify_log
from vram_residency.formats import digest
from vram_residency.testing import flip_bit

scenarios("service.feature")
scenarios("generator.feature")


@pytest.fixture
def ctx() -> dict[str, Any]:
    return {}


@pytest.fixture
def running(tmp_path: Path) -> Iterator[dict[str, Running]]:
    holder: dict[str, Running] = {}
    yield holder
    if "w" in holder:
        holder["w"].close()


@given(parsers.parse('a worker on loopback with a model directory holding a small BERT model "{name}"'))
def _worker(tmp_path: Path, running: dict[str, Running], ctx: dict[str, Any], name: str) -> None:
    models = tmp_path / "models"
    tiny_bert(models / name)
    (models / "escape").symlink_to(tiny_bert(tmp_path / "outside"))
    ctx["models"] = models
    running["w"] = start_worker(tmp_path / "worker", model_dir=models)


@given("a bare worker serving the generated example model")
def _bare(tmp_path: Path, running: dict[str, Running]) -> None:
    running["w"] = start_worker(tmp_path / "worker", model=None)  # what a bare `serve` commits


@given(parsers.parse('the model "{name}" is committed'))
def _committed(running: dict[str, Running], name: str) -> None:
    assert running["w"].client.post("/worker/commit", json={"model": name}).status_code == 200


@when(parsers.parse('the orchestrator commits "{name}" with its expected digest'))
def _commit_expected(running: dict[str, Running], ctx: dict[str, Any], name: str) -> None:
    expected = digest((ctx["models"] / name / "model.safetensors").read_bytes()).hex()
    ctx["expected"] = expected
    ctx["response"] = running["w"].client.post(
        "/worker/commit", json={"model": name, "expected_digest": f"sha256-tree-v1:{expected}"}
    )


@when(parsers.parse('the orchestrator commits "{name}"'))
def _commit(running: dict[str, Running], ctx: dict[str, Any], name: str) -> None:
    ctx["response"] = running["w"].client.post("/worker/commit", json={"model": name})


@when(parsers.parse('a client executes "{prompt}"'))
def _execute(running: dict[str, Running], ctx: dict[str, Any], prompt: str) -> None:
    ctx["status"], ctx["result"] = execute(running["w"].client, prompt=prompt)


@when("a bit of the sealed weights flips while the worker serves")
def _flip(running: dict[str, Running]) -> None:
    mgr = running["w"].worker.manager
    (shard,) = mgr.shards()
    flip_bit(mgr, shard, 8 * (shard.vram_bytes // 2) + 5)


@then("the commit succeeds with a seal record that checks with the worker token")
def _commit_ok(running: dict[str, Running], ctx: dict[str, Any]) -> None:
    r = ctx["response"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["digest"] == ctx["expected"]
    assert check_seal_record(body["seal"], running["w"].token).shard_id == body["shard_id"]


@then(parsers.parse("the worker is ready with {n:d} model"))
def _ready(running: dict[str, Running], n: int) -> None:
    body = running["w"].client.get("/worker/ready").json()
    assert body["ready"] is True and body["state"] == "Ready"
    assert len(body["models"]) == n and len(body["seals"]) == n


@then(parsers.parse('the response is {status:d} with code "{code}"'))
def _error(ctx: dict[str, Any], status: int, code: str) -> None:
    if "response" in ctx:
        got_status, body = ctx["response"].status_code, ctx["response"].json()
    else:
        got_status, body = ctx["status"], ctx["result"]
    assert got_status == status and body["code"] == code


@then("the worker holds no sealed shard")
def _no_shard(running: dict[str, Running]) -> None:
    assert running["w"].worker.manager.shards() == []
    assert running["w"].client.get("/worker/ready").json()["models"] == []


@then("the stream has the events started, token, metrics and end in order")
def _events(ctx: dict[str, Any]) -> None:
    assert ctx["status"] == 200
    names = [e for e, _ in ctx["result"]]
    assert names[0] == "started" and names[-2:] == ["metrics", "end"]
    assert set(names[1:-2]) == {"token"} and len(names) > 3


@then("the started event reports every shard verified")
def _verified(running: dict[str, Running], ctx: dict[str, Any]) -> None:
    started = ctx["result"][0][1]
    shards = running["w"].worker.manager.shards()
    assert started["verified"]["shards"] == len(shards)
    assert started["verified"]["bytes"] == sum(s.vram_bytes for s in shards)


@then("the end event holds a unit-length embedding")
def _embedding(ctx: dict[str, Any]) -> None:
    end = ctx["result"][-1][1]
    assert end["kind"] == "embedding"
    assert abs(float(np.linalg.norm(end["embedding"])) - 1.0) < 1e-5


@then("the end event counts one generated token per token event")
def _generated(ctx: dict[str, Any]) -> None:
    end = ctx["result"][-1][1]
    tokens = [d for e, d in ctx["result"] if e == "token"]
    assert end["kind"] == "generation" and end["tokens_out"] == len(tokens) > 0
    assert end["text"].startswith("".join(d["t"] for d in tokens))


@then("the worker is Stopped and not ready")
def _stopped(running: dict[str, Running]) -> None:
    body = running["w"].client.get("/worker/ready").json()
    assert body["state"] == "Stopped" and body["ready"] is False
    assert body["incident"]["error_type"] == "SealVerificationFailed"


@then("the audit log holds the failed verification and the security incident")
def _audited(running: dict[str, Running]) -> None:
    w = running.pop("w")
    path, token = w.audit_path, w.token
    w.close()
    events = [(r["event"], r["critical"]) for r in audit_events(path)]
    assert ("SealVerificationFailed", True) in events
    assert ("SecurityIncident", True) in events
    assert verify_log([path], token).ok


@then(parsers.parse('further executions are refused with code "{code}"'))
def _refused(running: dict[str, Running], code: str) -> None:
    for prompt in ("again", "and again"):
        status, body = execute(running["w"].client, prompt=prompt)
        assert status == 503 and body["code"] == code


# -- the contract's params, seeds and cancel (generator.feature) ----------------------------------
def _tokens(w: Running, prompt: str, n: int, temperature: float, seed: int) -> list[str]:
    body = {"prompt": prompt, "params": {"max_tokens": n, "temperature": temperature, "seed": seed}}
    with w.client.stream("POST", "/worker/execute", json=body) as r:
        assert r.status_code == 200
        return [d["t"] for e, d in _sse(r.iter_lines()) if e == "token"]


def _sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    import json

    event = ""
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])


@when(
    parsers.parse(
        'a client generates {n:d} tokens from "{prompt}" at temperature {t:f} with seed {seed:d}, twice'
    )
)
def _seeded(
    running: dict[str, Running], ctx: dict[str, Any], n: int, prompt: str, t: float, seed: int
) -> None:
    w = running["w"]
    ctx["seeded"] = (prompt, n, t)
    ctx["runs"] = [_tokens(w, prompt, n, t, seed) for _ in range(2)]


@then("both streams hold the same tokens")
def _same(ctx: dict[str, Any]) -> None:
    a, b = ctx["runs"]
    assert a == b and len(a) > 0


@then(parsers.parse("a generation with seed {seed:d} holds other tokens"))
def _other(running: dict[str, Running], ctx: dict[str, Any], seed: int) -> None:
    prompt, n, t = ctx["seeded"]
    assert _tokens(running["w"], prompt, n, t, seed) != ctx["runs"][0]


@when(parsers.parse("a client cancels its generation by job id after {k:d} tokens"))
def _cancel(running: dict[str, Running], ctx: dict[str, Any], k: int) -> None:
    w = running["w"]
    body = {"job_id": "bdd-cancel", "prompt": "x", "params": {"max_tokens": 1500}}
    events: list[tuple[str, dict[str, Any]]] = []
    with w.client.stream("POST", "/worker/execute", json=body) as r:
        for event, data in _sse(r.iter_lines()):
            events.append((event, data))
            if event == "token" and data["i"] == k - 1:
                assert w.client.post("/worker/cancel", json={"job_id": "bdd-cancel"}).json()["cancelled"]
    ctx["events"] = events


@then(parsers.parse('the stream ends with an error "{code}" and no end event'))
def _ends_with_error(ctx: dict[str, Any], code: str) -> None:
    events = ctx["events"]
    assert events[-1][0] == "error" and events[-1][1]["code"] == code
    assert "end" not in [e for e, _ in events]


@then("fewer tokens were sent than asked for")
def _fewer(ctx: dict[str, Any]) -> None:
    assert sum(e == "token" for e, _ in ctx["events"]) < 1500
