"""Domain errors of the worker service. They say what went wrong, never which HTTP status that
is: ``vram_residency.service.api.errors`` is the one place that maps errors to HTTP.

All extend the library's ``VramError`` (``retriable``/``fatal`` flags, no secrets in messages).
The lifecycle's own errors (``WorkerNotReady``, ``WorkerStopped``, ``IllegalTransition``) live in
``vram_residency.service.lifecycle``.
"""

from __future__ import annotations

import errno

from vram_residency.errors import InvalidInput, VramError

__all__ = [
    "JobCancelled",
    "JobConflict",
    "JobTimedOut",
    "ModelAlreadyCommitted",
    "ModelLoadFailed",
    "ModelNotCommitted",
    "ModelNotExecutable",
    "PathNotAllowed",
    "QueueFull",
    "ResourcesExhausted",
    "SignatureInvalid",
    "WorkerBusy",
    "out_of_descriptors",
]


class ModelLoadFailed(VramError):
    """The model could not be loaded as asked (unreadable file, bad header, a digest or signature
    that does not match). Nothing was left allocated; the worker's state is as before."""


class SignatureInvalid(ModelLoadFailed):
    """A commit's signature did not verify; the model was not loaded."""


class ModelAlreadyCommitted(InvalidInput):
    """A model of that name (or a handle of that id) is committed already."""


class ModelNotCommitted(InvalidInput):
    """No committed model answers to that name or handle id."""


class ModelNotExecutable(InvalidInput):
    """The model is sealed and verified, but no executor here runs it."""


class QueueFull(VramError):
    """The execution queue is full; try again shortly."""

    _retriable = True


class JobConflict(InvalidInput):
    """A job with that id is queued or running already."""


class JobCancelled(VramError):
    """The job was cancelled (by ``POST /worker/cancel`` or because its client went away)."""

    def __init__(self, message: str = "job cancelled", *, reason: str = "cancelled") -> None:
        self.reason = reason
        super().__init__(message)


class JobTimedOut(VramError):
    """The job ran longer than the worker's execution timeout."""


class PathNotAllowed(InvalidInput):
    """A model path outside the directories this worker loads models from."""


class WorkerBusy(VramError):
    """The shards are in use by a running execute; an exclusive operation (a move) retries later
    instead of queueing behind inference."""

    _retriable = True


class ResourcesExhausted(VramError):
    """The process ran out of file descriptors (EMFILE, ENFILE) while serving a request: a flood
    of connections holds them all. Transient: nothing was left allocated, the worker keeps
    running, and the same request succeeds once descriptors are free again. Not the client's
    fault and not the model's (which a MODEL_LOAD_FAILED would say, for good)."""

    _retriable = True


#: The errnos of "no descriptor free": this process's limit (EMFILE) or the system's (ENFILE).
_NO_DESCRIPTOR: frozenset[int] = frozenset({errno.EMFILE, errno.ENFILE})


def out_of_descriptors(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError saying that no file descriptor was free."""
    return isinstance(exc, OSError) and exc.errno in _NO_DESCRIPTOR
