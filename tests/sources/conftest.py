"""Fixtures for the sources tests: a host-backend manager with an audit recorder, model files."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from vram_residency import VramManager

TOKEN = "sources-test-token-0123456789abcdef"
CAP = 256 << 20


class Recorder:
    """An audit sink that keeps events in memory (the manager's AuditSink protocol)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> None:
        self.events.append((event_type, fields))

    def names(self) -> list[str]:
        return [e for e, _ in self.events]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [f for e, f in self.events if e == name]


@pytest.fixture
def audit() -> Recorder:
    return Recorder()


@pytest.fixture
def mgr(audit: Recorder) -> Iterator[VramManager]:
    with VramManager(TOKEN, backend="host", worker_id="w-src", capacity_bytes=CAP, audit=audit) as m:
        yield m


Tensors = dict[str, np.ndarray[Any, Any]]


def tensors_for(seed: int, sizes: Mapping[str, int]) -> Tensors:
    """float32 tensors of the given element counts, deterministic per seed."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(n, dtype=np.float32) for name, n in sizes.items()}


@pytest.fixture
def token() -> str:
    return TOKEN


@pytest.fixture(name="tensors_for")
def _tensors_for() -> Any:
    return tensors_for


@pytest.fixture(name="write_sharded")
def _write_sharded() -> Any:
    return write_sharded


#: Big enough that whole 1 MiB units lie inside each of the large tensors.
BIG = {"blk.0.weight": 900_000, "blk.0.bias": 384, "blk.1.weight": 1_100_000, "norm": 7}


@pytest.fixture
def st_file(tmp_path: Path) -> tuple[Path, Tensors]:
    tensors = tensors_for(1, BIG)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "np"})
    return path, tensors


def write_sharded(directory: Path, shards: list[Tensors]) -> list[Path]:
    """A sharded safetensors checkpoint with its index, as Hugging Face writes one."""
    directory.mkdir(parents=True, exist_ok=True)
    n = len(shards)
    weight_map: dict[str, str] = {}
    paths = []
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(directory / name))
        weight_map.update(dict.fromkeys(tensors, name))
        paths.append(directory / name)
    total = sum(a.nbytes for t in shards for a in t.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return paths
