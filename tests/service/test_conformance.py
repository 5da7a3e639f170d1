"""Conformance with llama-orch's worker API (``shared/specs/worker-api.md``): one test per
requirement (named after its id or id range), over real HTTP against a real ``serve`` process.

The module's worker starts with a model directory holding the generated example model and
nothing committed, so the tests run in file order: not ready -> commit -> ready -> execute.
Lifecycle, configuration and callbacks each need a process of their own (they stop it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.service.serve_process import (
    Receiver,
    ServeProcess,
    clean_env,
    execute,
    run_serve,
    sse,
    write_token,
)
from vram_residency.formats.tree import SHA256_TREE_V1
from vram_residency.service.context import fp6
from vram_residency.service.executors.example_model import EXAMPLE_NAMES, ensure_example

NEEDS_MINILM = False
MODEL = EXAMPLE_NAMES["small"]
AUTH_FAILED_BODY = {
    "code": "AUTH_FAILED",
    "message": "missing or invalid bearer token",
    "retriable": False,
    "retry_after_ms": None,
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("conformance")
    models = tmp / "models"
    gen = ensure_example(models / MODEL, "small", SHA256_TREE_V1)
    key = Ed25519PrivateKey.generate()
    pub = tmp / "commit-key.pem"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    raw = models / "blob.bin"  # a raw file: sealable, not executable
    raw.write_bytes(hashlib.shake_256(b"raw").digest(200_000))
    w = run_serve(
        tmp / "w",
        "--model-dir",
        str(models),
        "--max-models",
        "3",
        "--commit-signing-key",
        str(pub),
        "--scrub-interval",
        "0",
    )
    yield {"w": w, "models": models, "weights": gen.directory / "model.safetensors", "key": key, "tmp": tmp}
    assert w.stop() == 0


def _w(env: dict[str, Any]) -> ServeProcess:
    w: ServeProcess = env["w"]
    return w


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _spec_commit(model_ref: str, shard_id: str, path: Path) -> dict[str, Any]:
    """A commit as the contract writes it: every field of 4221, the digest as sha256sum prints it."""
    return {
        "model_ref": model_ref,
        "shard_id": shard_id,
        "shard_index": 0,
        "model_bytes": str(path),
        "expected_digest": _sha256(path),
    }


# -- authentication (4200-4203, 4202/4822, 4910-4913, 4812) --------------------------------------
def test_worker_4200_4203_every_endpoint_needs_the_bearer_token(env: dict[str, Any]) -> None:
    w = _w(env)
    for method, path in [
        ("GET", "/worker/ready"),
        ("POST", "/worker/plan"),
        ("POST", "/worker/commit"),
        ("POST", "/worker/execute"),
        ("POST", "/worker/cancel"),
        # Not in the contract, so not among its two open endpoints: the schema too needs the token.
        ("GET", "/openapi.json"),
    ]:
        assert httpx.request(method, w.url + path, json={}).status_code == 401
        bad = httpx.request(method, w.url + path, json={}, headers={"Authorization": "Bearer nope"})
        # 4950-4952: the 401 is an error like any other, in the contract's envelope (a client
        # that parses {code, message, retriable, retry_after_ms} must be able to parse it too),
        # and it says nothing about why the token did not match.
        assert bad.status_code == 401 and bad.json() == AUTH_FAILED_BODY
    assert httpx.get(w.url + "/health").status_code == 200  # the one open endpoint


def test_worker_4812_metrics_stay_open_for_scraping(env: dict[str, Any]) -> None:
    r = httpx.get(_w(env).url + "/metrics")
    assert r.status_code == 200 and "worker_jobs_started" in r.text


def test_worker_4202_4822_fp6_breadcrumb_and_never_the_token(env: dict[str, Any]) -> None:
    assert fp6("test") == "9f86d0"  # the contract's known answer
    w = _w(env)
    w.client.get("/worker/ready")
    time.sleep(0.2)
    log = w.log()
    assert f'fp6="{fp6(w.token)}"' in log
    assert w.token not in log


def test_worker_4910_4913_token_from_a_file_and_fail_fast_when_missing(tmp_path: Path) -> None:
    cfg = tmp_path / "worker.json"
    cfg.write_text(json.dumps(_spec_config(tmp_path, tmp_path / "no-such-token", "http://127.0.0.1:9/cb")))
    r = _serve_config(cfg)
    assert r.returncode != 0 and "no-such-token" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "listening" not in r.stdout


# -- readiness before commit (4227, 4031) --------------------------------------------------------
def test_worker_4227_4031_not_ready_before_a_successful_commit(env: dict[str, Any]) -> None:
    w = _w(env)
    body = w.client.get("/worker/ready").json()
    assert body["ready"] is False and body["handles"] == [] and body["state"] == "Starting"
    status, events, _ = execute(w.client, {"prompt": "x"})
    assert status == 503 and events[0][1]["code"] == "WORKER_NOT_READY"
    # A failed commit leaves it where a retry can leave (not stuck in Loading).
    bad = w.client.post(
        "/worker/commit", json={"model_ref": MODEL, "shard_id": "s", "expected_digest": "0" * 64}
    )
    assert bad.status_code == 422 and bad.json()["code"] == "MODEL_LOAD_FAILED"
    assert w.client.get("/worker/ready").json()["state"] == "Starting"


# -- plan (4210-4214) ----------------------------------------------------------------------------
def test_worker_4210_4214_plan_answers_feasible_vram_and_shard_plan(env: dict[str, Any]) -> None:
    w = _w(env)
    r = w.client.post("/worker/plan", json={"model_ref": MODEL, "shard_layout": "single", "tp_degree": 1})
    assert r.status_code == 200, r.text
    p = r.json()
    size = env["weights"].stat().st_size
    assert p["feasible"] is True and p["vram_required"] >= size
    assert p["shard_plan"] == [{"shard_index": 0, "vram_bytes": p["vram_required"], "gpu_device": 0}]
    # Capability check: a raw blob has no executor here.
    raw = w.client.post("/worker/plan", json={"model_ref": "blob.bin", "shard_layout": "single"}).json()
    assert raw["feasible"] is False and "raw" in raw["reason"]
    tp = w.client.post(
        "/worker/plan", json={"model_ref": MODEL, "shard_layout": "tensor_parallel", "tp_degree": 2}
    )
    assert tp.status_code == 200 and tp.json()["feasible"] is False and "tensor" in tp.json()["reason"]
    missing = w.client.post("/worker/plan", json={"model_ref": MODEL, "shard_layout": "tensor_parallel"})
    assert missing.status_code == 200 and "tp_degree" in missing.json()["reason"]
    # A model this worker does not have, by any reference an orchestrator uses (its bytes come
    # with the commit): a plan that is not feasible, with the reason, never an error for the
    # request's shape ("A spec-shaped request must never be refused for its shape").
    for ref in ("no-such-model", "hf:org/some-repo", "file:/models/x.gguf", "../outside"):
        r = w.client.post("/worker/plan", json={"model_ref": ref, "shard_layout": "single"})
        assert r.status_code == 200, r.text
        p = r.json()
        assert p["feasible"] is False and p["shard_plan"] == [] and p["vram_required"] == 0
        assert "model_bytes" in p["reason"], p
    # A control character in a reference is refused (it would forge log lines).
    bad = w.client.post("/worker/plan", json={"model_ref": "a\nb", "shard_layout": "single"})
    assert bad.status_code == 400 and bad.json()["code"] == "INVALID_PARAMS"


# -- commit (4220-4227, 4110-4113) ---------------------------------------------------------------
def test_worker_4223_4113_bare_hex_digest_is_sha256(env: dict[str, Any]) -> None:
    w = _w(env)
    weights: Path = env["weights"]
    # expected_digest is what sha256sum prints.
    r = w.client.post("/worker/commit", json=_spec_commit(MODEL, "shard-0", weights))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sealed"] is True
    h = body["handle"]
    assert h["shard_id"] == "shard-0" and h["digest"] == _sha256(weights) and h["sealed"] is True
    assert set(h) >= {
        "shard_id",
        "gpu_device",
        "vram_bytes",
        "sealed",
        "digest",
        "model_ref",
        "shard_index",
        "total_shards",
    }
    assert h["model_ref"] == MODEL and h["shard_index"] == 0 and h["total_shards"] == 1


def test_worker_4220_4221_commit_takes_bytes_and_prefixed_digests(env: dict[str, Any]) -> None:
    w = _w(env)
    data = b"\x00" * 4096
    r = w.client.post(
        "/worker/commit",
        json={
            "model_ref": "inline",
            "shard_id": "inline-0",
            "model_bytes": {"base64": base64.b64encode(data).decode()},
            "expected_digest": hashlib.sha256(data).hexdigest(),
        },
    )
    assert r.status_code == 200, r.text
    assert w.client.delete("/worker/shards/inline-0").status_code == 200
    wrong = w.client.post(
        "/worker/commit", json={"model_ref": "blob.bin", "expected_digest": "blake3:" + "0" * 64}
    )
    assert wrong.status_code == 422 and wrong.json()["code"] == "MODEL_LOAD_FAILED"
    outside = w.client.post("/worker/commit", json={"model_ref": "x", "model_bytes": "/etc/passwd"})
    assert outside.status_code == 403 and "outside" in outside.json()["message"]


def test_worker_4221_model_ref_is_any_reference_when_the_bytes_are_given(env: dict[str, Any]) -> None:
    # model_ref is "str" in the contract: with model_bytes given it names the model, it does not
    # locate it, so an orchestrator's own reference forms (llama-orch writes file:/path and
    # hf:org/repo) are never refused for their shape.
    w = _w(env)
    blob: Path = env["models"] / "blob.bin"
    for ref in ["hf:example-org/Blob-7B-Instruct", "file:/models/blob.bin", "blob 7b (q4)"]:
        r = w.client.post("/worker/commit", json=_spec_commit(ref, "ref-shard", blob))
        assert r.status_code == 200, (ref, r.text)
        assert r.json()["handle"]["model_ref"] == ref
        handles = w.client.get("/worker/ready").json()["handles"]
        assert [h["model_ref"] for h in handles if h["shard_id"] == "ref-shard"] == [ref]
        assert w.client.delete("/worker/shards/ref-shard").status_code == 200
    # Control characters are still refused (they would forge log lines), as is a name that the
    # model directory would have to resolve without bytes.
    for sep in ("\n", "\x85", "\u2028"):
        bad = w.client.post("/worker/commit", json={"model_ref": f"x{sep}y", "model_bytes": str(blob)})
        assert bad.status_code == 400 and bad.json()["code"] == "INVALID_PARAMS", sep
    unresolvable = w.client.post("/worker/commit", json={"model_ref": "hf:org/none", "shard_id": "n"})
    assert unresolvable.status_code == 400 and "model name" in unresolvable.json()["message"]


def test_worker_4113_4223_handle_digest_reads_as_an_expected_digest(env: dict[str, Any]) -> None:
    # 4113/4223: 64 bare hex characters mean SHA-256 of the model bytes. A handle's digest is in
    # the same forms: bare hex only when it is that SHA-256 (a commit with a bare expected_digest),
    # else prefixed by its algorithm, so an orchestrator that commits again with the digest the
    # worker gave it (after a restart, on another worker) gets its bytes checked, not refused.
    w = _w(env)
    blob: Path = env["models"] / "blob.bin"
    r = w.client.post("/worker/commit", json={"model_ref": "blob.bin", "shard_id": "d-0", "shard_index": 0})
    assert r.status_code == 200, r.text
    digest = r.json()["handle"]["digest"]
    assert digest == _sha256(blob) or (":" in digest and digest != _sha256(blob)), digest
    (listed,) = [h for h in w.client.get("/worker/ready").json()["handles"] if h["shard_id"] == "d-0"]
    assert listed["digest"] == digest
    assert w.client.delete("/worker/shards/d-0").status_code == 200
    again = w.client.post(
        "/worker/commit", json={"model_ref": "blob.bin", "shard_id": "d-0", "expected_digest": digest}
    )
    assert again.status_code == 200, again.text
    assert again.json()["handle"]["digest"] == digest
    assert w.client.delete("/worker/shards/d-0").status_code == 200


def test_worker_4221_a_model_bytes_path_with_a_nul_is_invalid_params(env: dict[str, Any]) -> None:
    # A path no file system can hold: bad input (400 INVALID_PARAMS), never a 500 INTERNAL.
    w = _w(env)
    blob = str(env["models"] / "blob.bin")
    for path in (blob + "\x00.txt", "\x00"):
        r = w.client.post("/worker/commit", json={"model_ref": "nul", "shard_id": "nul", "model_bytes": path})
        assert r.status_code == 400 and r.json()["code"] == "INVALID_PARAMS", r.text
        assert "NUL" in r.json()["message"]
    assert w.client.get("/worker/ready").json()["ready"] is True  # nothing changed


def test_worker_4222_signature_is_verified_before_loading(env: dict[str, Any]) -> None:
    w = _w(env)
    blob: Path = env["models"] / "blob.bin"
    digest = _sha256(blob)
    forged = base64.b64encode(Ed25519PrivateKey.generate().sign(bytes.fromhex(digest))).decode()
    r = w.client.post(
        "/worker/commit", json={"model_ref": "blob.bin", "expected_digest": digest, "signature": forged}
    )
    assert r.status_code == 422 and "signature" in r.json()["message"]
    good = base64.b64encode(env["key"].sign(bytes.fromhex(digest))).decode()
    r = w.client.post(
        "/worker/commit",
        json={"model_ref": "blob.bin", "shard_id": "blob", "expected_digest": digest, "signature": good},
    )
    assert r.status_code == 200, r.text
    assert w.client.delete("/worker/shards/blob").status_code == 200


def test_worker_4110_4111_no_device_pointer_in_any_response(env: dict[str, Any]) -> None:
    w = _w(env)
    text = w.client.get("/worker/ready").text
    assert not re.search(r'"(ptr|pointer|device_pointer|vram_ptr)"', text)
    assert not re.search(r"0x[0-9a-f]{8,}", text)


# -- ready (4230-4233) ---------------------------------------------------------------------------
def test_worker_4230_4233_ready_shape(env: dict[str, Any]) -> None:
    body = _w(env).client.get("/worker/ready").json()
    assert body["ready"] is True and body["nccl_group_id"] is None
    (h,) = body["handles"]
    assert h["shard_id"] == "shard-0" and h["last_verified_at"] is not None


# -- execute (4240-4253, 4121-4122, 4999) --------------------------------------------------------
def test_worker_4240_execute_spec_shape_streams_started_tokens_metrics_end(env: dict[str, Any]) -> None:
    status, events, _ = execute(
        _w(env).client,
        {
            "handle_id": "shard-0",
            "prompt": "Hello, world!",
            "params": {"max_tokens": 5, "temperature": 0.7, "seed": 42},
        },
    )
    assert status == 200
    names = [e for e, _ in events]
    assert names[0] == "started" and names[-1] == "end" and names[-2] == "metrics"
    tokens = [d for e, d in events if e == "token"]
    assert [t["i"] for t in tokens] == list(range(len(tokens))) and all("t" in t for t in tokens)
    end = events[-1][1]
    assert end["tokens_out"] == len(tokens) <= 5 and isinstance(end["decode_time_ms"], (int, float))


def test_worker_4121_4122_seals_reverified_before_every_execution(env: dict[str, Any]) -> None:
    _, events, _ = execute(
        _w(env).client, {"handle_id": "shard-0", "prompt": "a", "params": {"max_tokens": 1}}
    )
    verified = events[0][1]["verified"]
    assert verified["shards"] >= 1 and verified["bytes"] >= env["weights"].stat().st_size


def test_worker_4241_4243_limits_nul_and_unknown_params(env: dict[str, Any]) -> None:
    c = _w(env).client
    ok, events, _ = execute(c, {"handle_id": "shard-0", "prompt": "a", "params": {"max_tokens": 1}})
    assert ok == 200 and events[-1][1]["tokens_out"] <= 1  # max_tokens 1 is allowed
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": "a" * 100_001}, "100000"),
        ({"prompt": "a", "params": {"max_tokens": 4097}}, "4096"),
        ({"prompt": "a\x00b"}, "NUL"),
        # Other params are accepted unused (below), within bounds: at most 64, identifier names.
        ({"prompt": "a", "params": {f"p{i}": i for i in range(65)}}, "more than 64 params"),
        ({"prompt": "a", "params": {"p" * 65: 1}}, "not an identifier of at most 64"),
        ({"prompt": "a", "params": {"top-k": 1}}, "not an identifier"),
        ({"prompt": "a", "params": {"x\nforged": 1}}, "not an identifier"),
        # The contract's types: max_tokens and seed are JSON integers, temperature a JSON number;
        # a string or a boolean in their place is refused, not read as a number.
        ({"prompt": "a", "params": {"max_tokens": "5"}}, "max_tokens"),
        ({"prompt": "a", "params": {"max_tokens": True}}, "max_tokens"),
        ({"prompt": "a", "params": {"seed": "7"}}, "seed"),
        ({"prompt": "a", "params": {"temperature": "0.5"}}, "temperature"),
        ({"prompt": "a", "params": {"temperature": True}}, "temperature"),
        # A known param keeps its type beside unknown ones.
        ({"prompt": "a", "params": {"seed": "7", "top_k": 3}}, "seed"),
    ]
    for body, fragment in cases:
        status, events, _ = execute(c, {"handle_id": "shard-0", **body})
        err = events[0][1]
        assert status == 400 and err["code"] == "INVALID_PARAMS" and fragment in err["message"], err


def test_worker_4241_spec_shaped_params_are_accepted_and_named_as_not_used(env: dict[str, Any]) -> None:
    # WORKER-4241's params are "max_tokens, temperature, seed, etc.": an orchestrator's sampler
    # options are a spec-shaped request, never refused for their shape. They are not used, and
    # the started event names them (sorted); the log line names them, never their values.
    w = _w(env)
    c = w.client
    base = {"handle_id": "shard-0", "prompt": "a"}
    ok, events, _ = execute(c, {**base, "params": {"max_tokens": 1}})
    assert ok == 200 and events[0][0] == "started" and events[0][1]["ignored_params"] == []
    secret = "stop-value-never-logged-5e1f"
    params = {
        "max_tokens": 2,
        "seed": 3,
        "top_p": 0.9,
        "top_k": 40,
        "stop": [secret],
        "repetition_penalty": 1.1,
    }
    ok, events, _ = execute(c, {**base, "job_id": "job-ignored-params", "params": params})
    assert ok == 200 and events[-1][0] == "end", events[-1]
    started = events[0][1]
    assert started["ignored_params"] == ["repetition_penalty", "stop", "top_k", "top_p"]
    # The known params still count: max_tokens 2 bounds the tokens.
    assert 1 <= events[-1][1]["tokens_out"] <= 2
    ok, events, _ = execute(c, {**base, "params": {"top_k": 3}})
    assert ok == 200 and events[0][1]["ignored_params"] == ["top_k"]
    time.sleep(0.2)
    log = w.log()
    line = next(ln for ln in log.splitlines() if "job job-ignored-params started" in ln)
    assert "params not used: repetition_penalty, stop, top_k, top_p" in line
    assert secret not in log
    # The schema says so: params is open, with the bounds on names.
    schema = c.get("/openapi.json").json()["components"]["schemas"]["ExecuteParams"]
    assert schema["additionalProperties"] is True
    assert schema["propertyNames"]["maxLength"] == 64


def test_worker_4242_a_prompt_at_the_limit_is_never_refused_for_its_body_size(env: dict[str, Any]) -> None:
    # 100,000 characters is the contract's prompt limit, whatever the characters: JSON as Python's
    # json.dumps writes it by default escapes each astral character to 12 bytes (a surrogate
    # pair), 1.2 MB for the whole prompt, far above the 256 KiB default body limit. The body
    # limit must not cut a valid prompt short (413): the request reaches the prompt's own checks.
    c = _w(env).client
    for n, fragment in [(100_000, "context"), (100_001, "100000")]:
        raw = json.dumps({"handle_id": "shard-0", "prompt": "\U0001f600" * n, "params": {"max_tokens": 1}})
        r = c.post("/worker/execute", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and fragment in r.json()["message"], (n, r.status_code, r.text[:200])
    # Other routes keep the configured limit.
    big = c.post("/worker/plan", content=b" " * (300 * 1024), headers={"Content-Type": "application/json"})
    assert big.status_code == 413


def test_worker_4999_same_seed_same_tokens(env: dict[str, Any]) -> None:
    c = _w(env).client
    body = {
        "handle_id": "shard-0",
        "prompt": "Once upon",
        "params": {"max_tokens": 24, "temperature": 0.9, "seed": 7},
    }
    runs = [[d["t"] for e, d in execute(c, body)[1] if e == "token"] for _ in range(2)]
    other = dict(body, params={"max_tokens": 24, "temperature": 0.9, "seed": 8})
    assert runs[0] == runs[1] and len(runs[0]) > 0
    # Any unsigned 64-bit seed is a seed: the largest too, with the same guarantee.
    top = dict(body, params={"max_tokens": 8, "temperature": 0.9, "seed": 2**64 - 1})
    tops = [[d["t"] for e, d in execute(c, top)[1] if e == "token"] for _ in range(2)]
    assert tops[0] == tops[1] and len(tops[0]) > 0
    assert [d["t"] for e, d in execute(c, other)[1] if e == "token"] != runs[0]
    env["seeded"] = (body, runs[0])  # compared with another process in the drain test


def test_worker_4252_cancel_by_job_id_stops_the_job(env: dict[str, Any]) -> None:
    w = _w(env)
    c = w.client
    body = {"handle_id": "shard-0", "job_id": "job-cancel-me", "prompt": "x", "params": {"max_tokens": 2000}}
    seen: list[tuple[str, dict[str, Any]]] = []
    with c.stream("POST", "/worker/execute", json=body) as r:
        assert r.status_code == 200
        for event, data in sse(r.iter_lines()):
            seen.append((event, data))
            if event == "token" and data["i"] == 3:
                cancel = c.post("/worker/cancel", json={"job_id": "job-cancel-me"})
                assert cancel.json() == {"job_id": "job-cancel-me", "cancelled": True}
    assert seen[-1][0] == "error" and seen[-1][1]["code"] == "CANCELLED"
    assert "end" not in [e for e, _ in seen]
    assert sum(e == "token" for e, _ in seen) < 2000
    assert c.post("/worker/cancel", json={"job_id": "job-cancel-me"}).json()["cancelled"] is False


def test_worker_4253_client_disconnect_cancels_the_job(env: dict[str, Any]) -> None:
    c = _w(env).client
    before = _metric(c, 'worker_jobs_cancelled_total{reason="disconnect"}')
    with c.stream(
        "POST",
        "/worker/execute",
        json={"handle_id": "shard-0", "prompt": "y", "params": {"max_tokens": 2000}},
    ) as r:
        for event, data in sse(r.iter_lines()):
            if event == "token" and data["i"] == 2:
                break  # leave mid-stream
    t0 = time.monotonic()
    while _metric(c, 'worker_jobs_cancelled_total{reason="disconnect"}') <= before:
        assert time.monotonic() - t0 < 20, "the abandoned job was not cancelled"
        time.sleep(0.05)
    t1 = time.monotonic()
    status, _, _ = execute(c, {"handle_id": "shard-0", "prompt": "z", "params": {"max_tokens": 2}})
    assert status == 200 and time.monotonic() - t1 < 20


def _long_job_streaming(
    client: httpx.Client, prompt: str, max_tokens: int, job_id: str | None = None
) -> tuple[threading.Thread, list[str]]:
    """An execute of shard-0 on a thread of its own, returned once its first token has come: the
    thread, and the SSE event names it collects (``end`` last when it is done)."""
    events: list[str] = []

    def long_job() -> None:
        body: dict[str, Any] = {
            "handle_id": "shard-0",
            "prompt": prompt,
            "params": {"max_tokens": max_tokens},
        }
        if job_id is not None:
            body["job_id"] = job_id
        with client.stream("POST", "/worker/execute", json=body) as r:
            events.extend(e for e, _ in sse(r.iter_lines()))

    thread = threading.Thread(target=long_job)
    thread.start()
    t0 = time.monotonic()
    while "token" not in events:
        assert time.monotonic() - t0 < 20
        time.sleep(0.01)
    return thread, events


def test_worker_4253_a_client_gone_while_queued_cancels_before_any_work(env: dict[str, Any]) -> None:
    # A job whose client left while it waited behind another ends in the queue: no verification
    # pass, no start, no tokens for nobody (the scheduler skips a cancelled queued job for free).
    w = _w(env)
    first, events = _long_job_streaming(w.client, "w", 1200)
    impatient = httpx.Client(base_url=w.url, headers={"Authorization": f"Bearer {w.token}"}, timeout=0.5)
    with pytest.raises(httpx.ReadTimeout):
        impatient.post(
            "/worker/execute",
            json={
                "handle_id": "shard-0",
                "job_id": "gone-while-queued",
                "prompt": "v",
                "params": {"max_tokens": 5},
            },
        )
    impatient.close()
    deadline = time.monotonic() + 20
    while "job gone-while-queued cancelled: client disconnected" not in w.log():
        assert time.monotonic() < deadline, "the queued job of a client that left was not cancelled"
        time.sleep(0.05)
    assert first.is_alive(), "the first job ended before the queued one was seen to be cancelled"
    first.join()
    assert events[-1] == "end"
    time.sleep(0.3)
    assert "job gone-while-queued started" not in w.log()


def _jobs_started(w: ServeProcess) -> float:
    m = re.search(r"^worker_jobs_started_total (\S+)$", httpx.get(w.url + "/metrics").text, re.M)
    assert m is not None
    return float(m.group(1))


def test_worker_4240_jobs_batched_together_all_end_with_end(env: dict[str, Any]) -> None:
    # Two jobs queued behind a running one run as one batch when it ends. The one with the long
    # prompt asks for 2 tokens, the other for 60: the first row is finished long before the
    # batch is, and every job must still end with ``end`` (the finished row was stepped past its
    # cache: IndexError, both streams ended with an INTERNAL error).
    w = _w(env)
    before = _jobs_started(w)
    first, events = _long_job_streaming(w.client, "w", 1200, job_id="batch-ahead")
    jobs = {"long-prompt": ("p" * 300, 2), "short-prompt": ("q", 60)}
    got: dict[str, list[tuple[str, dict[str, Any]]]] = {}

    def run(job_id: str) -> None:
        prompt, n = jobs[job_id]
        body = {"handle_id": "shard-0", "job_id": job_id, "prompt": prompt, "params": {"max_tokens": n}}
        got[job_id] = execute(w.client, body)[1]

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while _jobs_started(w) < before + 3:  # the long job and both queued ones
        assert time.monotonic() < deadline and first.is_alive(), "the two jobs were not queued in time"
        time.sleep(0.02)
    # Let the long one go: the two queued jobs start together.
    assert w.client.post("/worker/cancel", json={"job_id": "batch-ahead"}).json()["cancelled"] is True
    first.join(30)
    assert events[-1] == "error"  # CANCELLED
    for t in threads:
        t.join(60)
    for job_id, (_, n) in jobs.items():
        names = [e for e, _ in got[job_id]]
        assert names[0] == "started" and names[-1] == "end", (job_id, got[job_id][-1])
        metrics = dict(got[job_id])["metrics"]
        assert metrics["batch_size"] == 2
        assert dict(got[job_id])["end"]["tokens_out"] <= n


def test_worker_4812_health_and_metrics_answer_while_every_request_thread_waits(env: dict[str, Any]) -> None:
    # /health is what liveness probes ask: it must answer while the worker is busy, also when
    # every thread that serves plain requests waits for the worker (here: deallocations waiting
    # for a long generation to release the execution lock). A probe that times out gets a busy
    # worker restarted by its supervisor.
    w = _w(env)
    runner, events = _long_job_streaming(w.client, "h", 1800)

    def waiting_delete(i: int) -> None:
        with httpx.Client(base_url=w.url, headers={"Authorization": f"Bearer {w.token}"}, timeout=120) as c:
            c.delete(f"/worker/shards/no-such-shard-{i}")

    waiters = [threading.Thread(target=waiting_delete, args=(i,)) for i in range(48)]
    for t in waiters:
        t.start()
    time.sleep(0.5)
    asked_while_running = "end" not in events
    t1 = time.monotonic()
    health = httpx.get(w.url + "/health", timeout=30)
    took = time.monotonic() - t1
    # WORKER-4812: /metrics stays open for scraping, and a scrape that times out while the
    # worker is busy is a gap in exactly the graphs that would show why.
    t2 = time.monotonic()
    metrics = httpx.get(w.url + "/metrics", timeout=30)
    took_metrics = time.monotonic() - t2
    scraped_while_running = "end" not in events
    for t in waiters:
        t.join()
    runner.join()
    assert asked_while_running, "the generation ended before /health was asked: nothing was tested"
    assert health.status_code == 200 and took < 2.0, (health.status_code, took)
    assert health.json()["state"] == "Executing"
    assert metrics.status_code == 200 and took_metrics < 2.0, (metrics.status_code, took_metrics)
    assert scraped_while_running or took_metrics < 2.0
    assert 'vram_worker_state{state="Executing"} 1.0' in metrics.text


def test_worker_4251_job_ownership_is_the_shared_token(env: dict[str, Any]) -> None:
    # One bearer token per worker: whoever holds it may cancel any job (README, "Job ownership").
    c = _w(env).client
    assert c.post("/worker/cancel", json={"job_id": "someone-elses-job"}).json()["cancelled"] is False


def test_worker_4112_4233_max_model_size_fails_fast_and_ready_may_be_public(
    env: dict[str, Any], tmp_path: Path
) -> None:
    w = run_serve(
        tmp_path, "--model-dir", str(env["models"]), "--max-model-bytes", "100000", "--ready-public"
    )
    try:
        r = w.client.post("/worker/commit", json={"model_ref": MODEL, "shard_id": "big"})
        assert r.status_code == 422 and "above this worker's limit of 100000" in r.json()["message"]
        open_ready = httpx.get(w.url + "/worker/ready")  # no token: --ready-public (WORKER-4233)
        assert open_ready.status_code == 200 and open_ready.json()["ready"] is False
    finally:
        assert w.stop() == 0
    # Refused before anything was read or allocated (the log is complete after the stop).
    audit = (tmp_path / "state" / "audit.jsonl").read_text()
    assert "ServiceStarted" in audit and "VramAllocated" not in audit


# -- errors (4950-4952) --------------------------------------------------------------------------
def test_worker_4950_4952_error_body_has_code_message_retriable_retry_after(env: dict[str, Any]) -> None:
    r = _w(env).client.post("/worker/plan", json={"nonsense": 1})
    body = r.json()
    assert r.status_code == 400 and set(body) >= {"code", "message", "retriable", "retry_after_ms"}
    assert body["code"] == "INVALID_PARAMS" and body["retriable"] is False and body["retry_after_ms"] is None


def _raw_http(w: ServeProcess, *parts: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``parts`` one after another on one connection; the answer's status, headers and body
    (the worker closes the connection after it)."""
    host, port = w.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        for part in parts:
            s.sendall(part)
            time.sleep(0.05)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    "parts",
    [
        (b"FOO BAR\r\n\r\n",),  # not an HTTP request line
        (b"POST /worker/plan HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",),
        # A request head larger than the worker reads (16 KiB), arriving in pieces.
        (b"GET /worker/ready HTTP/1.1\r\nHost: x\r\nX-Big: ", b"a" * 20000, b"\r\n\r\n"),
    ],
    ids=["request-line", "content-length", "head-too-large"],
)
def test_worker_4950_a_malformed_http_request_gets_the_error_envelope(
    env: dict[str, Any], parts: tuple[bytes, ...]
) -> None:
    # 4950-4952: every error body is {code, message, retriable, retry_after_ms}; uvicorn's own
    # answer to a request it cannot parse was text/plain "Invalid HTTP request received.".
    status, headers, body = _raw_http(_w(env), *parts)
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "code": "INVALID_PARAMS",
        "message": "invalid HTTP request",
        "retriable": False,
        "retry_after_ms": None,
    }


