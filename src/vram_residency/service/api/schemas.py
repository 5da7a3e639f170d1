"""Request and response bodies of the worker API (they make the OpenAPI schema)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

__all__ = [
    "MAX_IGNORED_PARAMS",
    "MAX_PARAM_NAME",
    "SSE_EVENT_SCHEMA",
    "CancelRequest",
    "CancelResponse",
    "CommitRequest",
    "CommitResponse",
    "DeallocateResponse",
    "ErrorBody",
    "ExecuteParams",
    "ExecuteRequest",
    "HealthResponse",
    "ModelBytesInline",
    "ModelInfo",
    "ModelShardHandle",
    "PlanRequest",
    "PlanResponse",
    "ReadyResponse",
    "SealRecord",
    "ShardPlanEntry",
    "VerifyRequest",
    "VerifyResponse",
]

_MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._+\-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._+\-]{0,127}){0,7}$"
#: A model reference an orchestrator chose (llama-orch writes ``file:/path``, ``hf:org/repo``):
#: any text without control characters or line separators, which would forge log lines.
_MODEL_REF = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]{1,1024}$"
_SHARD_ID = r"^shard-[0-9a-f]{32}$"
_JOB_ID = r"^[A-Za-z0-9._:\-]{1,128}$"
_DIGEST = r"^([0-9a-fA-F]{64}|(sha256-tree-v1|blake3):[0-9a-fA-F]{64})$"


def _no_bool(value: object) -> object:
    # JSON Schema's integer takes 5 and 5.0, never true or "5": pydantic's lax int would take
    # true as 1 and "5" as 5.
    if isinstance(value, (bool, str, bytes)):
        raise ValueError("Input should be a valid integer")
    return value


def _json_number(value: object) -> object:
    # JSON Schema's number: never true or "0.5" (pydantic's lax float takes both).
    if isinstance(value, (bool, str, bytes)):
        raise ValueError("Input should be a valid number")
    return value


#: An integer as JSON Schema has it.
JsonInt = Annotated[int, BeforeValidator(_no_bool)]
TpDegree = Annotated[int, Field(ge=1, le=1024), BeforeValidator(_no_bool)]
SizeBytes = Annotated[int, Field(ge=1, le=1 << 50), BeforeValidator(_no_bool)]
ShardIndex = Annotated[int, Field(ge=0, le=0), BeforeValidator(_no_bool)]
MaxTokens = Annotated[int, Field(ge=1), BeforeValidator(_no_bool)]
#: Any unsigned 64-bit seed: an orchestrator may draw its seeds as u64 (PCG64 takes up to 128 bits).
Seed = Annotated[int, Field(ge=0, le=2**64 - 1), BeforeValidator(_no_bool)]
_B64: Final = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


def _given(name: str, type_: str) -> dict[str, Any]:
    """JSON Schema for "``name`` is present and not null" (a oneOf branch)."""
    return {"required": [name], "properties": {name: {"type": type_}}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    code: str = Field(
        description="the contract's VRAM_OOM, CUDA_ERROR, MODEL_LOAD_FAILED, "
        "SEAL_VERIFICATION_FAILED, INVALID_PARAMS, AUTH_FAILED, INTERNAL; this worker's "
        "WORKER_NOT_READY (retry later), WORKER_STOPPED, CANCELLED, TIMEOUT (a job's end); "
        "RATE_LIMITED (POST /worker/attest only)"
    )
    message: str | None = None
    retriable: bool | None = None
    retry_after_ms: int | None = None
    details: dict[str, Any] | None = None


class PlanRequest(BaseModel):
    """The contract's plan request (``model_ref``, ``shard_layout``, ``tp_degree``), or one of
    this project's additions: ``model`` (a name, as before) or ``vram_bytes`` (a bare size)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                _given("model_ref", "string"),
                _given("model", "string"),
                _given("vram_bytes", "integer"),
            ]
        },
    )

    model_ref: str | None = Field(
        None,
        pattern=_MODEL_REF,
        description="the model: a name in the model directory (any other reference plans as not feasible)",
    )
    shard_layout: Literal["single", "tensor_parallel"] = "single"
    tp_degree: TpDegree | None = Field(None, description="required for tensor_parallel")
    model: str | None = Field(None, pattern=_MODEL_NAME, description="addition: same as model_ref")
    vram_bytes: SizeBytes | None = Field(None, description="addition: plan for a size")

    @model_validator(mode="after")
    def _one_subject(self) -> PlanRequest:
        given = [n for n in ("model_ref", "model", "vram_bytes") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of model_ref, model (addition) or vram_bytes (addition)")
        return self


class ShardPlanEntry(BaseModel):
    shard_index: int
    vram_bytes: int
    gpu_device: int


class PlanResponse(BaseModel):
    feasible: bool
    vram_required: int
    shard_plan: list[ShardPlanEntry]
    reason: str | None = None
    # Additions.
    model: str | None
    model_bytes: int
    needed_bytes: int
    available_bytes: int
    total_bytes: int
    fits: bool
    executable: bool | None = None
    backend: str
    emulated: bool


class ModelBytesInline(_Strict):
    base64: str = Field(
        min_length=4,
        pattern=_B64,
        description="the model's bytes, base64 (bounded by the request body limit)",
    )


class CommitRequest(BaseModel):
    """The contract's commit (``model_ref``, ``shard_id``, ``shard_index``, ``model_bytes``,
    ``expected_digest``, ``signature``), or the project's commit by ``model`` name.

    ``model_bytes`` is a path (a string) to a file inside the directories this worker loads
    models from, or ``{"base64": ...}`` with the bytes themselves. Without it, ``model_ref`` is
    resolved by name like ``model``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"oneOf": [_given("model_ref", "string"), _given("model", "string")]},
    )

    model_ref: str | None = Field(
        None,
        pattern=_MODEL_REF,
        description="the model's reference; without model_bytes, a name in the model directory",
    )
    shard_id: str | None = Field(None, pattern=_JOB_ID, description="the handle id, chosen by the caller")
    shard_index: ShardIndex = Field(0, description="0: one shard per model until tensor parallelism")
    model_bytes: str | ModelBytesInline | None = Field(None, description="a path, or {base64: bytes}")
    expected_digest: str | None = Field(
        None,
        pattern=_DIGEST,
        description="64 hex: SHA-256 of the model bytes; or sha256-tree-v1:HEX / blake3:HEX (additions)",
    )
    signature: str | None = Field(
        None,
        min_length=4,
        max_length=1024,
        pattern=_B64,
        description="base64 Ed25519 signature of the SHA-256 (expected_digest)",
    )
    model: str | None = Field(None, pattern=_MODEL_NAME, description="addition: a model name")

    @model_validator(mode="after")
    def _one_model(self) -> CommitRequest:
        if (self.model is None) == (self.model_ref is None):
            raise ValueError("give exactly one of model_ref or model (addition)")
        return self


class SealRecord(BaseModel):
    """A seal record as ``SealedShard.record()`` makes it (fields and the tag, for attestation)."""

    model_config = ConfigDict(extra="allow")
    shard_id: str
    digest: str
    digest_algorithm: str
    vram_bytes: int


class ModelShardHandle(BaseModel):
    """llama-orch's ModelShardHandle, plus additions (the seal's own id and digest, its age)."""

    shard_id: str
    gpu_device: int
    vram_bytes: int
    sealed: bool
    digest: str
    model_ref: str
    shard_index: int
    total_shards: int
    digest_algorithm: str
    seal_shard_id: str
    seal_digest: str
    last_verified_at: float | None
    seal_age_s: float | None


class CommitResponse(BaseModel):
    handle: ModelShardHandle
    sealed: bool
    # Additions.
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
    handle_id: str
    shard_id: str
    vram_bytes: int
    digest_algorithm: str
    digest: str
    sha256: str | None
    format: str
    executable: bool
    kind: str | None
    executor: str
    side_files_sha256: dict[str, str]
    last_verified_ns: int | None = Field(
        None, description="when the shard last matched its seal (seal, verify or attest), ns since the epoch"
    )


class AuditHeadMismatchInfo(BaseModel):
    """The audit log's signed head did not vouch for the log when the worker started (records
    removed, or the head file replaced): a security incident the worker survives. The log holds
    the AuditHeadMismatch and SecurityIncident records; ``audit verify`` reports them."""

    kind: str = Field(description="missing, unsigned, truncated (records removed) or differs")
    incident_id: str


class SignedHeadBody(BaseModel):
    v: int
    seq: int = Field(description="the last record's sequence number (-1: no record yet)")
    hash: str = Field(description="that record's hash (the genesis hash for seq -1)")
    hmac: str = Field(description="HMAC-SHA256 under the worker's audit key")


class AuditHeadResponse(BaseModel):
    """The audit log's signed head, made durable before it is returned: what an orchestrator
    keeps as an anchor (``audit verify --anchor`` takes this whole object)."""

    worker_id: str
    head: SignedHeadBody


class ReadyResponse(BaseModel):
    ready: bool
    handles: list[ModelShardHandle]
    nccl_group_id: str | None
    # Additions.
    state: Literal["Starting", "Loading", "Ready", "Executing", "Draining", "Stopped"]
    worker_id: str
    pool_id: str | None
    backend: str
    backend_description: str
    emulated: bool
    pre_verify: bool
    loading: list[str]
    models: list[ModelInfo]
    seals: list[SealRecord]
    last_scrub: dict[str, Any] | None
    incident: dict[str, Any] | None
    audit_head_mismatch: AuditHeadMismatchInfo | None = None


#: Most params with names this worker does not use, and the shape of such a name: enough for
#: any sampler's options (top_p, top_k, stop, repetition_penalty, ...), and no room to make the
#: worker hold, list and log thousands of names or names that are not names.
MAX_IGNORED_PARAMS: Final = 64
MAX_PARAM_NAME: Final = 64
_PARAM_NAME: Final = re.compile(rf"[A-Za-z_][A-Za-z0-9_]{{0,{MAX_PARAM_NAME - 1}}}")


class ExecuteParams(BaseModel):
    """Generation parameters: ``max_tokens``, ``temperature``, ``seed`` (strictly typed), and
    others by name (WORKER-4241: "params (max_tokens, temperature, seed, etc.)").

    Params with other names are accepted and not used: a spec-shaped request is never refused
    for its shape, and an orchestrator sends its sampler's options (top_p, stop, ...) to every
    worker. They are named in the job's ``started`` event (``ignored_params``) and its log line;
    ``WorkerConfig.strict_params`` (``serve --strict-params``) refuses them by name instead.
    Either way at most 64 of them, each named like an identifier of at most 64 characters."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "propertyNames": {"pattern": f"^{_PARAM_NAME.pattern}$", "maxLength": MAX_PARAM_NAME},
            "description": "max_tokens, temperature, seed; any other param (at most 64, named "
            "[A-Za-z_][A-Za-z0-9_]*, at most 64 characters) is accepted and not used, and named in "
            "the started event's ignored_params (a worker started with strict_params refuses it)",
        },
    )

    max_tokens: MaxTokens | None = Field(
        None, description="most tokens to generate (an encoder: most input tokens read)"
    )
    temperature: Annotated[float, BeforeValidator(_json_number)] = Field(
        0.0, ge=0.0, le=100.0, description="0: greedy"
    )
    seed: Seed | None = Field(None, description="same seed, same tokens")

    @model_validator(mode="after")
    def _bounded_extras(self) -> ExecuteParams:
        extra = self.model_extra or {}
        if len(extra) > MAX_IGNORED_PARAMS:
            raise ValueError(f"more than {MAX_IGNORED_PARAMS} params this worker does not use")
        bad = sum(1 for name in extra if _PARAM_NAME.fullmatch(name) is None)
        if bad:
            # The name itself is not echoed: it is not a name (control characters, 10 KB of
            # text), and error messages reach logs.
            raise ValueError(
                f"{bad} param name(s) not an identifier of at most {MAX_PARAM_NAME} characters "
                "([A-Za-z_][A-Za-z0-9_]*)"
            )
        return self

    @property
    def ignored(self) -> list[str]:
        """The names of the params this worker does not use, sorted (never their values)."""
        return sorted(self.model_extra or {})


