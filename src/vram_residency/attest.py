"""The orchestrator's side of ``attest-v1``: nonces, the checks, the probes, and an HTTP client.

An orchestrator that routes traffic to a worker asks it, with a fresh nonce, what its shards are
*now* (``POST /worker/attest``) and accepts the answer only if it passes every check of the
spec's "What an orchestrator checks" (``check_attestation``):

1. the tag (``KA`` from the token);
2. the nonce is the one issued for this worker, and not accepted before (``NonceStore``);
3. ``attested_at_ns`` lies in ``[issued_at_ns, issued_at_ns + max_delay_ns]``;
4. each ``seal_signature`` is the tag of a seal record held for that shard;
5. each ``digest_now`` equals that record's digest, and the verdict is ``ok``;
6. where the model bytes are held and probes were asked for: each probe, recomputed on the CPU
   (BLAKE3 keyed mode, memory-mapped and multithreaded by the ``blake3`` package).

Threat model (as the spec's): a holder of the worker token can forge anything. These checks catch
stale, cached, replayed and faulty answers, not a malicious worker that holds the token.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import mmap
import os
import re
import secrets
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import blake3 as _blake3

from vram_residency._regularfile import open_regular
from vram_residency.errors import InvalidInput, VramError
from vram_residency.formats import check_utf8 as _check_utf8
from vram_residency.formats.attest import (
    MAX_NONCE_BYTES,
    MIN_NONCE_BYTES,
    Statement,
    attest_key,
    check_nonce,
    probe_key,
    statement_from_json,
    verify_statement_tag,
)
from vram_residency.formats.seal import fields_from_record, seal_key, verify_tag
from vram_residency.shard import SealedShard, check_seal_record, parse_record_text

__all__ = [
    "AttestationRefused",
    "AttestationResult",
    "IssuedNonce",
    "NonceStore",
    "WorkerRateLimited",
    "check_attestation",
    "probe_file",
    "request_attestation",
]

DEFAULT_NONCE_BYTES: Final = 32


class AttestationRefused(VramError):
    """An attestation failed one of the spec's checks. ``check`` is the check's number (1-6);
    ``shard_id`` names the shard where one is to blame. Not ``fatal`` for the orchestrator that
    raises it: it decides what to do with the worker (stop routing to it, page someone)."""

    def __init__(self, check: int, message: str, *, shard_id: str | None = None) -> None:
        super().__init__(f"check {check}: {message}")
        self.check = check
        self.shard_id = shard_id


class WorkerRateLimited(InvalidInput):
    """The worker answered 429: it attests at a bounded rate. ``retry_after_s`` is its hint."""

    _retriable = True

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# -- nonces ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class IssuedNonce:
    nonce: bytes
    worker_id: str
    issued_at_ns: int


_LOWER_HEX: Final = re.compile(r"(?:[0-9a-f]{2})+")


def _check_worker_id(worker_id: object) -> str:
    """A worker id as the nonce store keeps it: text that has a UTF-8 encoding (it is compared
    as UTF-8 bytes, in constant time)."""
    if not isinstance(worker_id, str):
        raise InvalidInput(f"worker_id must be a string, not {type(worker_id).__name__}")
    _check_utf8("worker_id", worker_id)
    return worker_id


class NonceStore:
    """Issues nonces, remembers for which worker and when, and accepts each at most once.

    ``take`` removes an issued nonce atomically: a second statement for the same nonce, whatever
    became of the first, finds it gone and is refused as a replay. Nonces are 32 random bytes by
    default; pending ones expire after ``ttl_ns`` (an expired nonce is refused, which is what the
    delay check would do anyway).

    With ``path``, every issue and every use is appended to that file (one JSON line each,
    flushed and fsynced) before the call returns, and the file is read back on start: a restarted
    orchestrator still refuses nonces it accepted before. The file holds nonces only, no secret.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, ttl_ns: int = 3_600 * 10**9) -> None:
        if isinstance(ttl_ns, bool) or not isinstance(ttl_ns, int) or ttl_ns <= 0:
            raise InvalidInput("ttl_ns must be a positive integer")
        self._ttl = ttl_ns
        self._lock = threading.Lock()
        self._pending: dict[bytes, IssuedNonce] = {}
        self._used: dict[bytes, int] = {}  # nonce -> when it was used (for the error message)
        self._path = None if path is None else Path(path)
        if self._path is not None:
            self._load(self._path)

    def _load(self, path: Path) -> None:
        if not path.exists():
            return
        # Read as bytes and check every field's type: the file is the orchestrator's own, but a
        # damaged one (not UTF-8, a directory, nested or out-of-range JSON) must be refused as
        # InvalidInput, not crash the orchestrator with whatever json or int() raises.
        try:
            # Regular files only: a FIFO would block here, /dev/zero is one endless line.
            f = open_regular(path)
        except OSError as exc:
            raise InvalidInput(f"nonce store {path}: cannot open it ({exc.strerror})") from None
        with f:
            for n, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    break  # a torn last line from a crash: that write never returned
                try:
                    # The strict parser: a repeated key ("op" twice) has no single meaning.
                    rec = parse_record_text(line, "nonce store line")
                    hexed = rec["nonce"]
                    # One spelling, as _append writes it (bytes.fromhex would also take upper
                    # case and spaces), and the length every issued nonce has.
                    if not isinstance(hexed, str) or not _LOWER_HEX.fullmatch(hexed):
                        raise ValueError("nonce is not lower-case hex")
                    nonce = check_nonce(bytes.fromhex(hexed))
                    t = rec["t"]
                    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                        raise TypeError("t is not a non-negative integer")
                    if rec["op"] == "issue":
                        # A lone surrogate here would pass the load and crash take() later.
                        wid = _check_worker_id(rec["worker_id"])
                        self._pending[nonce] = IssuedNonce(nonce, wid, t)
                    elif rec["op"] == "use":
                        self._pending.pop(nonce, None)
                        self._used[nonce] = t
                    else:
                        raise ValueError(rec["op"])
                except (ValueError, KeyError, TypeError, RecursionError) as exc:
                    raise InvalidInput(f"nonce store {path}: line {n} is malformed ({exc})") from None

    def _append(self, op: str, nonce: bytes, t: int, worker_id: str | None = None) -> None:
        if self._path is None:
            return
        rec: dict[str, Any] = {"op": op, "nonce": nonce.hex(), "t": t}
        if worker_id is not None:
            rec["worker_id"] = worker_id
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def issue(self, worker_id: str, nbytes: int = DEFAULT_NONCE_BYTES) -> IssuedNonce:
        """A fresh random nonce for ``worker_id``, recorded with the time it was issued."""
        _check_worker_id(worker_id)
        if (
            isinstance(nbytes, bool)
            or not isinstance(nbytes, int)
            or not (MIN_NONCE_BYTES <= nbytes <= MAX_NONCE_BYTES)
        ):
            raise InvalidInput(f"nonce length must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes")
        with self._lock:
            self._expire(time.time_ns())
            nonce = secrets.token_bytes(nbytes)
            issued = IssuedNonce(nonce, worker_id, time.time_ns())
            self._append("issue", nonce, issued.issued_at_ns, worker_id)
            self._pending[nonce] = issued
            return issued

    def take(self, nonce: bytes, worker_id: str) -> IssuedNonce:
        """Consume ``nonce`` for ``worker_id``: AttestationRefused (check 2) unless it was issued
        for that worker and never taken before. The nonce is used up even when the statement it
        came with fails a later check."""
        # Both checked before the lock: a malformed argument uses nothing up. The nonce as bytes
        # (a bytearray is unhashable as a dict key).
        nonce = check_nonce(nonce)
        _check_worker_id(worker_id)
        with self._lock:
            self._expire(time.time_ns())
            if nonce in self._used:
                raise AttestationRefused(2, "replay: this nonce was already used")
            issued = self._pending.get(nonce)
            if issued is None:
                raise AttestationRefused(2, "this nonce was not issued by this orchestrator (or expired)")
            if not hmac.compare_digest(issued.worker_id.encode("utf-8"), worker_id.encode("utf-8")):
                raise AttestationRefused(2, "this nonce was issued for another worker")
            t = time.time_ns()
            self._append("use", nonce, t)
            del self._pending[nonce]
            self._used[nonce] = t
            return issued

    def _expire(self, now: int) -> None:
        for n in [n for n, i in self._pending.items() if now - i.issued_at_ns > self._ttl]:
            del self._pending[n]
        # A used nonce can be forgotten once it would have expired anyway: it is then unknown,
        # and an unknown nonce is refused just the same.
        for n in [n for n, t in self._used.items() if now - t > 2 * self._ttl]:
            del self._used[n]

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


