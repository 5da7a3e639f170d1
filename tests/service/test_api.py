"""The worker API over real HTTP: a uvicorn server on 127.0.0.1 with an ephemeral port."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.service_helpers import HELLO_WORLD_REFERENCE, Running, audit_events, execute, tiny_bert
from vram_residency import check_seal_record
from vram_residency.audit.verify import verify_log
from vram_residency.formats import digest
from vram_residency.service.api.errors import AUTH_FAILED_BODY, ErrorCode

WORKER_PATHS = [
    ("POST", "/worker/plan", {"vram_bytes": 1}),
    ("POST", "/worker/commit", {"model": "all-minilm-l6-v2"}),
    ("GET", "/worker/ready", None),
    ("POST", "/worker/execute", {"prompt": "hi"}),
    ("POST", "/worker/verify", {}),
    ("DELETE", "/worker/shards/shard-" + "0" * 32, None),
    ("GET", "/no/such/path", None),
]


# -- public endpoints ----------------------------------------------------------------------------
def test_health_needs_no_token_and_says_emulation(shared: Running) -> None:
    r = httpx.get(shared.url + "/health")
    assert r.status_code == 200
    assert r.json() == {
        "status": "ok",
        "state": "Ready",
        "backend": "host",
        "emulated": True,
        "pre_verify": True,
        "audit_head_mismatch": None,  # the signed head vouched for the audit log at start
    }
    # HEAD, as load balancers probe: the same status, no body, no token.
    head = httpx.head(shared.url + "/health")
    assert head.status_code == 200 and head.content == b""


def test_head_wherever_get_and_allow_lists_both(shared: Running) -> None:
    # RFC 9110 (9.3.2): HEAD is GET without the body, on every resource that answers GET, behind
    # the same token; (15.5.6) a 405's Allow lists every method the resource supports.
    for path in ("/worker/ready", "/metrics", "/worker/audit/head", "/openapi.json"):
        get = shared.client.get(path)
        head = shared.client.head(path)
        assert (head.status_code, head.content) == (200, b""), path
        assert head.headers["content-type"] == get.headers["content-type"], path
    assert httpx.head(shared.url + "/worker/ready").status_code == 401  # no token
    r = shared.client.post("/health")
    assert r.status_code == 405 and r.json()["code"] == "INVALID_PARAMS"
    assert sorted(m.strip() for m in r.headers["allow"].split(",")) == ["GET", "HEAD"]
    r = shared.client.head("/worker/execute")
    assert r.status_code == 405 and r.headers["allow"] == "POST"  # no GET, so no HEAD either


def test_metrics_need_no_token_by_default(shared: Running) -> None:
    r = httpx.get(shared.url + "/metrics")
    assert r.status_code == 200
    text = r.text
    for name in (
        "vram_seals_total",
        "vram_sealed_bytes_total",
        'vram_verifications_total{result="passed",trigger="commit"}',
        "vram_verify_seconds_bucket",
        "vram_free_bytes",
        "vram_used_bytes",
        'vram_worker_state{state="Ready"} 1.0',
        "vram_pre_verify_enabled 1.0",
        'vram_backend_info{backend="host",emulated="true"}',
    ):
        assert name in text, name
    # Nothing that names a model, a shard or a digest.
    assert "shard-" not in text and "minilm" not in text


def test_job_failure_and_cancel_counters_exist_before_the_first_one(
    worker_factory: Callable[..., Running],
) -> None:
    # WORKER-4800s: jobs failed is a metric from the start. A labelled counter has no series
    # until a label is used: a scraper would see no worker_jobs_failed_total at all (no data,
    # not 0) until the first failure, and rate() or absent()-based alerts misread it.
    text = httpx.get(worker_factory().url + "/metrics").text
    for code in ErrorCode:
        assert f'worker_jobs_failed_total{{code="{code.value}"}} 0.0' in text, code
    for reason in ("request", "disconnect"):
        assert f'worker_jobs_cancelled_total{{reason="{reason}"}} 0.0' in text, reason


def test_openapi_error_body_names_every_code(shared: Running) -> None:
    # WORKER-4950s: the codes are stable, so a client generated from the schema must learn all
    # of them: the contract's seven, this worker's additions, and attest's RATE_LIMITED.
    schema = shared.client.get("/openapi.json").json()
    described = schema["components"]["schemas"]["ErrorBody"]["properties"]["code"]["description"]
    for code in [*(c.value for c in ErrorCode), "RATE_LIMITED"]:
        assert code in described, code


def test_metrics_auth_option(worker_factory: Callable[..., Running]) -> None:
    w = worker_factory(metrics_auth=True)
    assert httpx.get(w.url + "/metrics").status_code == 401
    assert w.client.get("/metrics").status_code == 200


def test_openapi_schema_is_served(shared: Running) -> None:
    schema = shared.client.get("/openapi.json").json()
    paths = schema["paths"]
    for p in (
        "/worker/plan",
        "/worker/commit",
        "/worker/ready",
        "/worker/execute",
        "/worker/verify",
        "/worker/shards/{shard_id}",
        "/metrics",
        "/health",
    ):
        assert p in paths
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "text/event-stream" in paths["/worker/execute"]["post"]["responses"]["200"]["content"]


# -- authentication ------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "body"), WORKER_PATHS)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-wrong-token-wrong"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer x"},
    ],
)
def test_worker_endpoints_refuse_without_the_token(
    shared: Running, method: str, path: str, body: object, headers: dict[str, str]
) -> None:
    r = httpx.request(method, shared.url + path, json=body, headers=headers)
    assert r.status_code == 401
    assert r.json() == AUTH_FAILED_BODY  # the contract's envelope, no detail at all
    assert r.headers["www-authenticate"] == "Bearer"


def test_wrong_scheme_with_right_token_is_refused(shared: Running) -> None:
    r = httpx.get(shared.url + "/worker/ready", headers={"Authorization": f"Token {shared.token}"})
    assert r.status_code == 401


def test_two_authorization_headers_are_refused(shared: Running) -> None:
    headers = [("Authorization", f"Bearer {shared.token}"), ("Authorization", f"Bearer {shared.token}")]
    r = httpx.get(shared.url + "/worker/ready", headers=headers)
    assert r.status_code == 401


def test_auth_comes_before_parsing(shared: Running) -> None:
    # A malformed body without the token gets 401, not a 400 that describes the schema.
    r = httpx.post(
        shared.url + "/worker/execute", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 401
    assert r.json() == AUTH_FAILED_BODY


@pytest.mark.parametrize(
    ("path", "raw", "fragment"),
    [
        # Two values for one key: a proxy or a signer that reads the first and a worker that reads
        # the last would act on different requests. Refused, whichever route and nesting level.
        ("/worker/plan", b'{"model_ref":"a","model_ref":"b"}', "duplicate key 'model_ref'"),
        (
            "/worker/execute",
            b'{"prompt":"hi","params":{"max_tokens":1,"max_tokens":4096}}',
            "duplicate key 'max_tokens'",
        ),
        ("/worker/commit", b'{"model":"x","model":"all-minilm-l6-v2"}', "duplicate key 'model'"),
        # NaN and Infinity are not JSON (RFC 8259), though Python's json module reads them.
        ("/worker/execute", b'{"prompt":"hi","params":{"temperature":NaN}}', "NaN"),
        ("/worker/plan", b'{"vram_bytes":-Infinity}', "-Infinity"),
    ],
)
def test_ambiguous_json_bodies_are_refused(shared: Running, path: str, raw: bytes, fragment: str) -> None:
    r = shared.client.post(path, content=raw, headers={"content-type": "application/json"})
    body = r.json()
    assert r.status_code == 400 and body["code"] == "INVALID_PARAMS", body
    assert fragment in body["message"] and body["retry_after_ms"] is None


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", "text/json", None]
)
def test_a_body_that_is_not_declared_json_is_415(shared: Running, content_type: str | None) -> None:
    # curl -d without -H 'Content-Type: application/json' sends form encoding, and FastAPI reads
    # no body without a JSON content type as JSON: the answer says what to send, instead of
    # "Input should be a valid dictionary" about a body that is one.
    headers = {"content-type": content_type} if content_type else {}
    r = shared.client.post("/worker/plan", content=b'{"vram_bytes": 1}', headers=headers)
    body = r.json()
    assert r.status_code == 415 and body["code"] == "INVALID_PARAMS", body
    assert "application/json" in body["message"] and body["retry_after_ms"] is None
    # Only bodies the API reads are checked: a GET with some body is still just a GET.
    odd = shared.client.request("GET", "/worker/ready", content=b"x", headers={"content-type": "text/plain"})
    assert odd.status_code == 200, odd.text
    # JSON with parameters, and a +json type, are read as JSON.
    for ct in ("application/json; charset=utf-8", "application/vnd.x+json"):
        ok = shared.client.post("/worker/plan", content=b'{"vram_bytes": 1}', headers={"content-type": ct})
        assert ok.status_code == 200, (ct, ok.text)


def test_the_same_json_once_is_still_read(shared: Running) -> None:
    # The strict reading changes nothing for ordinary bodies: escapes, unicode, nesting, numbers.
    raw = json.dumps({"prompt": 'h\u00e9 "x" \U0001f600', "params": {"max_tokens": 2, "seed": 7}})
    status, events = execute(shared.client, **json.loads(raw))
    r = shared.client.post(
        "/worker/execute", content=raw.encode(), headers={"content-type": "application/json"}
    )
    assert status == 200 and r.status_code == 200, r.text
    assert r.text.count("event: token") == sum(e == "token" for e, _ in events)


# -- ready, plan, verify -------------------------------------------------------------------------
def test_ready_lists_models_and_seal_records_that_check(shared: Running) -> None:
    r = shared.client.get("/worker/ready")
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] is True and body["state"] == "Ready"
    assert body["emulated"] is True and "EMULATION" in body["backend_description"]
    (model,) = body["models"]
    assert model["name"] == "all-minilm-l6-v2"
    assert model["executable"] is True and model["kind"] == "embedding"
    assert set(model["side_files_sha256"]) >= {"config.json", "tokenizer.json"}
    (record,) = body["seals"]
    shard = check_seal_record(record, shared.token)  # the orchestrator's check, with the token
    assert shard.shard_id == model["shard_id"]
    assert shard.digest == model["digest"]


def test_plan_for_a_model_and_for_a_size(shared: Running) -> None:
    r = shared.client.post("/worker/plan", json={"model": "all-minilm-l6-v2"})
    assert r.status_code == 200
    p = r.json()
    assert p["model_bytes"] == 90868376
    assert p["needed_bytes"] >= p["model_bytes"] and p["needed_bytes"] % 256 == 0
    assert p["fits"] is True and p["available_bytes"] <= p["total_bytes"]
    big = shared.client.post("/worker/plan", json={"vram_bytes": 1 << 50}).json()
    assert big["fits"] is False
    assert shared.client.post("/worker/plan", json={}).json()["code"] == "INVALID_PARAMS"
    assert shared.client.post("/worker/plan", json={"model": None}).status_code == 400
    both = shared.client.post("/worker/plan", json={"model": "all-minilm-l6-v2", "vram_bytes": 5})
    assert both.status_code == 400
    missing = shared.client.post("/worker/plan", json={"model": "no-such-model"})
    assert missing.status_code == 404 and missing.json()["code"] == "INVALID_PARAMS"


def test_verify_all_and_one(shared: Running) -> None:
    r = shared.client.post("/worker/verify", json={})
    assert r.status_code == 200
    assert r.json()["verified"] is True and r.json()["shards"] == 1
    shard_id = shared.client.get("/worker/ready").json()["models"][0]["shard_id"]
    one = shared.client.post("/worker/verify", json={"shard_id": shard_id})
    assert one.status_code == 200 and one.json()["bytes"] == 90868376
    unknown = shared.client.post("/worker/verify", json={"shard_id": "shard-" + "f" * 32})
    assert unknown.status_code == 404


# -- execute -------------------------------------------------------------------------------------
def test_execute_streams_started_tokens_metrics_end(shared: Running) -> None:
    status, events = execute(shared.client, prompt="hello world", job_id="job-1")
    assert status == 200
    names = [e for e, _ in events]
    assert names == ["started", "token", "token", "token", "token", "metrics", "end"]
    started = events[0][1]
    assert started["job_id"] == "job-1" and started["kind"] == "embedding"
    assert started["verified"]["shards"] == 1 and started["verified"]["bytes"] == 90868376
    assert [d["t"] for e, d in events if e == "token"] == ["[CLS]", "hello", "world", "[SEP]"]
    metrics = events[-2][1]
    assert metrics["verify_ms"] > 0 and metrics["pre_verify"] is True and metrics["tokens_in"] == 4
    end = events[-1][1]
    vec = np.array(end["embedding"])
    assert end["dimension"] == 384 and vec.shape == (384,)
    assert abs(np.linalg.norm(vec) - 1) < 1e-5
    # The published reference embedding of "hello world" for all-MiniLM-L6-v2.
    np.testing.assert_allclose(vec[:5], HELLO_WORLD_REFERENCE, atol=1e-4)


def test_execute_every_job_is_preceded_by_a_verification(shared: Running) -> None:
    def count() -> float:
        text = httpx.get(shared.url + "/metrics").text
        for line in text.splitlines():
            if line.startswith('vram_verifications_total{result="passed",trigger="execute"}'):
                return float(line.split()[-1])
        return 0.0

    before = count()
    status, events = execute(shared.client, prompt="one more")
    assert status == 200
    assert count() == before + 1
    assert events[0][1]["verified"]["shards"] == 1


def test_execute_validation(shared: Running) -> None:
    c = shared.client
    assert execute(c, prompt="")[1]["code"] == "INVALID_PARAMS"
    assert execute(c, prompt="   ")[0] == 400
    assert execute(c, prompt="x", model="not-committed")[0] == 404
    assert execute(c, prompt="x", temperature=0.5)[0] == 400  # extra fields are refused
    assert execute(c, prompt="x", max_tokens=1)[0] == 200  # the contract allows 1: [CLS] and [SEP]
    r = c.post("/worker/execute", content=b"{bad", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "INVALID_PARAMS"


def test_execute_max_tokens_truncates_input(shared: Running) -> None:
    status, events = execute(shared.client, prompt="one two three four five six", max_tokens=4)
    assert status == 200
    assert [d["t"] for e, d in events if e == "token"] == ["[CLS]", "one", "two", "[SEP]"]


def test_body_limit(shared: Running) -> None:
    # Execute takes what a prompt at the character limit can need (12 bytes a character, escaped);
    # a body above even that is refused before it is parsed.
    big = json.dumps({"prompt": "x" * 1_300_000}).encode()
    r = shared.client.post("/worker/execute", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "INVALID_PARAMS"

    def chunks() -> Iterator[bytes]:
        for _ in range(192):
            yield b"x" * 8192  # no Content-Length: chunked transfer, counted as it arrives

    r = shared.client.post("/worker/execute", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = shared.client.post(
        "/worker/verify", content=b"x" * 300_000, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413


def test_an_oversized_body_gets_its_413_not_a_reset(shared: Running) -> None:
    # The worker answers 413 before the body is all in; closing with the rest unread would reset
    # the connection, and the client would never see the answer. Each round: a keep-alive request
    # first (the worker's read buffer is then warm), then a body just over the limit.
    seen: dict[str, int] = {}
    for _ in range(20):
        with httpx.Client(base_url=shared.url, headers={"Authorization": f"Bearer {shared.token}"}) as c:
            c.get("/worker/ready")
            try:
                r = c.post(
                    "/worker/plan", content=b" " * (2 << 20), headers={"content-type": "application/json"}
                )
                key = str(r.status_code)
            except httpx.TransportError as exc:
                key = type(exc).__name__
            seen[key] = seen.get(key, 0) + 1
    assert seen == {"413": 20}


# -- commit and deallocate -----------------------------------------------------------------------
def test_commit_from_model_dir_execute_and_deallocate(
    worker_factory: Callable[..., Running], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    tiny_bert(models / "tiny")
    expected = digest((models / "tiny" / "model.safetensors").read_bytes()).hex()
    w = worker_factory(model_dir=models)
    assert w.client.get("/worker/ready").json()["state"] == "Starting"  # nothing committed yet
    assert execute(w.client, prompt="x")[1]["code"] == "WORKER_NOT_READY"
    r = w.client.post(
        "/worker/commit", json={"model": "tiny", "expected_digest": f"sha256-tree-v1:{expected}"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["digest"] == expected and body["executable"] is True
    assert check_seal_record(body["seal"], w.token).shard_id == body["shard_id"]
    status, events = execute(w.client, prompt="hello world")
    assert status == 200 and events[-1][1]["dimension"] == 32
    again = w.client.post("/worker/commit", json={"model": "tiny"})
    assert again.status_code == 409
    free_before = w.client.post("/worker/plan", json={"vram_bytes": 1}).json()["available_bytes"]
    d = w.client.delete(f"/worker/shards/{body['shard_id']}")
    assert d.status_code == 200 and d.json()["deallocated"] is True
    free_after = w.client.post("/worker/plan", json={"vram_bytes": 1}).json()["available_bytes"]
    assert free_after - free_before >= body["vram_bytes"]
    assert w.client.delete(f"/worker/shards/{body['shard_id']}").status_code == 404
    assert execute(w.client, prompt="x", model="tiny")[0] == 404
    assert w.client.get("/worker/ready").json()["models"] == []
    events_seen = [e["event"] for e in audit_events(w.audit_path)]
    assert "ModelCommitted" in events_seen and "VramDeallocated" in events_seen


def test_commit_expected_digest_mismatch_leaves_nothing(
    worker_factory: Callable[..., Running], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    tiny_bert(models / "tiny")
    w = worker_factory(model_dir=models)
    free = w.client.post("/worker/plan", json={"vram_bytes": 1}).json()["available_bytes"]
    r = w.client.post("/worker/commit", json={"model": "tiny", "expected_digest": "ab" * 32})
    assert r.status_code == 422 and r.json()["code"] == "MODEL_LOAD_FAILED"
    assert w.client.post("/worker/plan", json={"vram_bytes": 1}).json()["available_bytes"] == free
    assert w.client.get("/worker/ready").json()["models"] == []


def test_commit_refuses_names_that_escape(worker_factory: Callable[..., Running], tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    outside = tiny_bert(tmp_path / "outside")
    tiny_bert(models / "inner")
    (models / "escape").symlink_to(outside)  # a symlink out of the directory
    (models / "alias").symlink_to(models / "inner")  # a symlink that stays inside is fine
    (models / "sub").mkdir()
    (models / "sub" / "up").symlink_to("../..")
    w = worker_factory(model_dir=models)
    for name, status in [
        ("../outside", 400),
        ("/etc/passwd", 400),
        ("sub/../../outside", 400),
        ("escape", 400),
        ("sub/up/outside", 400),
        (".hidden", 400),
        ("nope", 404),
    ]:
        r = w.client.post("/worker/commit", json={"model": name})
        assert r.status_code == status, (name, r.text)
        assert r.json()["code"] == "INVALID_PARAMS"
    assert w.client.post("/worker/commit", json={"model": "alias"}).status_code == 200


def test_commit_of_a_model_without_executor(worker_factory: Callable[..., Running], tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "blob.bin").write_bytes(os.urandom(4096))
    w = worker_factory(model_dir=models)
    r = w.client.post("/worker/commit", json={"model": "blob.bin"})
    assert r.status_code == 200 and r.json()["executable"] is False
    assert w.client.post("/worker/verify", json={}).status_code == 200
    status, body = execute(w.client, prompt="x")
    assert status == 400 and "not executable" in body["message"]


def test_commit_too_big_is_vram_oom(worker_factory: Callable[..., Running], tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "big.bin").write_bytes(b"\1" * (2 << 20))
    w = worker_factory(model_dir=models, capacity_bytes=1 << 20)
    r = w.client.post("/worker/commit", json={"model": "big.bin"})
    assert r.status_code == 507 and r.json()["code"] == "VRAM_OOM"
    assert r.json()["retriable"] is True


def test_two_apps_keep_separate_metrics(worker_factory: Callable[..., Running]) -> None:
    a = worker_factory()
    b = worker_factory()
    execute(a.client, prompt="only on a")
    text_b = httpx.get(b.url + "/metrics").text
    assert 'vram_executions_total{result="ok"}' not in text_b


def test_audit_chain_verifies_after_a_session(worker_factory: Callable[..., Running]) -> None:
    w = worker_factory()
    for i in range(3):
        assert execute(w.client, prompt=f"sentence {i}")[0] == 200
    path, token = w.audit_path, w.token
    w.close()
    report = verify_log([path], token)
    assert report.ok, report.first_break
    names = [e["event"] for e in audit_events(path)]
    assert names.count("SealVerified") >= 4  # commit + three executions
    assert "ServiceStarted" in names and "ModelCommitted" in names


def test_server_binds_loopback_only(shared: Running) -> None:
    assert shared.server.host == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", shared.server.port), timeout=5):
        pass
