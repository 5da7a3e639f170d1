"""Worker API routes that move a committed model's shard: migrate, offload, restore (issue 13).

    POST /worker/shards/{shard_id}/migrate  {"gpu_device": 1}
    POST /worker/shards/{shard_id}/offload  {"to": "host"} | {"to": "file", "path": "NAME"}
    POST /worker/shards/{shard_id}/restore

Registered by ONE line where the app is built (service/app.py keeps it; nothing else is needed):

    register_migrate_routes(app, worker, token, devices)

``token`` is the worker token (the worker does not keep it, and a manager for another device
needs it); ``devices`` the GPU ids this worker may move shards to. The routes use only the
worker's public API (``exclusive``, ``rebuild_executor``, ``switch_manager``, ``manager``,
``audit``) and ``vram_residency.devices.DeviceGroup``. No CLI: these endpoints are the interface.

The worker verifies and executes on one manager (``worker.manager``); so that every shard it
holds stays covered by its verification passes, a migration moves the worker to the destination
device: it is allowed while the worker holds exactly this one committed model (409 otherwise),
and the destination manager (same token, backend, worker id and audit log) becomes the worker's
manager. A model's executor runs on views of its buffer: it is closed before the shard moves or
is offloaded, and rebuilt on the new (or restored, verified) buffer. A running execute holds the
worker's execution lock: the request then answers 409 (retriable) instead of waiting.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI, Path
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from vram_residency.devices import DeviceGroup
from vram_residency.service.api.errors import ErrorCode, ServiceError
from vram_residency.service.auth import BearerCheck

if TYPE_CHECKING:
    from vram_residency.service.worker import CommittedModel, Worker

__all__ = ["MigrateRequest", "OffloadRequest", "ShardMoveResponse", "register_migrate_routes"]

_SHARD_ID: Any = Path(pattern=r"^shard-[0-9a-f]{32}$", max_length=64)
#: What the routes answer besides 200 (schemathesis checks that every answer is documented).
_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "INVALID_PARAMS (unknown device, bad path, already there)"},
    401: {"description": "AUTH_FAILED"},
    404: {"description": "the shard is not held by this worker"},
    409: {"description": "busy (a running execute; retriable), several models, or not offloaded"},
    413: {"description": "request body too large"},
    500: {"description": "a failed verification or device error (the worker stops)"},
    503: {"description": "worker not ready or stopped"},
    507: {"description": "VRAM_OOM on the destination"},
}


class MigrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpu_device: int = Field(ge=0, le=1023)


class OffloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: Literal["host", "file"] = "host"
    #: A plain file name, written in the worker's own offload directory (``to: "file"`` only).
    path: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ShardMoveResponse(BaseModel):
    shard_id: str
    previous_shard_id: str | None = None
    gpu_device: int
    vram_bytes: int
    state: Literal["resident", "offloaded"]
    repaired_units: int = 0


def _model(worker: Worker, shard_id: str) -> CommittedModel:
    model = next((m for m in worker.models() if m.shard.shard_id == shard_id), None)
    if model is None:
        raise ServiceError(404, ErrorCode.INVALID_PARAMS, f"shard {shard_id!r} is not held by this worker")
    return model


_OFFLOAD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _offload_file(worker: Worker, name: str | None) -> str:
    """Where a ``to: "file"`` offload goes: a plain file name inside the worker's own
    ``<state dir>/spool/offload/`` (0700). The API never writes to a path the caller chooses:
    whoever holds the token would otherwise write model bytes anywhere the worker's user can."""
    spool = worker.config.spool_dir
    if spool is None:
        raise ServiceError(400, ErrorCode.INVALID_PARAMS, "file offloads need the worker's state directory")
    if name is None or not _OFFLOAD_NAME.fullmatch(name) or name.endswith(".tmp"):
        raise ServiceError(
            400,
            ErrorCode.INVALID_PARAMS,
            "to='file' needs a path that is a plain file name (letters, digits, '.', '_', '-'); "
            "it is written in the worker's offload directory",
        )
    root = spool / "offload"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return str(root / name)