# -- observability (4800-4822) -------------------------------------------------------------------
def test_worker_4800_4822_correlation_id_echoed_logged_and_audited(env: dict[str, Any]) -> None:
    w = _w(env)
    r = w.client.get("/worker/ready", headers={"X-Correlation-Id": "corr-test-4800"})
    assert r.headers["x-correlation-id"] == "corr-test-4800"
    generated = w.client.get("/worker/ready").headers["x-correlation-id"]
    assert generated.startswith("corr-") and generated != "corr-test-4800"
    _, _, h = execute(
        w.client,
        {"handle_id": "shard-0", "prompt": "q", "params": {"max_tokens": 2}},
        **{"X-Correlation-Id": "corr-exec-4801"},
    )
    assert h["x-correlation-id"] == "corr-exec-4801"
    c = w.client.post(
        "/worker/commit",
        json={"model_ref": "blob.bin", "shard_id": "b2"},
        headers={"X-Correlation-Id": "corr-commit-4802"},
    )
    assert c.status_code == 200
    assert w.client.delete("/worker/shards/b2").status_code == 200
    time.sleep(0.3)
    log = w.log()
    lines = [ln for ln in log.splitlines() if "corr-exec-4801" in ln]
    assert any('human="Started inference' in ln for ln in lines)
    assert any("decode_time_ms=" in ln and "tokens_out=" in ln and 'job_id="' in ln for ln in lines)
    audit = (env["tmp"] / "w" / "state" / "audit.jsonl").read_text()
    assert "corr-commit-4802" in audit
    # The execute's verification pass is audited under its correlation id (with its batch's);
    # SealVerified is not critical, so it reaches the disk with the next background flush.
    deadline = time.monotonic() + 10
    while not any("SealVerified" in ln and "corr-exec-4801" in ln for ln in audit.splitlines()):
        assert time.monotonic() < deadline, "no SealVerified record with the execute's correlation id"
        time.sleep(0.2)
        audit = (env["tmp"] / "w" / "state" / "audit.jsonl").read_text()
    metrics = httpx.get(w.url + "/metrics").text
    for name in (
        "worker_jobs_started_total",
        "worker_jobs_completed_total",
        "worker_tokens_generated_total",
        "worker_cuda_errors_total",
        "vram_free_bytes",
        "vram_execute_seconds",
    ):
        assert name in metrics, name


