"""Background verification for users who run their own engine: a scrubber and a forward pre-hook.

``Scrubber(mgr)`` re-verifies every sealed shard, forever, in bounded chunks (about ``chunk_bytes``
per batched ``verify_many``), and sleeps between chunks so that verification takes
at most ``budget`` (default 2%) of the wall-clock time: a chunk that took ``t`` is followed by a pause of
``t * (1 - budget) / budget``. The time to detect a change is therefore about one pass over the
sealed bytes at ``budget`` of the verify throughput. Its verification runs at ``priority="low"``
(``backends.base.Priority``): on a GPU backend with ``Capabilities.priority_streams`` on a
low-priority stream, on the host backend on one thread.

By default the scrubber runs the keyed fast check (``check="fast"``: each shard's ``nh-fast-v1``
digest taken at seal time, see ``VramManager(fast_check=...)``), and the seal's own digest
(``sha256-tree-v1``/``blake3``) at most ``full_every_s`` (600 s) after it last matched: a shard is
fully re-checked on that cadence, and every shard without a fast digest is fully checked every
time. Audit events say which check ran (``check``).

``verify_before_forward(module, mgr, model, every_ms=...)`` registers a PyTorch forward pre-hook
that verifies ``model`` before a forward pass when the last verification is older than
``every_ms``: a failed seal raises ``SealVerificationFailed`` out of the forward call, before
anything is computed on changed weights.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from vram_residency._core import CHECKS, Check
from vram_residency.errors import InvalidInput, NotSealed, SealVerificationFailed
from vram_residency.shard import SealedShard

if TYPE_CHECKING:
    from vram_residency.manager import VramManager
    from vram_residency.sources.model import SealedModel

__all__ = ["DEFAULT_BUDGET", "Scrubber", "verify_before_forward"]

log = logging.getLogger("vram_residency")

DEFAULT_CHUNK_BYTES: Final = 256 << 20
#: The default share of wall-clock time the scrubber verifies. Beside an engine whose decode loop
#: is bound by its host (transformers' eager ``generate()`` of a 2 GB Llama on an H200 ran 12 ms a
#: token with the GPU mostly idle), what serving loses is about that share: 0.05 measured 1.004x
#: and 1.054x slower generation on two runs, over the 5% that "does not slow serving" may cost.
#: At 0.02 a pass over that model still takes about a second (bench/results/scrub-generate-*.md),
#: and a larger model's pass grows with its bytes; pass ``budget=`` to trade detection time for
#: serving time.
DEFAULT_BUDGET: Final = 0.02
#: How long a shard may go on fast checks alone before its seal's (cryptographic) digest is
#: recomputed: the fast check already catches every fault that does not know the key, so this
#: bounds only how long a key-holder's forgery of the fast digest could stand.
DEFAULT_FULL_EVERY_S: Final = 600.0


def check_full_every(full_every_s: object) -> float:
    if (
        isinstance(full_every_s, bool)
        or not isinstance(full_every_s, (int, float))
        or not 0 <= full_every_s < float("inf")
    ):
        raise InvalidInput("full_every_s must be a finite non-negative number of seconds")
    return float(full_every_s)


def chunks(shards: Iterable[SealedShard], chunk_bytes: int) -> list[list[SealedShard]]:
    """Consecutive groups of at most ``chunk_bytes`` (a larger shard is a chunk of its own: a
    digest covers a whole shard)."""
    out: list[list[SealedShard]] = []
    size = 0
    for s in shards:
        if not out or size + s.vram_bytes > chunk_bytes:
            out.append([])
            size = 0
        out[-1].append(s)
        size += s.vram_bytes
    return out


class Scrubber:
    """Re-verifies a manager's shards in the background within a time budget.

    ``shards``: what to verify (a callable returning shards, re-read every pass); by default every
    shard the manager holds. ``on_failure(error)`` is called from the scrubber's thread with each
    ``SealVerificationFailed``; with ``stop_on_failure`` (the default) the scrubber then stops.
    ``check``: ``"fast"`` (default; the keyed fast digest, with the full check every
    ``full_every_s`` seconds per shard) or ``"full"`` (the seal's digest every pass).
    Use it as a context manager, or ``start()`` / ``stop()``.
    """

    def __init__(
        self,
        manager: VramManager,
        *,
        budget: float = DEFAULT_BUDGET,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        shards: Callable[[], Iterable[SealedShard]] | None = None,
        on_failure: Callable[[SealVerificationFailed], None] | None = None,
        stop_on_failure: bool = True,
        min_pass_interval_s: float = 0.0,
        check: Check = "fast",
        full_every_s: float = DEFAULT_FULL_EVERY_S,
    ) -> None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise InvalidInput("budget must be a fraction in (0, 1]")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise InvalidInput("chunk_bytes must be a positive integer")
        if (
            isinstance(min_pass_interval_s, bool)
            or not isinstance(min_pass_interval_s, (int, float))
            or not 0 <= min_pass_interval_s < float("inf")  # Event.wait(inf) kills the thread
        ):
            raise InvalidInput("min_pass_interval_s must be a finite non-negative number")
        if check not in CHECKS:
            raise InvalidInput(f"check must be one of {CHECKS}, not {check!r}")
        self._check: Check = check
        self._full_every_s = check_full_every(full_every_s)
        self._mgr = manager
        self._budget = float(budget)
        self._chunk_bytes = chunk_bytes
        self._select = shards if shards is not None else manager.shards
        self._on_failure = on_failure
        self._stop_on_failure = stop_on_failure
        self._min_pass = float(min_pass_interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.passes = 0
        self.bytes_verified = 0
        self.busy_s = 0.0
        self.last_error: BaseException | None = None

    @property
    def budget(self) -> float:
        return self._budget

    @property
    def check(self) -> Check:
        return self._check

    @property
    def full_every_s(self) -> float:
        return self._full_every_s

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Scrubber:
        with self._lock:
            if self.running:
                return self
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="vram-scrubber", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the chunk in progress (a chunk is bounded by ``chunk_bytes``)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> Scrubber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_pass(self) -> bool:
        """One pass over the shards, chunk by chunk, pausing to keep within the budget. False
        when it ended early (stopped, or a failure with ``stop_on_failure``)."""
        for chunk in chunks(self._select(), self._chunk_bytes):
            if self._stop.is_set():
                return False
            start = time.monotonic()
            ok = self._verify_chunk(chunk)
            took = time.monotonic() - start
            self.busy_s += took
            if not ok and self._stop_on_failure:
                self._stop.set()
                return False
            # The duty cycle: busy for `took`, then idle so that busy / (busy + idle) = budget.
            if self._budget < 1 and self._stop.wait(took * (1 - self._budget) / self._budget):
                return False
        self.passes += 1
        return True

    def _verify_chunk(self, chunk: list[SealedShard]) -> bool:
        store = self._mgr.store
        kw: dict[str, Any] = {"priority": "low", "check": self._check, "full_every_s": self._full_every_s}
        try:
            store.verify_many(chunk, **kw)
        except NotSealed:
            # A shard was deallocated (or the manager closed) since the list was read: verify the
            # others one by one, skipping what is gone.
            for s in chunk:
                if self._stop.is_set() or store.closed:
                    return True
                try:
                    store.verify_many([s], **kw)
                except NotSealed:
                    continue
                except SealVerificationFailed as exc:
                    return self._failed(exc)
        except SealVerificationFailed as exc:
            return self._failed(exc)
        self.bytes_verified += sum(s.vram_bytes for s in chunk)
        return True

    def _failed(self, exc: SealVerificationFailed) -> bool:
        self.last_error = exc
        log.error("scrubber: %s", exc)
        if self._on_failure is not None:
            try:
                self._on_failure(exc)
            except Exception:  # the callback's own bug must not kill the scrubber silently
                log.exception("scrubber: on_failure callback raised")
        return False

    def _run(self) -> None:
        while not self._stop.is_set() and not self._mgr.store.closed:
            began = time.monotonic()
            try:
                completed = self.run_pass()
            except Exception as exc:  # a closed manager, an audit write that failed, ...
                self.last_error = exc
                if not self._mgr.store.closed:
                    log.exception("scrubber stopped")
                return
            if not completed:
                return
            rest = self._min_pass - (time.monotonic() - began)
            if rest > 0 and self._stop.wait(rest):
                return
            if not any(True for _ in self._select()) and self._stop.wait(0.05):
                return  # nothing sealed yet: do not spin


def verify_before_forward(
    module: Any,
    manager: VramManager,
    model: SealedModel | Iterable[SealedShard],
    *,
    every_ms: float = 0.0,
    check: Check = "full",
    full_every_s: float = DEFAULT_FULL_EVERY_S,
) -> Any:
    """Register a forward pre-hook on ``module`` (a ``torch.nn.Module``) that verifies ``model``
    before a forward pass when the previous verification is at least ``every_ms`` old (0: before
    every pass). Returns the hook's handle (``handle.remove()`` takes it off).

    The first forward always verifies. A failed seal raises ``SealVerificationFailed`` from the
    forward call, so nothing is computed on changed weights. ``check="fast"`` compares the keyed
    fast digests instead, with the seal's digest re-checked per shard every ``full_every_s``."""
    if check not in CHECKS:
        raise InvalidInput(f"check must be one of {CHECKS}, not {check!r}")
    full_every = check_full_every(full_every_s)
    if (
        isinstance(every_ms, bool)
        or not isinstance(every_ms, (int, float))
        or not 0 <= every_ms < float("inf")  # NaN and infinity have no nanoseconds
    ):
        raise InvalidInput("every_ms must be a finite non-negative number")
    register = getattr(module, "register_forward_pre_hook", None)
    if not callable(register):
        raise InvalidInput(f"{type(module).__name__} has no register_forward_pre_hook (not a torch module)")
    target: Any = model if not isinstance(model, SealedShard) else [model]
    interval_ns = int(every_ms * 1e6)
    last = [0]
    lock = threading.Lock()

    def hook(_module: Any, _args: Any) -> None:
        now = time.monotonic_ns()
        with lock:
            if last[0] and now - last[0] < interval_ns:
                return
            manager.verify_many(target, check=check, full_every_s=full_every)
            last[0] = time.monotonic_ns()

    return register(hook)