# -- probes ---------------------------------------------------------------------------------------
#: The file is hashed in windows of this many bytes, each mapped with MAP_POPULATE while the
#: previous one is hashed: the kernel fills a window's page tables in one call instead of one
#: page fault per 4 KiB page, and that work overlaps the hashing. Two windows are mapped at most.
PROBE_WINDOW_BYTES: Final = 128 << 20


def probe_file(path: str | os.PathLike[str], kp: bytes) -> bytes:
    """BLAKE3 keyed hash (key ``kp``) of a file's bytes: the probe of a shard sealed from it.

    Streamed: the file is memory-mapped window by window (``PROBE_WINDOW_BYTES``, the next one
    populated in a helper thread while the ``blake3`` package hashes the current one on all
    cores). Nothing is copied into Python; host memory stays bounded by two windows of page
    cache. Where ``MAP_POPULATE`` does not exist, the package's own ``update_mmap`` is used."""
    if not isinstance(kp, bytes) or len(kp) != 32:
        raise InvalidInput("a probe key is 32 bytes")
    hasher = _blake3.blake3(key=kp, max_threads=_blake3.blake3.AUTO)
    name = os.fspath(path)
    try:
        populate = getattr(mmap, "MAP_POPULATE", None)  # a platform constant, not a capability probe
        if populate is None:
            hasher.update_mmap(name)
            return hasher.digest()
        # O_NONBLOCK and a regular-file check on the descriptor: a plain open of a FIFO waits for
        # a writer forever (the descriptor's flag does not affect reads of regular files).
        with open(os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK), "rb") as f:
            fd = f.fileno()
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidInput(f"model file {name!r} is not a regular file")
            size = st.st_size

            def window(offset: int) -> mmap.mmap:
                n = min(PROBE_WINDOW_BYTES, size - offset)
                return mmap.mmap(fd, n, offset=offset, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | populate)

            if size == 0:
                return hasher.digest()
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe-map") as pool:
                pending: Future[mmap.mmap] | None = pool.submit(window, 0)
                offset = 0
                try:
                    while pending is not None:
                        current = pending.result()
                        offset += len(current)
                        pending = pool.submit(window, offset) if offset < size else None
                        try:
                            hasher.update(current)
                        finally:
                            current.close()
                finally:
                    if pending is not None:  # an error mid-file: unmap the window mapped ahead
                        with contextlib.suppress(Exception):
                            pending.result().close()
    except OSError as exc:
        raise InvalidInput(f"cannot read model file {name!r}: {exc.strerror}") from None
    return hasher.digest()


