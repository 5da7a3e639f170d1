"""The executor interface: what runs a model on its sealed weights.

An executor is built once per committed model, over the sealed shard's memory *in place*, and
then runs batches of jobs. The worker verifies every shard immediately before each ``run`` (see
``worker.py``); because the executor reads the very memory that was just digested, the bytes
verified are the bytes used. An executor must never copy the weights elsewhere (a copy would be
outside the seal) and must drop every view of the memory in ``close``.

Two steps per job keep verification close to use: ``prepare`` (tokenizing, validation; no weights)
runs in the request's thread, ``run`` (the weights) runs in the worker's execution thread right
after the verification pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DeviceMemory",
    "Executor",
    "ExecutorFactory",
    "JobInput",
    "JobOutput",
    "ModelFiles",
    "SealedWeights",
]


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """What a model name resolved to inside the model directory."""

    name: str
    weights: Path  # the file that is sealed (safetensors, GGUF or raw bytes)
    format: str  # "safetensors", "gguf" or "raw"
    root: Path  # the directory of the model's side files (config, tokenizer)
    config: Path | None = None
    tokenizer: Path | None = None
    sentence_config: Path | None = None
    pooling_config: Path | None = None


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """A sealed shard's allocation on the CUDA backend: device pointer, size and the buffer object
    that owns it. ``read`` copies a few bytes to the host (for a file header, never weights)."""

    ptr: int
    size: int
    device: int
    owner: Any

    def read(self, offset: int, n: int) -> bytes:
        data: bytes = self.owner.read(offset, n)
        return data


@dataclass(frozen=True, slots=True)
class SealedWeights:
    """The sealed memory an executor runs on, in place.

    ``host_memory`` is the host backend's emulated device memory itself (``HostBuffer.view()``);
    ``device_memory`` is the CUDA backend's allocation. Either is a view of the sealed shard,
    never a copy; the other is ``None``.
    """

    files: ModelFiles
    backend: str
    size: int
    host_memory: memoryview | None
    device_memory: DeviceMemory | None = None


@dataclass(frozen=True, slots=True)
class JobInput:
    """A prepared job: the tokens to stream and the executor's own input (token ids, ...)."""

    tokens: tuple[str, ...]
    data: Any = None


@dataclass(frozen=True, slots=True)
class JobOutput:
    """One job's result: fields of the SSE ``end`` event, in JSON-ready form."""

    end: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Executor(Protocol):
    """Runs one committed model on its sealed weights."""

    @property
    def kind(self) -> str:
        """What the model produces: ``"embedding"`` (an encoder) or ``"generation"``."""
        ...

    @property
    def description(self) -> str:
        """One human line: the model, the implementation and where it runs."""
        ...

    def prepare(self, prompt: str, max_tokens: int | None) -> JobInput:
        """Validate and tokenize one input; must not touch the weights. Raises InvalidInput."""
        ...

    def run(self, jobs: Sequence[JobInput]) -> list[JobOutput]:
        """Run a batch on the sealed weights, in place; one output per job, in order."""
        ...

    def close(self) -> None:
        """Drop every view of the sealed memory (called before the shard is freed)."""
        ...


class ExecutorFactory(Protocol):
    """Builds an executor for sealed weights, or returns ``None`` when it cannot run that model."""

    def __call__(self, weights: SealedWeights) -> Executor | None: ...
