"""Sealing and verifying one model over a ``torch.distributed`` group, with one verdict.

Every rank seals its own part with its own ``VramManager``. :meth:`TPModel.seal` exchanges the
parts (sizes, then bytes: two all_gathers, once per model) and every rank builds the same
``tp-record-v1`` record. :meth:`TPModel.verify` is the hot path: each rank verifies its shards
locally, then ONE all_gather of a fixed-size verdict per rank (pass/fail, a 32-byte summary of the
digests it measured, the names of what failed) tells every rank the same result. On the success
path nothing is encoded, allocated or decoded: each rank's pass verdict is fixed by the record, so
it is sent from a buffer made once, and the gathered bytes are compared with every rank's pass
verdict at once; only a mismatch is decoded rank by rank.

The verdict travels on a separate gloo group created with a timeout (by default; NCCL groups can
carry it too, see ``verdict_transport``), so that a rank that died, hangs, or whose network went
away makes the collective fail within that timeout instead of blocking the others forever. The
timeout must exceed the spread between the ranks' local verification times: a rank that is merely
slower than that is indistinguishable from a hung one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, Literal

from vram_residency.distributed._errors import RankUnresponsive, TPIncident, TPVerificationFailed
from vram_residency.distributed._record import RankPart, TPRecord, check_tp_record, tp_key
from vram_residency.errors import ConfigError, InvalidInput, SealVerificationFailed
from vram_residency.formats.seal import fields_from_record
from vram_residency.manager import AuditSink, VramManager
from vram_residency.shard import SealedShard
from vram_residency.sources.model import SealedModel

if TYPE_CHECKING:
    import torch

__all__ = ["VERDICT_BYTES", "TPModel", "seal_tp", "verify_shards"]

log = logging.getLogger("vram_residency.distributed")

#: Size of one rank's verdict in the collective: small enough for one message, large enough for
#: the names of a few dozen failing tensors (longer lists are truncated; the count stays exact).
VERDICT_BYTES: Final = 1024
_PASS, _FAIL = 1, 2
_SUMMARY_DOMAIN: Final = b"vram-tp-verdict-v1"
_HEAD: Final = 1 + 32 + 4 + 2  # verdict, summary, LE32 failing count, LE16 names length

VerdictTransport = Literal["gloo", "group"]


def _dist() -> Any:
    try:
        import torch.distributed as dist
    except ImportError:
        raise ConfigError(
            "vram_residency.distributed needs torch (install the 'distributed' extra)"
        ) from None
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("torch.distributed is not initialized: call init_process_group first")
    return dist


def _flatten(shards: Sequence[SealedShard | SealedModel]) -> tuple[SealedShard, ...]:
    out: list[SealedShard] = []
    for s in shards:
        if isinstance(s, SealedModel):
            out.extend(s.shards)
        elif isinstance(s, SealedShard):
            out.append(s)
        else:
            raise InvalidInput(f"expected SealedShard or SealedModel, not {type(s).__name__}")
    if not out:
        raise InvalidInput("a rank's part needs at least one shard")
    if len({s.shard_id for s in out}) != len(out):
        raise InvalidInput("a shard appears twice in the rank's part")
    return tuple(out)


def verify_shards(mgr: VramManager, shards: Sequence[SealedShard]) -> list[Exception | None]:
    """Verify every shard of ``shards`` in one batch (``VramManager.verify_many``: one pass over a
    segment table on the device); one entry per shard: ``None`` or its error. Every changed shard is
    named, not just the first."""
    out: list[Exception | None] = [None] * len(shards)
    try:
        mgr.verify_many(shards)
    except SealVerificationFailed as exc:
        failed = {f.shard_id: f for f in exc.failures}
        if not any(s.shard_id in failed for s in shards):
            # It names none of these shards (raised by an audit sink, say): not a verdict on
            # them. Left as is, every entry stayed None and the rank sent its PASS verdict
            # although its verify raised; each shard is checked alone instead.
            return _one_by_one(mgr, shards)
        for i, s in enumerate(shards):
            f = failed.get(s.shard_id)
            if f is not None:
                out[i] = SealVerificationFailed(
                    str(exc) if len(failed) == 1 else f"shard {f.shard_id} failed verification",
                    shard_id=f.shard_id,
                    expected_digest=f.expected_digest,
                    actual_digest=f.actual_digest,
                    corrupted_ranges=f.corrupted_ranges,
                    corrupted_tensors=f.corrupted_tensors,
                    tag_valid=f.tag_valid,
                )
    except Exception:  # any failure must still reach the collective, or the group hangs
        # Not a seal failure (a foreign or freed shard, a device error): one shard at a time, so
        # that each error stays with its shard.
        return _one_by_one(mgr, shards)
    return out


def _one_by_one(mgr: VramManager, shards: Sequence[SealedShard]) -> list[Exception | None]:
    """Each shard verified alone, after the batch raised an error that is not a verdict on these
    shards: a shard that then passes was verified; each error stays with its shard."""
    out: list[Exception | None] = [None] * len(shards)
    for i, s in enumerate(shards):
        try:
            mgr.verify_sealed(s)
        except Exception as one:  # any failure must still reach the collective, or the group hangs
            out[i] = one
    return out


def _summary(digests: Sequence[bytes]) -> bytes:
    h = hashlib.sha256(_SUMMARY_DOMAIN)
    h.update(len(digests).to_bytes(4, "little"))
    for d in digests:
        h.update(d)
    return h.digest()


def _names_of(shard: SealedShard, exc: Exception) -> list[str]:
    if isinstance(exc, SealVerificationFailed) and exc.corrupted_tensors:
        return list(exc.corrupted_tensors)
    return [f"shard:{shard.shard_id}"]


def _encode_verdict(ok: bool, summary: bytes, names: Sequence[str]) -> bytes:
    blob = b""
    for n in names:  # whole names only, in order, as many as fit
        raw = n.encode("utf-8", errors="replace")
        add = raw if not blob else b"\n" + raw
        if _HEAD + len(blob) + len(add) > VERDICT_BYTES:
            break
        blob += add
    head = bytes([_PASS if ok else _FAIL]) + summary + len(names).to_bytes(4, "little")
    out = head + len(blob).to_bytes(2, "little") + blob
    return out + bytes(VERDICT_BYTES - len(out))


def _decode_verdict(raw: bytes) -> tuple[int, bytes, int, list[str]]:
    verdict, summary = raw[0], raw[1:33]
    count = int.from_bytes(raw[33:37], "little")
    n = min(int.from_bytes(raw[37:39], "little"), VERDICT_BYTES - _HEAD)
    blob = raw[_HEAD : _HEAD + n].decode("utf-8", errors="replace")
    return verdict, summary, count, (blob.split("\n") if blob else [])


class TPModel:
    """This rank's view of a model sealed over a tensor-parallel group.

    Made by :meth:`seal` (collectively, on every rank). ``verify`` is collective too: every rank
    of the group must call it, the same number of times. After any incident the model is
    ``"stopped"`` on every rank and ``verify`` raises that incident again without touching the
    group.
    """

    def __init__(
        self,
        *,
        manager: VramManager,
        shards: tuple[SealedShard, ...],
        record: TPRecord,
        rank: int,
        verdict_group: Any,
        verdict_device: torch.device,
        timeout_s: float,
        audit: AuditSink | None,
        on_incident: Callable[[TPIncident], None] | None,
    ) -> None:
        self._mgr = manager
        self._shards = shards
        self._record = record
        self._rank = rank
        self._vgroup = verdict_group
        self._vdevice = verdict_device
        self._timeout = timedelta(seconds=timeout_s)
        self._audit = audit
        self._on_incident = on_incident
        self._incident: TPIncident | None = None
        # What each rank's summary must be when it passes: the digests sealed in the record.
        self._expected = [_summary([bytes.fromhex(s.digest) for s in p.shards]) for p in record.parts]
        # The success path compares the whole gathered buffer with this, once: every rank's pass
        # verdict over exactly the record's digests. Only a mismatch is decoded rank by rank.
        self._all_pass = b"".join(_encode_verdict(True, e, ()) for e in self._expected)
        self._channel = _VerdictChannel(
            verdict_group, verdict_device, record.world_size, _encode_verdict(True, self._expected[rank], ())
        )
        self.last_local_ns = 0
        self.last_collective_ns = 0

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def seal(
        cls,
        manager: VramManager,
        shards: Sequence[SealedShard | SealedModel],
        *,
        model_name: str,
        token: str | bytes,
        group: Any = None,
        timeout_s: float = 60.0,
        verdict_transport: VerdictTransport = "gloo",
        audit: AuditSink | None = None,
        on_incident: Callable[[TPIncident], None] | None = None,
    ) -> TPModel:
        """Bind this rank's sealed ``shards`` (already sealed by ``manager``) into the group's
        ``tp-record-v1`` record. Every rank of ``group`` (default: the whole world) calls this.

        ``verdict_transport="gloo"`` (default) creates a gloo group over the same ranks, with
        ``timeout_s``, for the verdicts; every process of the default group must then call this
        (``new_group`` is collective over the world). ``"group"`` sends the verdicts over
        ``group`` itself (NCCL on GPUs: one device all_gather, waited on with the timeout)."""
        dist = _dist()
        import torch

        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
            raise InvalidInput("timeout_s must be a positive number")
        if verdict_transport not in ("gloo", "group"):
            raise InvalidInput("verdict_transport must be 'gloo' or 'group'")
        mine = _flatten(shards)
        # Every shard must be this manager's and still sealed: a cheap local check before the
        # group is involved (verify_sealed raises NotSealed for a foreign or freed shard).
        owned = {s.shard_id for s in manager.shards()}
        stray = [s.shard_id for s in mine if s.shard_id not in owned]
        if stray:
            raise InvalidInput(f"shards not sealed by this rank's manager: {stray[:3]}")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        ranks = list(range(world)) if group is None else dist.get_process_group_ranks(group)
        timeout = timedelta(seconds=timeout_s)
        if verdict_transport == "gloo":
            vgroup = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout)
            vdevice = torch.device("cpu")
        else:
            vgroup = group
            backend = str(dist.get_backend(group)).lower()
            on_gpu = backend == "nccl"
            vdevice = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        part = RankPart(rank, manager.device, manager.worker_id, mine)
        payloads = _all_gather_bytes(
            dist, json.dumps(part.record(), separators=(",", ":")).encode(), vgroup, vdevice, timeout
        )
        parts = [RankPart(r, **_part_fields(json.loads(p))) for r, p in enumerate(payloads)]
        unchecked = TPRecord.make(tp_key(token), model_name, parts).record()
        # Every other rank's seals are checked under the token, as an orchestrator would.
        record = check_tp_record(unchecked, token)
        if record.parts[rank].shards != mine or [s.tag for s in record.parts[rank].shards] != [
            s.tag for s in mine
        ]:
            raise InvalidInput("this rank's part came back changed from the exchange")
        return cls(
            manager=manager,
            shards=mine,
            record=record,
            rank=rank,
            verdict_group=vgroup,
            verdict_device=vdevice,
            timeout_s=float(timeout_s),
            audit=audit,
            on_incident=on_incident,
        )

    # -- properties ---------------------------------------------------------------------------
    @property
    def record(self) -> TPRecord:
        return self._record

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._record.world_size

    @property
    def shards(self) -> tuple[SealedShard, ...]:
        return self._shards

    @property
    def state(self) -> Literal["ready", "stopped"]:
        return "stopped" if self._incident is not None else "ready"

    @property
    def incident(self) -> TPIncident | None:
        return self._incident

    def __repr__(self) -> str:
        return (
            f"TPModel(model_name={self._record.model_name!r}, rank={self._rank}, "
            f"world_size={self.world_size}, shards={len(self._shards)}, state={self.state!r})"
        )

    # -- verification -------------------------------------------------------------------------
    def verify(self) -> None:
        """Verify this rank's shards, then agree with every rank on one verdict (one collective).

        Returns when every rank passed. Otherwise moves this rank to Stopped, audits the
        incident, calls ``on_incident`` and raises :class:`TPVerificationFailed` (naming the
        failing ranks and their tensors, the same on every rank) or :class:`RankUnresponsive`."""
        if self._incident is not None:
            raise self._incident
        _dist()  # still initialized: a destroyed group is a ConfigError, not a hang
        t0 = time.perf_counter_ns()
        errors = verify_shards(self._mgr, self._shards)
        ok = all(e is None for e in errors)
        names: list[str] = []
        payload: bytes | None = None  # None: this rank's precomputed pass verdict (no encoding)
        if not ok:
            measured: list[bytes] = []
            for s, exc in zip(self._shards, errors, strict=True):
                if exc is None:
                    measured.append(bytes.fromhex(s.digest))
                    continue
                actual = exc.actual_digest if isinstance(exc, SealVerificationFailed) else ""
                measured.append(bytes.fromhex(actual) if actual else bytes(32))
                names.extend(_names_of(s, exc))
            payload = _encode_verdict(False, _summary(measured), names)
        t1 = time.perf_counter_ns()
        try:
            flat = self._channel.gather(payload, self._timeout)
        except Exception as exc:  # DistBackendError, a timeout, a peer gone: all the same here
            self.last_local_ns, self.last_collective_ns = t1 - t0, time.perf_counter_ns() - t1
            local = f"; this rank's own shards {'passed' if ok else 'FAILED: ' + ', '.join(names[:8])}"
            self._stop(
                RankUnresponsive(
                    f"rank {self._rank}: the verdict collective of {self._record.model_name!r} did not "
                    f"complete within {self._timeout.total_seconds():g} s ({type(exc).__name__}); "
                    f"stopping{local}",
                    rank=self._rank,
                    failing_ranks=() if ok else (self._rank,),
                ),
                reason="rank unresponsive",
            )
        t2 = time.perf_counter_ns()
        self.last_local_ns, self.last_collective_ns = t1 - t0, t2 - t1
        if flat == self._all_pass:  # the common case: one comparison, nothing decoded
            self._verified()
            return
        n = VERDICT_BYTES
        gathered = [flat[i * n : (i + 1) * n] for i in range(self.world_size)]
        failing: list[int] = []
        tensors: dict[int, list[str]] = {}
        counts: dict[int, int] = {}
        for r, raw in enumerate(gathered):
            verdict, summary, count, got = _decode_verdict(raw)
            if verdict == _PASS and hmac.compare_digest(summary, self._expected[r]):
                continue
            failing.append(r)
            if verdict == _PASS:  # claims a pass over digests other than the record's
                got, count = ["digest summary differs from the record"], 1
            tensors[r], counts[r] = got, count
        if failing:
            k = failing[0]
            why = (
                f"rank {self._rank} FAILED verification"
                if self._rank in failing
                else f"rank {self._rank} is fine; stopped because rank {k} failed"
            )
            detail = "; ".join(
                f"rank {r}: {', '.join(tensors[r][:8])}{' ...' if counts[r] > 8 else ''}" for r in failing
            )
            self._stop(
                TPVerificationFailed(
                    f"{self._record.model_name!r}: verification failed on rank(s) "
                    f"{', '.join(map(str, failing))} ({detail}); {why}",
                    rank=self._rank,
                    failing_ranks=failing,
                    tensors=tensors,
                    tensor_counts=counts,
                ),
                reason="verification failed",
            )
        # Reached only when the buffer differs from the expected one where no verdict field lies
        # (the padding, as a peer of another version might leave it): every rank passed over
        # the record's digests, which is all the verdict says.
        self._verified()

    def _verified(self) -> None:
        if self._audit is not None:
            self._audit.emit(
                "TPVerified",
                model=self._record.model_name,
                rank=self._rank,
                world_size=self.world_size,
                local_ns=self.last_local_ns,
                collective_ns=self.last_collective_ns,
            )

    def _stop(self, incident: TPIncident, *, reason: str) -> None:
        self._incident = incident
        log.error("tensor-parallel incident: %s", incident)
        try:
            if self._audit is not None:
                self._audit.emit(
                    "TPIncident",
                    critical=True,
                    model=self._record.model_name,
                    rank=self._rank,
                    world_size=self.world_size,
                    reason=reason,
                    failing_ranks=list(incident.failing_ranks),
                    failing_tensors={str(r): v for r, v in getattr(incident, "tensors", {}).items()},
                    message=str(incident),
                )
        finally:
            if self._on_incident is not None:
                self._on_incident(incident)
        raise incident


def _part_fields(obj: Any) -> dict[str, Any]:
    """A gathered part's fields. The seal tags are not checked here: ``check_tp_record`` checks
    all of them, under the token, right after the record is assembled."""
    if not isinstance(obj, dict) or not isinstance(obj.get("seals"), list):
        raise InvalidInput("a rank sent a malformed part")
    shards = []
    for rec in obj["seals"]:
        fields, tag = fields_from_record(rec)
        shards.append(SealedShard.from_fields(fields, tag))
    return {"device": obj.get("device"), "worker_id": obj.get("worker_id"), "shards": tuple(shards)}


class _VerdictChannel:
    """The per-verify collective, made once per model: a fixed-size all_gather of one verdict per
    rank into buffers allocated here, so that the success path does no encoding, no allocation
    and no host-to-device copy (this rank's pass verdict stays on the device), and one
    device-to-host copy of ``world x VERDICT_BYTES`` into pinned memory."""

    #: On a GPU, how long to poll the collective's completion before falling back to
    #: ``work.wait(timeout)``, which ProcessGroupNCCL implements as a loop that sleeps 1 ms
    #: (10 ms in older torch) between checks: most of a verify's fixed cost when the last rank
    #: arrives a few microseconds after this one. A few ms covers the usual spread between the
    #: ranks' local verifies; beyond it the wait costs one poll period at most. Not on CPUs:
    #: gloo's wait is a condition variable, and polling only takes a core from the other ranks
    #: (measured slower with 2 gloo ranks on 2 cores).
    SPIN_S: Final = 0.005

    def __init__(self, group: Any, device: torch.device, world: int, pass_verdict: bytes) -> None:
        import torch

        self._group = group
        self._device = device
        self._on_gpu = device.type == "cuda"
        self._pass = torch.frombuffer(bytearray(pass_verdict), dtype=torch.uint8).to(device)
        self._out = torch.empty(world * len(pass_verdict), dtype=torch.uint8, device=device)
        self._host = (
            torch.empty(self._out.numel(), dtype=torch.uint8, pin_memory=True) if self._on_gpu else self._out
        )
        dist = _dist()
        # all_gather_into_tensor became a deprecated alias (with a warning on every call) of
        # all_gather_single; older torch (>= 2.4, the extra's floor) has only the former.
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def gather(self, payload: bytes | None, timeout: timedelta) -> bytes:
        """Every rank's verdict, in rank order: ``payload``, or this rank's pass verdict for None.
        Raises (a timeout, a backend error) when the group does not complete within ``timeout``."""
        import torch

        src = self._pass
        if payload is not None:
            src = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self._device)
        start = time.monotonic()
        work = self._gather(self._out, src, group=self._group, async_op=True)
        if self._on_gpu:
            spin_end = start + min(self.SPIN_S, timeout.total_seconds())
            while not work.is_completed() and time.monotonic() < spin_end:
                time.sleep(0)  # lets other threads (rank 0's HTTP server) run meanwhile
            # Completed or not, wait() is what raises the backend's errors (and aborts the
            # communicator on a timeout); once completed it returns without sleeping.
            timeout = max(timeout - timedelta(seconds=time.monotonic() - start), timedelta(milliseconds=1))
        if not work.wait(timeout=timeout):
            raise TimeoutError("all_gather did not complete in time")
        if self._on_gpu:
            self._host.copy_(self._out)  # ordered after the gather: wait() joined its stream
        return self._host.numpy().tobytes()


def _all_gather_fixed(
    dist: Any, payload: bytes, group: Any, device: torch.device, timeout: timedelta
) -> list[bytes]:
    import torch

    world = dist.get_world_size(group)
    src = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    out = torch.empty(world * len(payload), dtype=torch.uint8, device=device)
    work = dist.all_gather_into_tensor(out, src, group=group, async_op=True)
    if not work.wait(timeout=timeout):
        raise TimeoutError("all_gather did not complete in time")
    flat = out.cpu().numpy().tobytes()
    n = len(payload)
    return [flat[i * n : (i + 1) * n] for i in range(world)]


def _all_gather_bytes(
    dist: Any, payload: bytes, group: Any, device: torch.device, timeout: timedelta
) -> list[bytes]:
    """Variable-size payloads: the sizes first, then every payload padded to the largest."""
    sizes = _all_gather_fixed(dist, len(payload).to_bytes(8, "little"), group, device, timeout)
    lengths = [int.from_bytes(s, "little") for s in sizes]
    width = max(lengths)
    padded = _all_gather_fixed(dist, payload + bytes(width - len(payload)), group, device, timeout)
    return [p[:n] for p, n in zip(padded, lengths, strict=True)]


def seal_tp(
    manager: VramManager,
    shards: Sequence[SealedShard | SealedModel],
    *,
    model_name: str,
    token: str | bytes,
    **kwargs: Any,
) -> TPModel:
    """Same as :meth:`TPModel.seal`."""
    return TPModel.seal(manager, shards, model_name=model_name, token=token, **kwargs)
