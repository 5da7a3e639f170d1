"""The worker service: an authenticated HTTP API over a ``VramManager``.

``vram-residency serve`` runs it. The pieces, each in its own module:

* ``auth``: the worker token file (checks, creation) and the constant-time bearer check;
* ``catalog``: model names resolved inside the model directory, symlink escapes refused;
* ``worker``: commits, verification before every execution (batched), the scrubber, lifecycle;
* ``executor`` and ``bert``: the executor interface and the built-in numpy BERT encoder that
  runs on the sealed weights in place;
* ``app``: the FastAPI application (endpoints, error codes, Server-Sent Events);
* ``server``: building a worker from options and running it under uvicorn.
"""

from vram_residency.service.app import create_app
from vram_residency.service.server import ServeOptions, ServerThread, build, serve
from vram_residency.service.worker import Worker, WorkerConfig

__all__ = ["ServeOptions", "ServerThread", "Worker", "WorkerConfig", "build", "create_app", "serve"]