def register_migrate_routes(app: FastAPI, worker: Worker, token: bytes, devices: Sequence[int]) -> None:
    """Add the three routes to ``app``; ``devices`` are the device ids this worker may use."""
    ids = sorted(set(devices) | {worker.manager.device})
    bearer = BearerCheck(token)
    scheme = HTTPBearer(auto_error=False, description="the worker token")

    def require_token(creds: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:  # noqa: B008
        # The app's AuthMiddleware refuses requests without the token first; this keeps the
        # routes closed even where they are mounted without it.
        if creds is None or not bearer.check_header(f"{creds.scheme} {creds.credentials}"):
            raise ServiceError(401, ErrorCode.AUTH_FAILED, "")

    auth = [Depends(require_token)]
    group: DeviceGroup | None = None
    lock = threading.Lock()

    def devices_group() -> DeviceGroup:
        nonlocal group
        with lock:
            if group is None:
                mgr = worker.manager
                group = DeviceGroup(
                    token,
                    ids,
                    backend=mgr.backend,
                    worker_id=mgr.worker_id,
                    audit=worker.audit,
                    capacity_bytes=worker.config.capacity_bytes,
                )
                group.add(mgr)
            return group

    @app.post(
        "/worker/shards/{shard_id}/migrate",
        response_model=ShardMoveResponse,
        dependencies=auth,
        tags=["worker"],
        responses=_RESPONSES,
    )
    def migrate_shard(req: MigrateRequest, shard_id: str = _SHARD_ID) -> ShardMoveResponse:
        """Move a shard to another GPU, verified as it lands; the source is freed only after."""
        worker.lifecycle.ensure_can_work()
        if req.gpu_device not in ids:
            raise ServiceError(
                400, ErrorCode.INVALID_PARAMS, f"unknown device {req.gpu_device}; this worker has {ids}"
            )
        with worker.exclusive():
            model = _model(worker, shard_id)
            src = worker.manager
            if req.gpu_device == src.device:
                raise ServiceError(400, ErrorCode.INVALID_PARAMS, f"shard is on device {src.device} already")
            if len(worker.models()) != 1:
                raise ServiceError(
                    409,
                    ErrorCode.INVALID_PARAMS,
                    "the worker verifies one device: migrate only while it holds a single model",
                )
            g = devices_group()
            dest = g.manager(req.gpu_device)
            old = model.shard
            if model.executor is not None:
                model.executor.close()
                model.executor = None
            try:
                new = src.migrate(old, dest)
            except BaseException:
                worker.rebuild_executor(model)  # the source is intact: serve it again
                raise
            model.shard = new
            worker.switch_manager(dest)
            worker.rebuild_executor(model)
        return ShardMoveResponse(
            shard_id=new.shard_id,
            previous_shard_id=old.shard_id,
            gpu_device=new.gpu_device,
            vram_bytes=new.vram_bytes,
            state="resident",
        )

    @app.post(
        "/worker/shards/{shard_id}/offload",
        response_model=ShardMoveResponse,
        dependencies=auth,
        tags=["worker"],
        responses=_RESPONSES,
    )
    def offload_shard(req: OffloadRequest, shard_id: str = _SHARD_ID) -> ShardMoveResponse:
        """Move a shard to host memory or a file and free its VRAM; executing it answers 404
        (not sealed) until it is restored."""
        if req.to == "host" and req.path is not None:
            raise ServiceError(400, ErrorCode.INVALID_PARAMS, "path applies to to='file' only")
        target = _offload_file(worker, req.path) if req.to == "file" else None
        with worker.exclusive():
            model = _model(worker, shard_id)
            if model.executor is not None:
                model.executor.close()
                model.executor = None
            try:
                worker.manager.offload(model.shard, req.to, target)
            except BaseException:
                worker.rebuild_executor(model)
                raise
            model.executor_note = "offloaded: restore the shard to execute"
        shard = model.shard
        return ShardMoveResponse(
            shard_id=shard_id, gpu_device=shard.gpu_device, vram_bytes=shard.vram_bytes, state="offloaded"
        )

    @app.post(
        "/worker/shards/{shard_id}/restore",
        response_model=ShardMoveResponse,
        dependencies=auth,
        tags=["worker"],
        responses=_RESPONSES,
    )
    def restore_shard(shard_id: str = _SHARD_ID) -> ShardMoveResponse:
        """Bring an offloaded shard back, verified against its original seal before any use."""
        worker.lifecycle.ensure_can_work()
        with worker.exclusive():
            model = _model(worker, shard_id)
            if all(s.shard_id != shard_id for s in worker.manager.offloaded_shards()):
                raise ServiceError(409, ErrorCode.INVALID_PARAMS, f"shard {shard_id!r} is not offloaded")
            repaired = worker.manager.restore(model.shard)
            worker.rebuild_executor(model)
        return ShardMoveResponse(
            shard_id=shard_id,
            gpu_device=model.shard.gpu_device,
            vram_bytes=model.shard.vram_bytes,
            state="resident",
            repaired_units=repaired,
        )
