"""The job queue: batching (one verification pass per batch), cancel, abort, drain.

Execute jobs go into one queue. A single execution thread takes every job waiting (up to
``max_batch``) and hands the batch to the worker's ``run_batch``, which verifies **every** shard
and then runs the batch on the sealed weights in place. Each job is therefore preceded by a full
verification that started after the job was queued. Batching is what makes this affordable: one
pass over the weights is shared by all jobs that were waiting for it (as a database shares one
fsync among the transactions of a group commit), instead of one pass per job.

Stopping a job
    ``ExecuteJob.cancel`` (a ``POST /worker/cancel``, the client going away, the drain timeout,
    the worker going Stopped) marks the job finished under its lock. From then on its ``token``
    callback forwards nothing and tells the executor to stop generating for it, and its result is
    replaced by the cancellation error. The SSE side checks the same flag before it writes a
    token, so no token produced after the cancel reaches the client.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Final

from vram_residency.service.errors import JobCancelled, JobConflict, QueueFull
from vram_residency.service.executor import JobInput, JobOutput, Token
from vram_residency.service.lifecycle import WorkerStopped

__all__ = ["ExecuteJob", "Scheduler", "VerifyInfo"]

log = logging.getLogger("vram_residency.service")

DEFAULT_MAX_QUEUE: Final = 4096
# Gathering a batch (see _take_batch), as multiples of the last verification pass's duration.
_GAP_FRACTION: Final = 0.1
_WINDOW_FRACTION: Final = 2.0
_MAX_GAP: Final = 0.02
_MAX_WINDOW: Final = 0.2

#: What a job learns from its verification pass (``worker.VerifyPass``), or None when
#: pre-verification is off, or the exception that refused it.
VerifyInfo = object


class ExecuteJob:
    """One queued execution. The worker calls ``on_verified`` once (a VerifyPass, or None when
    pre-verification is disabled, or an exception), then ``on_token`` for each token a generator
    produces, then ``on_done`` once (JobOutput or an exception) unless verification failed.

    ``correlation_id`` travels with the job into the worker's log lines and audit records."""

    __slots__ = (
        "_done",
        "_lock",
        "_verified",
        "batch_size",
        "cancel_error",
        "correlation_id",
        "input",
        "job_id",
        "model",
        "on_done",
        "on_token",
        "on_verified",
        "queued_at",
    )

    def __init__(
        self,
        job_id: str,
        model: str,
        job_input: JobInput,
        on_verified: Callable[[object], None],
        on_done: Callable[[JobOutput | BaseException], None],
        on_token: Callable[[Token], None] | None = None,
        *,
        correlation_id: str = "",
    ) -> None:
        self.job_id = job_id
        self.model = model
        self.input = job_input
        self.on_verified = on_verified
        self.on_done = on_done
        self.on_token = on_token
        self.correlation_id = correlation_id
        self.queued_at = time.perf_counter()
        self.batch_size = 0
        self.cancel_error: BaseException | None = None
        self._verified = False
        self._done = False
        self._lock = threading.Lock()

    @property
    def is_verified(self) -> bool:
        return self._verified

    @property
    def cancelled(self) -> bool:
        return self.cancel_error is not None

    def cancel(self, error: BaseException | None = None) -> bool:
        """Stop this job: no token is forwarded after this returns, and its end is ``error``
        (default: JobCancelled). False when it had finished or was cancelled already."""
        with self._lock:
            if self._done or self.cancel_error is not None:
                return False
            self.cancel_error = error if error is not None else JobCancelled()
        return True

    def verified(self, info: object) -> None:
        self._verified = True
        self.on_verified(info)

    def token(self, tok: Token) -> bool:
        """Forward one token; False when the job wants no more (cancelled): the executor stops
        generating for it."""
        with self._lock:
            # Under the lock: a cancel either happened before (nothing forwarded) or after.
            if self.cancel_error is not None or self._done:
                return False
            if self.on_token is not None:
                try:
                    self.on_token(tok)
                except Exception:
                    # One client's stream going away must not fail the batch the others share.
                    log.debug("token callback of %s failed", self.job_id, exc_info=True)
        return True

    def finish(self, out: JobOutput | BaseException) -> None:
        """The job's result (a cancellation replaces it)."""
        with self._lock:
            if self._done:
                return
            self._done = True
            result: JobOutput | BaseException = self.cancel_error or out
        if self._verified:
            self.on_done(result)
        else:
            self._verified = True
            self.on_verified(result if isinstance(result, BaseException) else None)

    def fail(self, exc: BaseException) -> None:
        self.finish(exc)