class ExecuteRequest(_Strict):
    handle_id: str | None = Field(None, pattern=_JOB_ID, description="a handle from commit or ready")
    # The length limit is the worker's (default 100,000): create_app writes it into the schema.
    prompt: str = Field(
        min_length=1, json_schema_extra={"pattern": "^[^\\u0000]*$"}, description="no NUL characters"
    )
    params: ExecuteParams = Field(default_factory=lambda: ExecuteParams.model_validate({}))
    # Additions.
    job_id: str | None = Field(None, pattern=_JOB_ID)
    model: str | None = Field(None, pattern=_MODEL_NAME, description="a model by name")
    max_tokens: MaxTokens | None = Field(None, description="addition: same as params.max_tokens")

    @model_validator(mode="after")
    def _one_max_tokens(self) -> ExecuteRequest:
        both = self.max_tokens is not None and self.params.max_tokens is not None
        if both and self.max_tokens != self.params.max_tokens:
            raise ValueError("max_tokens and params.max_tokens differ")
        return self

    @property
    def effective_max_tokens(self) -> int | None:
        return self.params.max_tokens if self.params.max_tokens is not None else self.max_tokens


class CancelRequest(_Strict):
    job_id: str = Field(pattern=_JOB_ID)


class CancelResponse(BaseModel):
    job_id: str
    cancelled: bool


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
    status: Literal["ok", "degraded", "draining", "stopped"]
    state: str
    backend: str
    emulated: bool
    pre_verify: bool
    audit_head_mismatch: AuditHeadMismatchInfo | None = None
