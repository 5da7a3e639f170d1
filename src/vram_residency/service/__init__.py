"""The worker service: an authenticated HTTP API over a ``VramManager``.

``vram-residency serve`` runs it. The pieces, each in its own module:

* ``auth``: the worker token file (checks, creation) and the constant-time bearer check;
* ``config``: the worker's configuration (JSON file, ``WORKER_*`` environment), validated at start;
* ``catalog``: model names resolved inside the model directory, symlink escapes refused;
* ``lifecycle``: the state machine (Starting ... Stopped), incidents, the worker errors;
* ``worker``: the worker's models and facts, tying the pieces below together;
* ``commit``: sealing a model (by name, path or bytes), the digest forms, the executor build;
* ``scheduler``: the job queue, batching (one verification pass per batch), cancel, drain;
* ``scrubber``: background verification within a time budget;
* ``status``: the worker's state as the API shows it;
* ``executor`` and ``executors/``: the executor interface and the demonstration executors;
* ``api/``: the FastAPI application: routers, dependencies, the one error-to-HTTP mapping;
* ``server``: building a worker from options and running it under uvicorn.

Nothing heavy is imported with the package itself: ``vram_residency.service.lifecycle`` must be
importable without the web stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vram_residency.service.api.app import create_app
    from vram_residency.service.server import ServeOptions, ServerThread, build, serve
    from vram_residency.service.worker import Worker, WorkerConfig

__all__ = ["ServeOptions", "ServerThread", "Worker", "WorkerConfig", "build", "create_app", "serve"]

_WHERE = {
    "create_app": "vram_residency.service.api.app",
    "ServeOptions": "vram_residency.service.server",
    "ServerThread": "vram_residency.service.server",
    "build": "vram_residency.service.server",
    "serve": "vram_residency.service.server",
    "Worker": "vram_residency.service.worker",
    "WorkerConfig": "vram_residency.service.worker",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