class Scheduler:
    """The queue and the execution thread; ``run_batch`` (the worker) runs each batch."""

    def __init__(
        self,
        run_batch: Callable[[list[ExecuteJob]], None],
        *,
        max_batch: int,
        last_verify_seconds: Callable[[], float],
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._last_verify_seconds = last_verify_seconds
        self._queue: collections.deque[ExecuteJob] = collections.deque()
        self._cond = threading.Condition()
        self._jobs: dict[str, ExecuteJob] = {}  # queued or running, by id
        self._closing = False
        self._last_batch_size = 1
        self._thread = threading.Thread(target=self._loop, name="vram-execute", daemon=True)
        self._thread.start()

    # -- jobs -----------------------------------------------------------------------------------
    def submit(self, job: ExecuteJob) -> None:
        with self._cond:
            if self._closing:
                raise WorkerStopped("worker is shutting down", reason="shutdown")
            if len(self._queue) >= self._max_queue:
                raise QueueFull("execution queue is full")
            if job.job_id in self._jobs:
                raise JobConflict(f"job {job.job_id!r} is queued or running already")
            self._jobs[job.job_id] = job
            self._queue.append(job)
            self._cond.notify_all()

    def done(self, job: ExecuteJob) -> None:
        """The job's stream is over: forget it."""
        with self._cond:
            if self._jobs.get(job.job_id) is job:
                del self._jobs[job.job_id]
            self._cond.notify_all()

    def cancel(self, job_id: str, error: BaseException | None = None) -> bool:
        """Cancel a queued or running job; False when no such job is live."""
        with self._cond:
            job = self._jobs.get(job_id)
        return job is not None and job.cancel(error)

    def abort_all(self, error: BaseException, *, running_only: bool = False) -> int:
        """Cancel every live job with ``error`` (a drain timeout, the worker going Stopped).
        ``running_only``: only jobs past their verification (the others get the error that
        refused them, or the Stopped state, when they reach the front)."""
        with self._cond:
            jobs = [j for j in self._jobs.values() if j.is_verified or not running_only]
        return sum(1 for j in jobs if j.cancel(error))

    @property
    def live(self) -> int:
        """Jobs queued or running (their streams not yet over)."""
        with self._cond:
            return len(self._jobs)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is live; True if that happened within ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs, timeout)

    # -- the execution thread -------------------------------------------------------------------
    def _take_batch(self) -> list[ExecuteJob]:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            # Let jobs that are arriving right now join this batch: a job that just misses it
            # pays for a whole verification pass of its own, and a loaded worker would otherwise
            # settle into several smaller batches per round of its clients, each verifying every
            # shard. The clients of the last batch are the ones expected back: wait for as many
            # jobs as that batch had, while they keep arriving less than a gap apart, within a
            # window. Gap and window scale with what a pass costs (V): V/10 and 2V (at most 20
            # and 200 ms). A lone client does not wait at all (its last batch had one job), and
            # with pre-verification off (V = 0) nothing waits.
            v = self._last_verify_seconds()
            gap, window = min(_GAP_FRACTION * v, _MAX_GAP), min(_WINDOW_FRACTION * v, _MAX_WINDOW)
            expected = min(self._last_batch_size, self._max_batch)
            deadline = time.monotonic() + window
            seen = len(self._queue)
            while seen < expected and not self._closing and gap > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(gap, remaining))
                if len(self._queue) == seen:
                    break  # a quiet gap: nobody else is coming right now
                seen = len(self._queue)
            n = min(len(self._queue), self._max_batch)
            self._last_batch_size = n
            batch = [self._queue.popleft() for _ in range(n)]
        # A job cancelled while it waited costs nothing: it ends here, before any verification.
        live = []
        for j in batch:
            if j.cancelled:
                j.finish(JobCancelled())
            else:
                live.append(j)
        return live if live or not batch else self._take_batch()

    def _loop(self) -> None:
        while True:
            jobs = self._take_batch()
            if not jobs:
                return  # closing and the queue is empty
            try:
                self._run_batch(jobs)
            except BaseException as exc:  # never let the thread die with jobs waiting
                log.exception("execution batch failed")
                for j in jobs:
                    with contextlib.suppress(Exception):
                        j.fail(exc)

    def close(self, timeout: float) -> list[ExecuteJob]:
        """Stop taking jobs, let the thread finish what is queued (within ``timeout``); the jobs
        that never ran are returned, failed with WorkerStopped."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            leftover = list(self._queue)
            self._queue.clear()
        for j in leftover:
            j.fail(WorkerStopped("worker shut down before the job ran", reason="shutdown"))
        return leftover
