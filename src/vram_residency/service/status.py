"""The worker's state as the API shows it: the contract's ``ModelShardHandle`` and ready body,
with this project's own facts beside them (additions a spec-shaped client may ignore)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from vram_residency.errors import VramError
from vram_residency.service.lifecycle import WorkerState

if TYPE_CHECKING:
    from vram_residency.service.worker import CommittedModel, Worker

__all__ = ["handle", "head_mismatch", "last_verified_ns", "worker_status"]


def last_verified_ns(worker: Worker, m: CommittedModel, known: dict[str, int] | None = None) -> int | None:
    """When ``m``'s shard last matched its seal, ns since the epoch: the later of the service's
    own passes and the seal core's record, which also sees attestations, seal-age re-verification
    and a migration's check on the target device (none of which go through the service)."""
    if known is None:
        known = _core_last_verified(worker)
    t = max(m.last_verified_ns, known.get(m.shard.shard_id, 0))
    return t or None


def _core_last_verified(worker: Worker) -> dict[str, int]:
    try:
        return worker.manager.last_verified_ns()
    except VramError:  # closed or stopped: nothing to show beyond the service's own record
        return {}


def handle(worker: Worker, m: CommittedModel, known: dict[str, int] | None = None) -> dict[str, Any]:
    """llama-orch's ModelShardHandle (never a device pointer, WORKER-4111), plus when the seal
    was last verified from device memory (the seal's age)."""
    t = last_verified_ns(worker, m, known)
    return {
        "shard_id": m.handle_id,
        "gpu_device": worker.config.device,
        "vram_bytes": m.shard.vram_bytes,
        "sealed": True,
        # WORKER-4113/4223: bare hex is SHA-256 of the model bytes, here as in expected_digest.
        # Without that SHA-256 (it is computed only when a commit asks for it, as the bytes
        # stream in), the seal's digest with its algorithm: the form expected_digest takes for
        # it, never a bare hex that a client would read, and check, as SHA-256.
        "digest": m.sha256 or f"{m.shard.digest_algorithm}:{m.shard.digest}",
        "model_ref": m.name,
        "shard_index": m.shard_index,
        "total_shards": m.total_shards,
        # Additions: which digest "digest" is, the seal's own digest, and the seal's age.
        "digest_algorithm": "sha256" if m.sha256 else m.shard.digest_algorithm,
        "seal_shard_id": m.shard.shard_id,
        "seal_digest": f"{m.shard.digest_algorithm}:{m.shard.digest}",
        "last_verified_at": t / 1e9 if t else None,
        "seal_age_s": round((time.time_ns() - t) / 1e9, 3) if t else None,
    }


def head_mismatch(worker: Worker) -> dict[str, str] | None:
    """The audit head mismatch found at start (kind and incident id: no secret, so /health may
    show it), or None."""
    inc = worker.audit_head_incident
    if inc is None:
        return None
    return {"kind": str(inc.details.get("kind", "")), "incident_id": inc.id}


def worker_status(worker: Worker) -> dict[str, Any]:
    state = worker.lifecycle.state
    incidents = worker.lifecycle.incidents
    last = incidents[-1] if incidents else None
    models = worker.models()
    known = _core_last_verified(worker)
    return {
        # The contract (WORKER-4230): ready only with a model loaded and no seal failed.
        "ready": state in (WorkerState.READY, WorkerState.EXECUTING) and bool(models),
        # A tensor-parallel group: every rank's shards (shard_index = rank), and the group's id.
        "handles": [h for m in models for h in (worker.rank_handles(m) or [handle(worker, m, known)])],
        "nccl_group_id": worker.group_id(),
        # Additions.
        "state": state.value,
        "worker_id": worker.config.worker_id,
        "pool_id": worker.config.pool_id,
        "backend": worker.backend,
        "backend_description": worker.backend_description,
        "emulated": worker.emulated,
        "pre_verify": worker.config.pre_verify,
        "loading": worker.loading,
        "models": [
            {
                "name": m.name,
                "handle_id": m.handle_id,
                "shard_id": m.shard.shard_id,
                "vram_bytes": m.shard.vram_bytes,
                "digest_algorithm": m.shard.digest_algorithm,
                "digest": m.shard.digest,
                "sha256": m.sha256,
                "format": m.files.format,
                "executable": m.executor is not None,
                "kind": m.executor.kind if m.executor is not None else None,
                "executor": m.executor_note,
                "side_files_sha256": m.side_files,
                "last_verified_ns": last_verified_ns(worker, m, known),
            }
            for m in models
        ],
        "seals": [m.shard.record() for m in models],
        "last_scrub": None
        if worker.last_scrub is None
        else {"shards": worker.last_scrub.shards, "seconds": worker.last_scrub.seconds},
        "incident": None
        if last is None
        else {
            "id": last.id,
            "error_type": last.error_type,
            "message": last.message,
            "shard_id": last.shard_id,
            "time_ns": last.time_ns,
            "audit_record_id": last.audit_record_id,
        },
        "audit_head_mismatch": head_mismatch(worker),
    }
