"""Two worker options, over real HTTP against a real ``serve`` process, and their configuration:

* ``--strict-params`` (``WorkerConfig.strict_params``, config key ``strict_params``): execute
  params other than max_tokens, temperature and seed are refused by name, as before they were
  accepted unused (the default; see test_conformance's WORKER-4241 tests);
* ``--max-tensors N`` (``WorkerConfig.max_tensors``, config key ``max_tensors``): a commit of a
  safetensors file whose header lists more than N tensors is refused, nothing left sealed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.serve_process import ServeProcess, execute, run_serve, write_token
from vram_residency.cli.main import build_parser
from vram_residency.cli.serve import _spec_options
from vram_residency.errors import ConfigError
from vram_residency.service.config import load_spec_config
from vram_residency.service.worker import WorkerConfig
from vram_residency.sources import DEFAULT_MAX_TENSORS

NEEDS_MINILM = False


def _safetensors(path: Path, n: int) -> Path:
    """A real safetensors file of ``n`` U8 tensors of 64 bytes each."""
    header = {
        f"t{i}": {"dtype": "U8", "shape": [64], "data_offsets": [64 * i, 64 * (i + 1)]} for i in range(n)
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(64)) * n)
    return path


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("params")
    models = tmp / "models"
    models.mkdir()
    _safetensors(models / "three.safetensors", 3)
    _safetensors(models / "two.safetensors", 2)
    w = run_serve(
        tmp / "w",
        "--model-dir",
        str(models),
        "--max-models",
        "2",
        "--strict-params",
        "--max-tensors",
        "2",
        "--scrub-interval",
        "0",
    )
    yield w
    assert w.stop() == 0


def test_max_tensors_refuses_a_commit_of_more_tensors_with_nothing_sealed(strict: ServeProcess) -> None:
    c = strict.client
    r = c.post("/worker/commit", json={"model_ref": "three.safetensors", "shard_id": "three"})
    body = r.json()
    # An InvalidInput at commit is the contract's MODEL_LOAD_FAILED (the model cannot be loaded
    # as asked), as for any other bad header.
    assert r.status_code == 422 and body["code"] == "MODEL_LOAD_FAILED", body
    assert "more than 2 tensors" in body["message"] and "max_tensors" in body["message"]
    ready = c.get("/worker/ready").json()
    assert ready["handles"] == [] and ready["seals"] == [] and ready["models"] == []
    # At the limit: sealed.
    ok = c.post("/worker/commit", json={"model_ref": "two.safetensors", "shard_id": "two"})
    assert ok.status_code == 200, ok.text
    assert [h["shard_id"] for h in c.get("/worker/ready").json()["handles"]] == ["two"]


def test_strict_params_refuses_other_params_by_name(strict: ServeProcess) -> None:
    c = strict.client
    status, events, _ = execute(c, {"handle_id": "two", "prompt": "a", "params": {"top_k": 3, "stop": ["x"]}})
    err = events[0][1]
    assert status == 400 and err["code"] == "INVALID_PARAMS", err
    assert "stop, top_k" in err["message"] and "strict_params" in err["message"]
    schema = c.get("/openapi.json").json()["components"]["schemas"]["ExecuteParams"]
    assert schema["additionalProperties"] is False and "propertyNames" not in schema
    # The contract's own params pass the check (two.safetensors is sealed, not executable: the
    # refusal is about the model, not the params).
    status, events, _ = execute(
        c, {"handle_id": "two", "prompt": "a", "params": {"max_tokens": 1, "seed": 1}}
    )
    assert status == 400 and "strict_params" not in events[0][1]["message"], events


# -- configuration ------------------------------------------------------------------------------
def test_worker_config_checks_max_tensors_and_strict_params() -> None:
    assert WorkerConfig("w").max_tensors == DEFAULT_MAX_TENSORS and WorkerConfig("w").strict_params is False
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ConfigError, match="max_tensors must be at least 1"):
            WorkerConfig("w", max_tensors=bad).check()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="strict_params"):
        WorkerConfig("w", strict_params=1).check()  # type: ignore[arg-type]


def _config(tmp: Path, **extra: Any) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    token = tmp / "token"
    write_token(token)
    cfg = tmp / "worker.json"
    body = {
        "worker_id": "w-0",
        "pool_id": "p",
        "model_path": str(tmp / "m.safetensors"),
        "rpc_port": 8001,
        "readiness_callback_url": "http://127.0.0.1:9/cb",
        "gpu_device": 0,
        "api_token_file": str(token),
        **extra,
    }
    cfg.write_text(json.dumps(body))
    return cfg


def test_config_file_keys_reach_the_serve_options(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["serve", "--config", str(_config(tmp_path, max_tensors=7, strict_params=True))]
    )
    opts = _spec_options(args)
    assert opts["max_tensors"] == 7 and opts["strict_params"] is True
    plain = _spec_options(build_parser().parse_args(["serve", "--config", str(_config(tmp_path / "b"))]))
    # Keys not in the file leave the command line's values (and their defaults) standing.
    assert "max_tensors" not in plain and "strict_params" not in plain
    off = _spec_options(
        build_parser().parse_args(["serve", "--config", str(_config(tmp_path / "c", strict_params=False))])
    )
    assert off["strict_params"] is False


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"max_tensors": 0}, "config max_tensors must be an integer from 1"),
        ({"max_tensors": "9"}, "config max_tensors"),
        ({"max_tensors": True}, "config max_tensors"),
        ({"strict_params": "yes"}, "config strict_params must be true or false"),
    ],
)
def test_bad_config_values_fail_at_start(tmp_path: Path, extra: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_spec_config(_config(tmp_path, **extra), env={})