# -- the checks -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AttestationResult:
    """An accepted attestation."""

    statement: Statement
    worker_id: str
    #: Shards whose probe was recomputed here from the model bytes.
    probed: tuple[str, ...]
    #: ``checked_at_ns - oldest verified_at_ns``: how old the oldest recomputation was when the
    #: statement was accepted (the orchestrator's clock against the worker's).
    age_ns: int


def _records(seal_records: Mapping[str, Any] | Iterable[Any]) -> dict[str, dict[str, Any]]:
    if isinstance(seal_records, (str, bytes, bytearray, memoryview)) or not isinstance(
        seal_records, (Mapping, Iterable)
    ):
        raise InvalidInput(
            f"seal_records must be a list or mapping of seal records, not {type(seal_records).__name__}"
        )
    items: Iterable[Any] = seal_records.values() if isinstance(seal_records, Mapping) else seal_records
    out: dict[str, dict[str, Any]] = {}
    for r in items:
        rec = r.record() if isinstance(r, SealedShard) else r
        if not isinstance(rec, dict):
            raise InvalidInput("seal records must be seal-v1 JSON objects or SealedShard values")
        # Every field's type and encoding checked up front (not only for the shards the
        # statement names): the worker id is read from the records before any shard is looked
        # at, and a list there or a lone surrogate must be InvalidInput, not a TypeError from a
        # set or a UnicodeEncodeError from a comparison.
        fields, _ = fields_from_record(rec)
        if fields.shard_id in out:
            raise InvalidInput(f"seal records: duplicate shard_id {fields.shard_id!r}")
        out[fields.shard_id] = rec
    return out


