"""Request and response bodies of the worker API (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CommitRequest",
    "CommitResponse",
    "DeallocateResponse",
    "ErrorBody",
    "ExecuteRequest",
    "HealthResponse",
    "ModelInfo",
    "PlanForModel",
    "PlanForSize",
    "PlanRequest",
    "PlanResponse",
    "ReadyResponse",
    "SealRecord",
    "VerifyRequest",
    "VerifyResponse",
]

_MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._+\-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._+\-]{0,127}){0,7}$"
_SHARD_ID = r"^shard-[0-9a-f]{32}$"
_HEX64 = r"^[0-9a-fA-F]{64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    code: str = Field(
        description="VRAM_OOM, CUDA_ERROR, MODEL_LOAD_FAILED, SEAL_VERIFICATION_FAILED, "
        "INVALID_PARAMS, AUTH_FAILED, INTERNAL, WORKER_NOT_READY or WORKER_STOPPED"
    )
    message: str | None = None
    retriable: bool | None = None
    details: dict[str, Any] | None = None


class PlanForModel(_Strict):
    model: str = Field(pattern=_MODEL_NAME, description="a model name in the model directory")


class PlanForSize(_Strict):
    vram_bytes: int = Field(ge=1, le=1 << 50, description="a size in bytes")


#: Exactly one of the two: each form forbids the other's field.
PlanRequest = PlanForModel | PlanForSize


class PlanResponse(BaseModel):
    model: str | None
    model_bytes: int
    needed_bytes: int
    available_bytes: int
    total_bytes: int
    fits: bool
    backend: str
    emulated: bool


class CommitRequest(_Strict):
    model: str = Field(pattern=_MODEL_NAME, description="model name, relative to the model directory")
    expected_digest: str | None = Field(
        None, pattern=_HEX64, description="digest the sealed bytes must have (sha256-tree-v1 by default)"
    )


class SealRecord(BaseModel):
    """A seal record as ``SealedShard.record()`` makes it (fields and the tag, for attestation)."""

    model_config = ConfigDict(extra="allow")
    shard_id: str
    digest: str
    digest_algorithm: str
    vram_bytes: int


class CommitResponse(BaseModel):
    model: str
    shard_id: str
    vram_bytes: int
    digest: str
    digest_algorithm: str
    executable: bool
    executor: str
    seal_ms: float
    verify_ms: float
    seal: SealRecord


class ModelInfo(BaseModel):
    name: str
    shard_id: str
    vram_bytes: int
    digest_algorithm: str
    digest: str
    format: str
    executable: bool
    kind: str | None
    executor: str
    side_files_sha256: dict[str, str]
    last_verified_ns: int | None = Field(
        None, description="when the shard last matched its seal (seal, verify or attest), ns since the epoch"
    )


class ReadyResponse(BaseModel):
    ready: bool
    state: Literal["Starting", "Loading", "Ready", "Executing", "Draining", "Stopped"]
    worker_id: str
    backend: str
    backend_description: str
    emulated: bool
    pre_verify: bool
    models: list[ModelInfo]
    seals: list[SealRecord]
    last_scrub: dict[str, Any] | None
    incident: dict[str, Any] | None


class ExecuteRequest(_Strict):
    job_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._:\-]{1,128}$")
    model: str | None = Field(None, pattern=_MODEL_NAME, description="defaults to the only committed model")
    prompt: str = Field(min_length=1, max_length=16384)
    max_tokens: int | None = Field(
        None,
        ge=2,  # an encoder needs [CLS] and [SEP]
        le=1024,  # the generator's cap (decoder.MAX_TOKENS_CAP); more than an encoder reads
        description="a generator: most tokens to generate (default 128 for the example model); "
        "an encoder: most input tokens read",
    )


class VerifyRequest(_Strict):
    shard_id: str | None = Field(None, pattern=_SHARD_ID, description="one shard; default: every shard")


class VerifyResponse(BaseModel):
    verified: bool
    shards: int
    bytes: int
    duration_ms: float


class DeallocateResponse(BaseModel):
    shard_id: str
    vram_bytes: int
    deallocated: bool


#: One Server-Sent Event as a client's parser sees it (OpenAPI before 3.2 describes each event).
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["started", "token", "metrics", "end", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json", "description": "a JSON object"},
    },
}


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded", "stopped"]
    state: str
    backend: str
    emulated: bool
    pre_verify: bool
