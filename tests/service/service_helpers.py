"""Shared helpers of the service tests: a worker on a real uvicorn over loopback, SSE parsing,
and a tiny BERT model written with the ``safetensors`` package."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from vram_residency.service.catalog import example_model_dir
from vram_residency.service.server import Built, ServeOptions, ServerThread, build

EXAMPLE_DIR = example_model_dir()
#: all-MiniLM-L6-v2 embedding of "hello world", first five values, as published in fastembed's
#: test suite (CANONICAL_VECTOR_VALUES, produced with the reference implementation).
HELLO_WORLD_REFERENCE = np.array([-0.034478, 0.03102, 0.00673, 0.02611, -0.039362])


def write_token(path: Path) -> str:
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


@dataclass
class Running:
    built: Built
    server: ServerThread
    client: httpx.Client
    token: str = field(repr=False)  # never in assertion output
    audit_path: Path = field(default=Path())

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def worker(self) -> Any:
        return self.built.worker

    def close(self) -> None:
        self.client.close()
        self.server.stop()
        self.built.worker.close()


def start_worker(tmp: Path, **options: Any) -> Running:
    tmp.mkdir(parents=True, exist_ok=True)
    token_file = tmp / "worker.token"
    token = write_token(token_file)
    audit = tmp / "audit.jsonl"
    defaults: dict[str, Any] = {
        "token_file": token_file,
        "state_dir": tmp / "state",
        "audit_log": audit,
        "backend": "host",
        "scrub_interval": 0.0,
    }
    defaults.update(options)
    built = build(ServeOptions(**defaults))
    try:
        server = ServerThread(built.app).start()
    except BaseException:
        built.worker.close()
        raise
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    return Running(built, server, client, token, audit)


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = "", ""
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
        events.append((name, json.loads(data)))
    return events


def execute(client: httpx.Client, **body: Any) -> tuple[int, Any]:
    """POST /worker/execute; (status, list of SSE events) or (status, JSON error body)."""
    r = client.post("/worker/execute", json=body)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        return r.status_code, parse_sse(r.text)
    return r.status_code, r.json()


def tiny_bert(dest: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A small random BERT in the Hugging Face layout, with the example model's real tokenizer."""
    from safetensors.numpy import save_file

    assert EXAMPLE_DIR is not None
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab, inter, max_pos = 30522, 2 * hidden, 64

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    t: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": w(vocab, hidden),
        "embeddings.position_embeddings.weight": w(max_pos, hidden),
        "embeddings.token_type_embeddings.weight": w(2, hidden),
        "embeddings.LayerNorm.weight": np.ones(hidden, np.float32),
        "embeddings.LayerNorm.bias": np.zeros(hidden, np.float32),
    }
    for n in range(layers):
        p = f"encoder.layer.{n}."
        for name in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ):
            t[p + name + ".weight"] = w(hidden, hidden)
            t[p + name + ".bias"] = w(hidden)
        t[p + "intermediate.dense.weight"] = w(inter, hidden)
        t[p + "intermediate.dense.bias"] = w(inter)
        t[p + "output.dense.weight"] = w(hidden, inter)
        t[p + "output.dense.bias"] = w(hidden)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"] = np.ones(hidden, np.float32)
            t[p + ln + ".bias"] = np.zeros(hidden, np.float32)
    save_file(t, str(dest / "model.safetensors"))
    config = {
        "model_type": "bert",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "intermediate_size": inter,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": max_pos,
        "type_vocab_size": 2,
        "vocab_size": vocab,
    }
    (dest / "config.json").write_text(json.dumps(config))
    shutil.copyfile(EXAMPLE_DIR / "tokenizer.json", dest / "tokenizer.json")
    return dest


def audit_events(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