def _check_files(files: object) -> dict[str, str | os.PathLike[str]]:
    if files is None:
        return {}
    if not isinstance(files, Mapping):
        raise InvalidInput(f"files must map shard ids to paths, not {type(files).__name__}")
    out: dict[str, str | os.PathLike[str]] = {}
    for sid, path in files.items():
        # Text paths only: an int is a file descriptor to os.stat (it would stat whatever that
        # descriptor is), and bytes paths are not part of this API.
        if not isinstance(sid, str) or not isinstance(path, (str, os.PathLike)):
            raise InvalidInput("files must map shard ids (str) to paths (str or os.PathLike)")
        out[sid] = path
    return out


def check_attestation(
    statement: Mapping[str, Any] | str | bytes | bytearray,
    token: str | bytes,
    nonce: bytes,
    seal_records: Mapping[str, Any] | Iterable[Any],
    issued_at_ns: int,
    max_delay_ns: int,
    files: Mapping[str, str | os.PathLike[str]] | None = None,
    *,
    nonces: NonceStore | None = None,
    worker_id: str | None = None,
    probe: bool = False,
    now_ns: int | None = None,
) -> AttestationResult:
    """Run every check of ``attest-v1``'s "What an orchestrator checks"; AttestationRefused (with
    the check's number) on the first that fails, InvalidInput for a malformed statement.

    ``statement``: the JSON form (a dict, or its text). ``nonce``/``issued_at_ns``: the nonce this
    orchestrator issued for the request and when. ``seal_records``: the seal-v1 records it holds
    for exactly the shards it asked about (a list, or a mapping by shard id; ``SealedShard``
    accepted); the statement must cover each of them exactly once. ``files``: shard id -> the
    model file sealed as that shard; each such shard's probe is recomputed (so probes are then
    required). ``probe=True``: probes were asked for, so every shard must carry one.

    ``nonces``: when given, the nonce is taken from it (check 2 includes "not accepted before",
    across calls and, with a file, across restarts); without it the caller must make sure that
    each nonce is checked once. ``worker_id``: the worker the nonce was issued for (default: the
    ``worker_id`` of the seal records, which must all agree)."""
    if isinstance(statement, (str, bytes, bytearray)):
        # The strict parser of seal records: no duplicate keys (two parsers could read different
        # values from the same tagged text), and deep nesting is InvalidInput, not RecursionError.
        statement = parse_record_text(statement, "attestation")
    s, tag = statement_from_json(statement)
    nonce = check_nonce(nonce)
    for name, v in (("issued_at_ns", issued_at_ns), ("max_delay_ns", max_delay_ns)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidInput(f"{name} must be a non-negative integer")
    if not isinstance(probe, bool):
        raise InvalidInput("probe must be True or False")
    if now_ns is not None and (isinstance(now_ns, bool) or not isinstance(now_ns, int) or now_ns < 0):
        raise InvalidInput("now_ns must be a non-negative integer (ns since the Unix epoch) or None")
    files = _check_files(files)
    records = _records(seal_records)
    if not records:
        raise InvalidInput("no seal records: nothing to check the statement against")
    if worker_id is None:
        ids = {r["worker_id"] for r in records.values()}  # strings: _records checked every field
        if len(ids) != 1:
            raise InvalidInput("the seal records name several workers; pass worker_id")
        (worker_id,) = ids
    else:
        _check_worker_id(worker_id)

    # 1. The tag, before anything in the statement is believed.
    if not verify_statement_tag(attest_key(token), s, tag):
        raise AttestationRefused(1, "tag does not match the statement (edited, or another token)")
    # 2. The nonce: the one issued for this worker, used once.
    if not hmac.compare_digest(s.nonce, nonce):
        raise AttestationRefused(2, "statement is for another nonce")
    if not hmac.compare_digest(s.worker_id.encode("utf-8"), worker_id.encode("utf-8")):
        raise AttestationRefused(2, f"statement is from worker {s.worker_id!r}, not {worker_id!r}")
    if nonces is not None:
        issued = nonces.take(nonce, worker_id)
        if issued.issued_at_ns != issued_at_ns:
            raise AttestationRefused(2, "issued_at_ns differs from when the nonce store issued it")
    # 3. Fresh: recomputed after the nonce was issued, within the allowed delay.
    if not issued_at_ns <= s.attested_at_ns <= issued_at_ns + max_delay_ns:
        raise AttestationRefused(
            3,
            f"attested_at_ns is {(s.attested_at_ns - issued_at_ns) / 1e6:.3f} ms after the nonce was "
            f"issued; allowed 0 to {max_delay_ns / 1e6:.3f} ms",
        )
    # 4 and 5, shard by shard; the statement covers exactly the shards held records for.
    seen: set[str] = set()
    skey = seal_key(token)
    for sh in s.shards:
        if sh.shard_id in seen:
            raise AttestationRefused(4, "shard listed twice", shard_id=sh.shard_id)
        seen.add(sh.shard_id)
        if not issued_at_ns <= sh.verified_at_ns <= s.attested_at_ns:
            raise AttestationRefused(
                3, "verified_at_ns is not between the nonce's issue and attested_at_ns", shard_id=sh.shard_id
            )
        rec = records.get(sh.shard_id)
        if rec is None:
            raise AttestationRefused(4, "no seal record is held for this shard", shard_id=sh.shard_id)
        fields, rec_tag = fields_from_record(rec)
        if not verify_tag(skey, fields, rec_tag):
            raise AttestationRefused(4, "the held seal record's own tag is invalid", shard_id=sh.shard_id)
        if not hmac.compare_digest(sh.seal_signature, rec_tag):
            raise AttestationRefused(
                4, "seal_signature is not the held seal record's tag", shard_id=sh.shard_id
            )
        if not hmac.compare_digest(sh.digest_now, bytes.fromhex(fields.digest)):
            raise AttestationRefused(
                5, f"digest_now {sh.digest_now.hex()} differs from the sealed digest", shard_id=sh.shard_id
            )
    missing = sorted(set(records) - seen)
    if missing:
        raise AttestationRefused(4, f"statement leaves out shards: {', '.join(missing)}", shard_id=missing[0])
    if s.verdict != "ok":
        raise AttestationRefused(5, "the worker's verdict is 'mismatch'")
    # 6. Probes, last: the only check that costs a pass over the model bytes.
    unknown = sorted(set(files) - seen)
    if unknown:
        raise InvalidInput(f"files given for shards not in the statement: {', '.join(unknown)}")
    probed: list[str] = []
    if files or probe:
        kp = probe_key(attest_key(token), nonce)
        for sh in s.shards:
            if sh.probe is None:
                if probe or sh.shard_id in files:
                    raise AttestationRefused(6, "a probe was asked for and none came", shard_id=sh.shard_id)
                continue
            path = files.get(sh.shard_id)
            if path is None:
                continue
            size = os.stat(path).st_size if os.path.exists(path) else -1
            if size != records[sh.shard_id]["vram_bytes"]:
                raise InvalidInput(
                    f"{os.fspath(path)!r} is not the file sealed as {sh.shard_id} (size differs)"
                )
            if not hmac.compare_digest(sh.probe, probe_file(path, kp)):
                raise AttestationRefused(
                    6,
                    "probe differs from the model bytes: the worker did not read them now",
                    shard_id=sh.shard_id,
                )
            probed.append(sh.shard_id)
    now = time.time_ns() if now_ns is None else now_ns
    oldest = min((sh.verified_at_ns for sh in s.shards), default=s.attested_at_ns)
    return AttestationResult(s, worker_id, tuple(probed), max(0, now - oldest))


# -- HTTP -----------------------------------------------------------------------------------------
#: The most bytes read from a worker's answer: a statement is ~300 bytes per shard, a
#: /worker/ready answer a few KiB per model. A faulty or hostile endpoint cannot make the
#: orchestrator buffer more than this.
MAX_ANSWER_BYTES: Final = 16 << 20


def _call(
    url: str, token: str | bytes, method: str, path: str, body: dict[str, Any] | None, timeout: float
) -> dict[str, Any]:
    """One JSON request with the bearer token, through the standard library: the orchestrator's
    side needs no HTTP package (the service extras are for workers). InvalidInput on anything but
    a 200 with a JSON object; the message names the URL and the status, never the token."""
    tok = token.decode("utf-8") if isinstance(token, bytes) else token
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(  # noqa: S310 - the scheme is checked just below
        url.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {tok}", "Accept": "application/json"}
        | ({"Content-Type": "application/json"} if data is not None else {}),
    )
    if req.type not in ("http", "https"):
        raise InvalidInput(f"worker URL must be http:// or https://, not {url!r}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - scheme checked
            raw = r.read(MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as exc:
        code, err = "", {}
        with contextlib.suppress(Exception):
            err = json.loads(exc.read(64 << 10))
            code = str(err.get("code", ""))
        retry_ms = err.get("retry_after_ms") if isinstance(err, dict) else None
        if exc.code == 429 and isinstance(retry_ms, int) and not isinstance(retry_ms, bool) and retry_ms >= 0:
            raise WorkerRateLimited(
                f"{url}: rate limited, retry after {retry_ms} ms", retry_ms / 1e3
            ) from None
        raise InvalidInput(f"{url}: {method} {path} answered HTTP {exc.code} {code}".rstrip()) from None
    except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out, DNS
        reason = getattr(exc, "reason", exc)
        raise InvalidInput(f"{url}: no answer ({type(reason).__name__})") from None
    if len(raw) > MAX_ANSWER_BYTES:
        raise InvalidInput(f"{url}: answer larger than {MAX_ANSWER_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # deep nesting from a hostile worker: RecursionError
        raise InvalidInput(f"{url}: the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"{url}: the answer is not a JSON object")
    return doc


def request_attestation(
    url: str,
    token: str | bytes,
    nonce: bytes,
    *,
    shard_ids: Sequence[str] | None = None,
    probe: bool = False,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """``POST {url}/worker/attest`` with ``nonce`` and return the JSON statement (unchecked: pass
    it to ``check_attestation``). InvalidInput for a refused or unanswered request."""
    body: dict[str, Any] = {"nonce": check_nonce(nonce).hex(), "probe": bool(probe)}
    if shard_ids is not None:
        body["shard_ids"] = list(shard_ids)
    return _call(url, token, "POST", "/worker/attest", body, timeout)


def fetch_seal_records(
    url: str, token: str | bytes, *, timeout: float = 30.0
) -> tuple[str, list[dict[str, Any]]]:
    """The worker id and seal records that ``GET /worker/ready`` shows, each record's tag checked
    with the token. For an orchestrator that did not keep the records from commit time: the
    records are only as trustworthy as the token (the spec's threat model)."""
    doc = _call(url, token, "GET", "/worker/ready", None, timeout)
    seals = doc.get("seals")
    if not isinstance(seals, list) or not isinstance(doc.get("worker_id"), str):
        raise InvalidInput(f"{url}: /worker/ready has no seals / worker_id")
    for rec in seals:
        if not isinstance(rec, dict):
            raise InvalidInput(f"{url}: /worker/ready lists a seal that is not a JSON object")
        check_seal_record(rec, token)
    return doc["worker_id"], seals