def _metric(c: httpx.Client, name: str) -> float:
    for line in httpx.get(str(c.base_url) + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# -- lifecycle and shutdown (4020-4032, 4960-4972), config (4980-4991), callbacks ----------------
def test_worker_4020_4032_states_and_one_model_per_process(env: dict[str, Any], tmp_path: Path) -> None:
    # A worker of its own, with the default limit: one model per process (4020s); its states move
    # Starting -> Ready through a commit, and a SIGTERM drains it to an exit 0. (A seal failure
    # moving it to Stopped is in tests/service/test_incident.py: flipping a bit needs the
    # process's own memory.)
    shutil.copytree(env["models"] / MODEL, tmp_path / "models" / MODEL)
    (tmp_path / "models" / "blob.bin").write_bytes(b"\x01" * 8192)
    w = run_serve(tmp_path / "w", "--model-dir", str(tmp_path / "models"), "--scrub-interval", "0")
    try:
        assert w.client.get("/health").json()["state"] == "Starting"
        first = w.client.post("/worker/commit", json={"model_ref": MODEL, "shard_id": "only"})
        assert first.status_code == 200, first.text
        assert w.client.get("/health").json()["state"] == "Ready"
        second = w.client.post("/worker/commit", json={"model_ref": "blob.bin", "shard_id": "second"})
        assert second.status_code == 409 and "at most 1 model" in second.json()["message"]
        ready = w.client.get("/worker/ready").json()
        assert ready["ready"] is True and [h["shard_id"] for h in ready["handles"]] == ["only"]
        status, events, _ = execute(
            w.client, {"handle_id": "only", "prompt": "hi", "params": {"max_tokens": 2}}
        )
        assert status == 200 and events[-1][0] == "end"
    finally:
        assert w.stop() == 0


def _serve_config(cfg: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``serve --config cfg`` as a process of its own, for a configuration that must not start."""
    return subprocess.run(
        [sys.executable, "-m", "vram_residency.cli.main", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env=clean_env(env_extra),
        timeout=120,
    )


def _spec_config(tmp: Path, token_file: Path, callback: str, **extra: Any) -> dict[str, Any]:
    return {
        "worker_id": "worker-conf-0",
        "pool_id": "pool-conf",
        "model_path": str(tmp / "models" / MODEL / "model.safetensors"),
        "rpc_port": 8001,
        "readiness_callback_url": callback,
        "gpu_device": 0,
        "api_token_file": str(token_file),
        "state_dir": str(tmp / "state"),
        **extra,
    }


def test_worker_4980_4991_config_file_env_and_callbacks(env: dict[str, Any], tmp_path: Path) -> None:
    shutil.copytree(env["models"] / MODEL, tmp_path / "models" / MODEL)
    token = tmp_path / "token"
    write_token(token)
    receiver = Receiver()
    try:
        cfg = tmp_path / "worker.json"
        cfg.write_text(json.dumps(_spec_config(tmp_path, token, receiver.url, drain_timeout_ms=5000)))
        # The bind address agrees with rpc_port; run_serve's --port 0 then picks a free port.
        w = run_serve(
            tmp_path / "p",
            "--config",
            str(cfg),
            env={"WORKER_BIND_ADDR": "127.0.0.1:8001", "WORKER_LOG_LEVEL": "info"},
        )
        ready = w.client.get("/worker/ready").json()
        assert (
            ready["ready"] is True
            and ready["pool_id"] == "pool-conf"
            and ready["worker_id"] == "worker-conf-0"
        )
        deadline = time.monotonic() + 20
        while not receiver.received and time.monotonic() < deadline:
            time.sleep(0.05)
        first = receiver.received[0]
        assert (
            first["event"] == "ready"
            and first["worker_id"] == "worker-conf-0"
            and first["pool_id"] == "pool-conf"
        )
        assert first["handles"][0]["model_ref"] == "model.safetensors"
        assert w.stop(signal.SIGTERM) == 0
        last = receiver.received[-1]
        assert last["event"] == "stopped" and last["ready"] is False
    finally:
        receiver.shutdown()


@pytest.mark.parametrize(
    ("change", "env_extra", "fragment"),
    [
        ({"rpc_port": 70000}, {}, "rpc_port"),
        ({"readiness_callback_url": "ftp://x"}, {}, "readiness_callback_url"),
        ({"surprise": 1}, {}, "unknown keys surprise"),
        ({}, {"WORKER_BIND_ADDR": "nowhere"}, "WORKER_BIND_ADDR"),
        ({}, {"WORKER_LOG_LEVEL": "loud"}, "WORKER_LOG_LEVEL"),
        # Checked even though the file's gpu_device wins over it.
        ({}, {"WORKER_GPU_DEVICE": "gpu0"}, "WORKER_GPU_DEVICE"),
        ({}, {"WORKER_GPU_DEVICE": "\u0663"}, "WORKER_GPU_DEVICE"),  # an Arabic-Indic 3: isdigit()
    ],
)
def test_worker_4980_4991_bad_config_fails_fast_with_a_clear_error(
    tmp_path: Path, change: dict[str, Any], env_extra: dict[str, str], fragment: str
) -> None:
    token = tmp_path / "token"
    write_token(token)
    cfg = tmp_path / "worker.json"
    cfg.write_text(json.dumps({**_spec_config(tmp_path, token, "http://127.0.0.1:9/cb"), **change}))
    r = _serve_config(cfg, env_extra)
    assert r.returncode != 0 and fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_worker_4991_a_repeated_config_key_fails_fast(tmp_path: Path) -> None:
    # Two values for one key: JSON parsers disagree on which one counts (Python's takes the last),
    # so the worker says so at start instead of silently picking one.
    token = tmp_path / "token"
    write_token(token)
    text = json.dumps(_spec_config(tmp_path, token, "http://127.0.0.1:9/cb"))
    cfg = tmp_path / "worker.json"
    cfg.write_text(text[:-1] + ', "rpc_port": 9000}')
    r = _serve_config(cfg)
    assert r.returncode != 0 and "duplicate key 'rpc_port'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_worker_4960_4972_sigterm_drains_streams_end_then_exit_0(env: dict[str, Any], tmp_path: Path) -> None:
    shutil.copytree(env["models"] / MODEL, tmp_path / "models" / MODEL)
    w = run_serve(
        tmp_path / "d", "--model-dir", str(tmp_path / "models"), "--model", MODEL, "--drain-timeout", "60"
    )
    c = w.client
    body, tokens = env.get("seeded", (None, None))
    if body is not None:  # WORKER-4999 across processes: the same seed gives the same tokens
        body = dict(body)
        body.pop("handle_id")
        assert [d["t"] for e, d in execute(c, body)[1] if e == "token"] == tokens
    events: list[tuple[str, dict[str, Any]]] = []
    during: dict[str, Any] = {}
    with c.stream("POST", "/worker/execute", json={"prompt": "long", "params": {"max_tokens": 300}}) as r:
        for event, data in sse(r.iter_lines()):
            events.append((event, data))
            if event == "token" and data["i"] == 2:
                w.proc.send_signal(signal.SIGTERM)
                t0 = time.monotonic()
                while httpx.get(w.url + "/health").json()["state"] != "Draining":
                    assert time.monotonic() - t0 < 10
                    time.sleep(0.02)
                during["health"] = httpx.get(w.url + "/health").json()
                during["ready"] = c.get("/worker/ready").json()
                during["new"] = execute(c, {"prompt": "no", "params": {"max_tokens": 2}})
                during["plan"] = c.post("/worker/plan", json={"model_ref": MODEL, "shard_layout": "single"})
    assert during["health"]["status"] == "draining" and during["ready"]["state"] == "Draining"
    status, err, headers = during["new"]
    assert status == 503 and err[0][1]["retry_after_ms"] is not None and "retry-after" in headers
    # A draining worker takes no new work: its plan must not promise what a commit would refuse.
    plan = during["plan"].json()
    assert during["plan"].status_code == 200 and plan["feasible"] is False and plan["shard_plan"] == []
    assert "Draining" in plan["reason"]
    assert events[-1][0] == "end" and events[-1][1]["tokens_out"] > 3
    assert w.proc.wait(60) == 0
    assert "stopped (shards zeroed and freed)" in w.log()


def test_worker_4960_4972_sigterm_while_the_startup_model_loads_exits_0(tmp_path: Path) -> None:
    # A pool manager may stop a worker that is still loading its model (minutes for a large
    # one). SIGTERM then stops the load, frees what it had allocated (zeroed) and exits 0, as a
    # drain does: it neither dies by the signal (-15) nor leaves the allocation to the driver.
    models = tmp_path / "models"
    models.mkdir()
    with (models / "big.bin").open("wb") as f:
        f.truncate(256 << 20)  # sparse: costs no disk, but every byte is read, copied and hashed
    token = tmp_path / "token"
    write_token(token)
    log_path = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "vram_residency.cli.main", "serve", "--backend", "host", "--port", "0"]
    cmd += ["--token-file", str(token), "--state-dir", str(tmp_path / "state")]
    cmd += ["--model-dir", str(models), "--model", "big.bin", "--scrub-interval", "0"]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_env())
    try:
        deadline = time.monotonic() + 60
        while "Loading model big.bin" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert rc == 0, log[-2000:]
    assert "listening" not in log and "Traceback" not in log
    events = [json.loads(line)["event"] for line in (tmp_path / "state" / "audit.jsonl").open()]
    if "VramAllocated" in events:  # the signal came while the bytes were being loaded
        assert events.index("VramDeallocated") > events.index("VramAllocated")
    assert events[-1] == "WorkerStateChanged" and "ModelCommitted" not in events


def test_worker_4960_4972_sigterm_during_a_commit_stops_the_load(tmp_path: Path) -> None:
    # A commit in flight when SIGTERM comes is new work the worker will never serve: the load
    # stops at its next chunk (nothing left allocated) and the commit is answered 503, instead of
    # loading on (minutes for a large model) past uvicorn's graceful timeout, which drops the
    # answer and logs a traceback, and holding the exit until the load is done.
    models = tmp_path / "models"
    models.mkdir()
    with (models / "big.bin").open("wb") as f:
        f.truncate(512 << 20)
    w = run_serve(tmp_path / "w", "--model-dir", str(models), "--scrub-interval", "0")
    answer: dict[str, Any] = {}

    def commit() -> None:
        r = w.client.post("/worker/commit", json={"model_ref": "big.bin", "shard_id": "big"})
        answer.update(status=r.status_code, body=r.json())

    t = threading.Thread(target=commit)
    t.start()
    deadline = time.monotonic() + 60
    while "Loading model big.bin" not in w.log():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(60) == 0
    t.join(60)
    log = w.log()
    assert "Traceback" not in log and "timeout graceful shutdown exceeded" not in log, log[-3000:]
    if answer["status"] == 200:  # only when the load was over before the signal was handled
        assert log.index("committed big.bin") < log.index("draining: signal SIGTERM")
    else:
        assert answer["status"] == 503 and answer["body"]["code"] == "WORKER_NOT_READY", answer
        assert "Draining" in answer["body"]["message"] or "draining" in answer["body"]["message"]
        events = [json.loads(line)["event"] for line in (tmp_path / "w" / "state" / "audit.jsonl").open()]
        assert "ModelCommitted" not in events and events.count("VramDeallocated") == events.count(
            "VramAllocated"
        )


def test_worker_4960_4972_drain_timeout_ends_streams_with_error(env: dict[str, Any], tmp_path: Path) -> None:
    shutil.copytree(env["models"] / MODEL, tmp_path / "models" / MODEL)
    w = run_serve(
        tmp_path / "t", "--model-dir", str(tmp_path / "models"), "--model", MODEL, "--drain-timeout", "0.3"
    )
    events: list[tuple[str, dict[str, Any]]] = []
    with w.client.stream(
        "POST", "/worker/execute", json={"prompt": "long", "params": {"max_tokens": 2000}}
    ) as r:
        for event, data in sse(r.iter_lines()):
            events.append((event, data))
            if event == "token" and data["i"] == 2:
                w.proc.send_signal(signal.SIGTERM)
    assert events[-1][0] == "error" and "drain timeout" in events[-1][1]["message"]
    assert "end" not in [e for e, _ in events]
    assert w.proc.wait(60) == 0
