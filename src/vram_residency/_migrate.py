"""Sealed shards that move: verified migration between devices, offload to host memory or a file,
and restore, none of which trusts the copy it makes.

Every move follows one rule: the *receiving* side recomputes the unit digests of what landed and
compares them with the unit digests taken at seal time (trusted host memory of the manager). A
unit that arrived wrong is copied again from the sender (bounded retries); the sender is zeroed
and freed only after every unit and the digest match. Any failure leaves the original where it was,
sealed and verifiable, and frees what was allocated on the receiving side.

- ``migrate(src, shard, dest)``: ``src`` and ``dest`` are two managers on different devices that
  share one worker token (checked). The result is a new seal (new shard id, ``gpu_device`` of the
  destination), audited ``ShardMigrated`` with its predecessor. ``DeviceGroup`` (in
  ``vram_residency.devices``) holds one manager per device and migrates by device id.
- ``offload(mgr, shard, to="host"|"file")``: the bytes go to host memory (pinned on CUDA) or a
  file, each chunk hashed as it lands and compared with the seal; then the VRAM is zeroed and
  freed. The shard is *offloaded*: it is not registered, so verify/execute answer NotSealed.
- ``restore(mgr, shard)``: back into device memory, digested there, compared unit by unit with
  the seal; a unit that landed wrong is rewritten from the offloaded copy only if that copy's unit
  still hashes to the sealed unit digest. Only then is the shard registered (usable) again, under
  its original seal.

Everything here goes through the seal core's package-level API (``vram_residency._core``):
``ShardStore.lookup``/``seal_into``/``allocate``/``verify_held``/``emit`` and, for records that
move, ``register``/``forget``/``retire``/``in_flight``; the functions take the stores
(``VramManager.store``). ``vram_residency.devices.DeviceGroup`` migrates by device id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from vram_residency._core import ShardRecord, ShardStore
from vram_residency.audit.events import (
    SEAL_VERIFICATION_FAILED,
    SHARD_MIGRATED,
    SHARD_OFFLOADED,
    SHARD_RESTORED,
)
from vram_residency.backends.base import COPY_CHUNK, DeviceBuffer, HostMemory, LandedHook
from vram_residency.errors import (
    ConfigError,
    IntegrityViolation,
    InvalidInput,
    NotSealed,
    SealVerificationFailed,
)
from vram_residency.formats.tree import UNIT_SIZE, HashResult, hash_units, unit_count
from vram_residency.shard import SealedShard

__all__ = [
    "DEFAULT_RETRIES",
    "OffloadTarget",
    "discard_offloaded",
    "migrate",
    "offload",
    "offloaded",
    "restore",
]

#: How many times a unit that arrived wrong is copied again before the move gives up.
DEFAULT_RETRIES: Final = 3

OffloadTarget = Literal["host", "file"]


def _check_tag(store: ShardStore, shard: SealedShard, record: ShardRecord, action: str) -> None:
    """The seal must be intact before anything moves: a move keeps a seal; it cannot make an
    edited or forged one good."""
    if not store.tag_matches(shard, record):
        raise SealVerificationFailed(
            f"seal tag of shard {shard.shard_id} does not match its fields; it cannot be {action}",
            shard_id=shard.shard_id,
            tag_valid=False,
        )


# -- unit comparison ------------------------------------------------------------------------------


def _bad_units(sealed: bytes, got: bytes, first: int = 0) -> list[int]:
    """Units (numbered from ``first``) whose digest in ``got`` differs from ``sealed``."""
    count = len(got) // 32
    return [
        first + i
        for i in range(count)
        if not hmac.compare_digest(got[32 * i : 32 * i + 32], sealed[32 * (first + i) :][:32])
    ]


def _unit_range(u: int, n: int) -> tuple[int, int]:
    start = u * UNIT_SIZE
    return start, min(UNIT_SIZE, n - start)


def _runs(units: Sequence[int], n: int) -> list[tuple[int, int]]:
    """Consecutive units merged into ``(offset, length)`` byte ranges."""
    out: list[tuple[int, int]] = []
    for u in units:
        start, length = _unit_range(u, n)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


def _matches(sealed: SealedShard, unit_digests: bytes, result: HashResult) -> bool:
    # One comparison of the whole unit-digest string (constant time, C speed): the per-unit loop
    # of _bad_units runs only to find *which* units differ, after a mismatch.
    return (
        len(result.unit_digests) == len(unit_digests)
        and hmac.compare_digest(result.unit_digests, unit_digests)
        and hmac.compare_digest(result.digest.hex(), sealed.digest)
    )


def _check_retries(max_retries: int) -> None:
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries <= 100:
        raise InvalidInput("max_retries must be an integer between 0 and 100")


# -- migration ------------------------------------------------------------------------------------


def _check_peer(src: ShardStore, dest: ShardStore) -> None:
    if not isinstance(src, ShardStore) or not isinstance(dest, ShardStore):
        raise InvalidInput("migrate takes the source and destination stores (VramManager.store)")
    if dest is src:
        raise InvalidInput("destination is the shard's own manager: nothing to migrate")
    src.check_open()
    dest.check_open()
    if dest.device == src.device and dest.backend.name == src.backend.name:
        raise InvalidInput(f"destination is the same device ({dest.device}) as the source")
    # One token: the new seal must be checkable with the same token as the old one.
    if not src.same_key(dest):
        raise ConfigError("source and destination managers do not share one worker token")


def migrate(
    src: ShardStore,
    shard: SealedShard,
    dest: ShardStore,
    *,
    max_retries: int = DEFAULT_RETRIES,
    on_landed: LandedHook | None = None,
) -> SealedShard:
    """Move ``shard`` from ``src``'s device to ``dest``'s; return its new seal (see module doc).

    Raises InsufficientVram (retriable) when the destination lacks room, SealVerificationFailed
    when the source seal or the source memory is not intact, IntegrityViolation when the copy keeps
    arriving wrong while the source is intact. In every failure case the original shard is still
    sealed and resident on ``src`` and nothing stays allocated on ``dest``."""
    _check_retries(max_retries)
    _check_peer(src, dest)
    entry = src.lookup(shard)
    t0 = time.perf_counter_ns()
    with entry.lock:
        if entry.buf.closed:
            raise NotSealed(f"shard {shard.shard_id!r} was deallocated")
        _check_tag(src, shard, entry, "migrated")
        sealed, units = entry.shard, entry.unit_digests
        n, algorithm = sealed.vram_bytes, sealed.digest_algorithm
        sbk, dbk = src.backend, dest.backend
        retried = 0
        # A keyed seal (nh-fast-v1) is keyed by its shard id: the copy is checked against the
        # source's sealed unit digests under the source shard's key (the same token, so the same
        # key on both stores), and the destination, whose new shard id gives a new key, hashes
        # the landed bytes again under that key when it seals (no expected digest to compare).
        key = src.digest_key(algorithm, sealed.shard_id)

        def fill(dst: DeviceBuffer) -> HashResult:
            nonlocal retried
            result = dbk.copy_and_hash_from(dst, sbk, entry.buf, n, algorithm, on_landed=on_landed, key=key)
            for _attempt in range(max_retries):
                if _matches(sealed, units, result):
                    return result
                bad = _bad_units(units, result.unit_digests) or list(range(unit_count(n)))
                retried += len(bad)
                for off, length in _runs(bad, n):
                    dbk.copy_from(dst, sbk, entry.buf, off, length)
                    if on_landed is not None:
                        on_landed(dst, off, length)
                result = dbk.hash(dst, algorithm, n, key=key)
            if _matches(sealed, units, result):
                return result
            # Is the source itself damaged, or only the transfer? The source check raises
            # SealVerificationFailed (and audits it) in the first case.
            src.verify_held(shard, entry)
            raise IntegrityViolation(
                f"shard {sealed.shard_id}: copy to device {dest.device} still arrived wrong after "
                f"{max_retries} retries while the source verifies; source kept"
            )

        new = dest.seal_into(
            n,
            fill,
            model_ref=sealed.model_ref,
            shard_index=sealed.shard_index,
            total_shards=sealed.total_shards,
            expected_digest=sealed.digest if key is None else None,
            digest_algorithm=algorithm,
            tensors=entry.tensors,
            source=entry.source,
        )
        elapsed_ns = time.perf_counter_ns() - t0
        try:
            fields: dict[str, Any] = {
                "shard_id": new.shard_id,
                "from_shard_id": sealed.shard_id,
                "from_device": src.device,
                "to_device": dest.device,
                "vram_bytes": n,
                "digest": sealed.digest,
                "digest_algorithm": algorithm,
                "duration_ns": elapsed_ns,
                "retried_units": retried,
                "peer_to_peer": dbk.can_access_peer(sbk),
            }
            src.emit(SHARD_MIGRATED, **fields)
            if dest.audit is not None and dest.audit is not src.audit:
                dest.emit(SHARD_MIGRATED, **fields)
        except BaseException:
            # Without its lineage record the new seal must not exist: undo it, keep the source.
            with contextlib.suppress(Exception):
                dest.deallocate(new)
            raise
        # The destination matches and is recorded: only now is the source zeroed and freed.
        src.retire(entry, reason="migrated")
    return new


# -- offload and restore --------------------------------------------------------------------------


class _Copy:
    """The offloaded bytes: host memory (pinned on CUDA) or a file we created."""

    def __init__(self, memory: HostMemory | None, path: str | None, n: int, fd: int = -1) -> None:
        self.memory = memory
        self.path = path
        self.n = n
        #: The offload file, open since we created it: read and zeroed through this descriptor,
        #: never reopened by name (the path may name something else by then: a symlink to
        #: another file, a FIFO). Holding it open also keeps its inode from being reused.
        self.fd = fd
        self._discard_lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        if self.memory is not None:
            return bytes(self.memory.view[offset : offset + length])
        if self.fd < 0:
            raise NotSealed("the offloaded copy was discarded")
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise SealVerificationFailed(f"offload file {self.path} was truncated")
        return data

    def discard(self) -> None:
        # Taken and cleared under a lock first: a manager close racing a restore can discard the
        # same host copy as the background discard does, and it must be released once only.
        with self._discard_lock:
            memory, self.memory = self.memory, None
        if memory is not None:
            memory.close()
        if self.path is not None:  # files are discarded on the caller's thread only
            fd, self.fd = self.fd, -1
            if fd >= 0:
                _zero_and_unlink(fd, self.path, self.n)
            self.path = None


def _zero_and_unlink(fd: int, path: str, n: int) -> None:
    """Zero the offload file we created (open as ``fd``), remove it from ``path`` if the path
    still names it, and close ``fd``. Through the descriptor, never by name: whatever took the
    file's place at the path (a symlink to someone's file, a FIFO) is neither written nor
    removed."""
    try:
        # Best effort against the bytes lingering in the page cache or on disk blocks the file owned.
        with contextlib.suppress(OSError):
            zeros = bytes(min(n, COPY_CHUNK))
            for off in range(0, n, COPY_CHUNK):
                os.pwrite(fd, zeros[: min(COPY_CHUNK, n - off)], off)
        with contextlib.suppress(OSError):
            ours, there = os.fstat(fd), os.lstat(path)
            if (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino):
                os.unlink(path)
    finally:
        os.close(fd)


@dataclass(slots=True)
class _Offloaded:
    entry: ShardRecord
    copy: _Copy
    to: OffloadTarget
    lock: threading.Lock = field(default_factory=threading.Lock)


_OFFLOADED: weakref.WeakKeyDictionary[ShardStore, dict[str, _Offloaded]] = weakref.WeakKeyDictionary()
_OFFLOADED_LOCK = threading.Lock()


def _table(mgr: ShardStore) -> dict[str, _Offloaded]:
    with _OFFLOADED_LOCK:
        return _OFFLOADED.setdefault(mgr, {})


def offloaded(mgr: ShardStore) -> list[SealedShard]:
    """The shards ``mgr`` has offloaded (sealed, not resident, not usable until restored)."""
    with _OFFLOADED_LOCK:
        table = dict(_OFFLOADED.get(mgr, {}))
    return [rec.entry.shard for rec in table.values()]


def discard_offloaded(mgr: ShardStore) -> None:
    """Zero and release every offloaded copy of ``mgr`` (at shutdown)."""
    with _OFFLOADED_LOCK:
        table = _OFFLOADED.pop(mgr, {})
    try:
        for rec in table.values():
            with rec.lock:
                rec.copy.discard()
    finally:
        _wait_discards(mgr)


def _receive_host(
    mgr: ShardStore,
    entry: ShardRecord,
    out: memoryview,
    offset: int,
    max_retries: int,
    on_landed: LandedHook | None,
) -> None:
    """Device to host, one unit-aligned chunk at ``offset``: copy, hash the host bytes as they
    are, compare with the seal, re-read units that landed wrong."""
    sealed, units = entry.shard, entry.unit_digests
    n = len(out)
    first = offset // UNIT_SIZE
    mgr.backend.read_into(entry.buf, offset, out)
    if on_landed is not None:
        on_landed(out, offset, n)
    # Unit digests are position-independent (each unit hashed as a message of its own, for
    # nh-fast-v1 under the shard's key), so a unit-aligned chunk is hashed on its own.
    key = mgr.digest_key(sealed.digest_algorithm, sealed.shard_id)
    bad = _bad_units(units, hash_units(out, sealed.digest_algorithm, key=key).unit_digests, first)
    _reread_units(mgr, entry, out, offset, bad, key, max_retries, on_landed)


def _receive_all(
    mgr: ShardStore,
    entry: ShardRecord,
    out: memoryview,
    max_retries: int,
    on_landed: LandedHook | None,
) -> None:
    """Device to host, the whole shard into ``out``: every chunk's copy is in flight at once
    (``Backend.read_chunks``) and each chunk's units are hashed on the host (native hasher, every
    core) as soon as it lands, while the next chunks copy; units that landed wrong are read
    again afterwards, one by one, as in ``_receive_host``. The host copy is proven against the
    seal before the device memory, the only other copy, is freed: a transfer fault found only at
    restore would have lost the shard."""
    sealed, units = entry.shard, entry.unit_digests
    algorithm = sealed.digest_algorithm
    key = mgr.digest_key(algorithm, sealed.shard_id)  # keyed digests (nh-fast-v1): the shard's key
    bad: list[int] = []

    def landed(off: int, m: int) -> None:
        piece = out[off : off + m]
        if on_landed is not None:
            on_landed(piece, off, m)
        got = hash_units(piece, algorithm, key=key).unit_digests
        if not hmac.compare_digest(got, units[32 * (off // UNIT_SIZE) :][: len(got)]):
            bad.extend(_bad_units(units, got, off // UNIT_SIZE))

    mgr.backend.read_chunks(entry.buf, out, landed)
    _reread_units(mgr, entry, out, 0, bad, key, max_retries, on_landed)


def _reread_units(
    mgr: ShardStore,
    entry: ShardRecord,
    out: memoryview,
    offset: int,
    bad: list[int],
    key: bytes | None,
    max_retries: int,
    on_landed: LandedHook | None,
) -> None:
    """Read the units in ``bad`` again into ``out`` (which holds the shard's bytes from
    ``offset`` on) until each matches its sealed unit digest, at most ``max_retries`` rounds;
    then, if any still differs, decide whose fault it is: a damaged device copy raises
    SealVerificationFailed (verify), a transfer that keeps failing IntegrityViolation."""
    sealed, units = entry.shard, entry.unit_digests
    for _attempt in range(max_retries):
        if not bad:
            return
        again = []
        for u in bad:
            start, length = _unit_range(u, sealed.vram_bytes)
            piece = out[start - offset : start - offset + length]
            mgr.backend.read_into(entry.buf, start, piece)
            if on_landed is not None:
                on_landed(piece, start, length)
            if hash_units(piece, sealed.digest_algorithm, key=key).unit(0) != units[32 * u : 32 * u + 32]:
                again.append(u)
        bad = again
    if bad:
        mgr.verify_held(sealed, entry)  # raises when the device memory itself is damaged
        raise IntegrityViolation(
            f"shard {sealed.shard_id}: copy to host still arrived wrong after {max_retries} retries; "
            "the shard stays resident"
        )


def offload(
    mgr: ShardStore,
    shard: SealedShard,
    to: OffloadTarget = "host",
    path: str | os.PathLike[str] | None = None,
    *,
    max_retries: int = DEFAULT_RETRIES,
    on_landed: LandedHook | None = None,
) -> None:
    """Copy ``shard`` to host memory or a new file (``path``, created exclusively, mode 0600),
    verified unit by unit as it lands, then zero and free its VRAM. Audited ``ShardOffloaded``."""
    _check_retries(max_retries)
    if to not in ("host", "file"):
        raise InvalidInput(f"offload target must be 'host' or 'file', not {to!r}")
    if (to == "file") != (path is not None):
        raise InvalidInput("a path is required for to='file' and not allowed for to='host'")
    entry = mgr.lookup(shard)
    # in_flight: a manager close waits for this offload before it discards the offloaded copies
    # (this one included), as it waits for a restore.
    with mgr.in_flight(), entry.lock:
        if entry.buf.closed:
            raise NotSealed(f"shard {shard.shard_id!r} was deallocated")
        _check_tag(mgr, shard, entry, "offloaded")
        sealed = entry.shard
        n = sealed.vram_bytes
        copy = _offload_copy(mgr, entry, to, path, max_retries, on_landed)
        try:
            rec = _Offloaded(entry, copy, to)
            table = _table(mgr)
            with _OFFLOADED_LOCK:
                table[sealed.shard_id] = rec
            try:
                mgr.emit(
                    SHARD_OFFLOADED,
                    shard_id=sealed.shard_id,
                    vram_bytes=n,
                    to=to,
                    path=copy.path,
                    backend=mgr.backend.name,
                )
            except BaseException:
                with _OFFLOADED_LOCK:
                    table.pop(sealed.shard_id, None)
                raise
        except BaseException:
            copy.discard()
            raise
        # The copy is proven and recorded: the VRAM can go.
        mgr.retire(entry, reason="offloaded")


def _offload_copy(
    mgr: ShardStore,
    entry: ShardRecord,
    to: OffloadTarget,
    path: str | os.PathLike[str] | None,
    max_retries: int,
    on_landed: LandedHook | None,
) -> _Copy:
    n = entry.shard.vram_bytes
    if to == "host":
        memory = mgr.backend.allocate_host(n)
        try:
            _receive_all(mgr, entry, memory.view[:n], max_retries, on_landed)
        except BaseException:
            memory.close()
            raise
        return _Copy(memory, None, n)
    assert path is not None
    target = os.fspath(path)
    try:
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        raise InvalidInput(f"offload file {target} exists already; not overwriting it") from None
    except OSError as exc:
        raise InvalidInput(f"cannot create offload file {target}: {exc.strerror}") from None
    stage: HostMemory | None = None
    try:
        stage = mgr.backend.allocate_host(min(n, COPY_CHUNK))
        for off in range(0, n, COPY_CHUNK):
            m = min(COPY_CHUNK, n - off)
            piece = stage.view[:m]
            _receive_host(mgr, entry, piece, off, max_retries, on_landed)
            done = 0
            while done < m:
                done += os.pwrite(fd, piece[done:], off + done)
        os.fsync(fd)
    except BaseException:
        _zero_and_unlink(fd, target, n)
        raise
    finally:
        if stage is not None:
            stage.close()
    return _Copy(None, target, n, fd)


def restore(
    mgr: ShardStore,
    shard: SealedShard,
    *,
    max_retries: int = DEFAULT_RETRIES,
    on_landed: LandedHook | None = None,
) -> int:
    """Bring an offloaded shard back into device memory under its original seal; return the
    number of units rewritten from the offloaded copy (0 normally). Audited ``ShardRestored``.

    Raises NotSealed when ``shard`` is not offloaded by ``mgr``; SealVerificationFailed (with the
    ranges) when the offloaded copy itself is damaged where the device copy landed wrong. On any
    failure the shard stays offloaded and nothing stays allocated on the device."""
    _check_retries(max_retries)
    if not isinstance(shard, SealedShard):
        raise InvalidInput(f"expected a SealedShard, not {type(shard).__name__}")
    mgr.check_open()
    with _OFFLOADED_LOCK:
        rec = _OFFLOADED.get(mgr, {}).get(shard.shard_id)
    if rec is None:
        raise NotSealed(f"shard {shard.shard_id!r} is not offloaded by this manager")
    with rec.lock:
        with _OFFLOADED_LOCK:
            if _OFFLOADED.get(mgr, {}).get(shard.shard_id) is not rec:
                raise NotSealed(f"shard {shard.shard_id!r} was restored or discarded already")
        entry = rec.entry
        _check_tag(mgr, shard, entry, "restored")
        sealed = entry.shard
        n = sealed.vram_bytes
        t0 = time.perf_counter_ns()
        # in_flight: close() waits for this restore instead of freeing the backend under it.
        with mgr.in_flight():
            # Progressive where the backend has it (CUDA: virtual memory, chunks created and
            # mapped while the previous chunks copy): the allocation hides behind the copy instead
            # of preceding it (a 2 GiB cuMemAlloc took ~10 ms against a ~39 ms copy on an H200).
            # An allocation failure at any chunk raises InsufficientVram from _land below, with
            # the chunks already released; the except clause frees the rest and the shard stays
            # offloaded. The buffer is mapped whole before anything digests or registers it.
            buf = mgr.allocate(n, shard_id=sealed.shard_id, progressive=True)
            try:
                rewritten = _restore_into(mgr, buf, rec, max_retries, on_landed)
                restored = dataclasses.replace(entry, buf=buf, lock=threading.Lock())
                mgr.register(
                    restored,
                    SHARD_RESTORED,
                    shard_id=sealed.shard_id,
                    vram_bytes=n,
                    source=rec.to,
                    repaired_units=rewritten,
                    duration_ns=time.perf_counter_ns() - t0,
                )
            except BaseException as exc:
                # Audited SealFailed + VramDeallocated; the shard stays offloaded.
                mgr.release_unsealed(buf, shard_id=sealed.shard_id, size=n, reason=exc)
                raise
        # The copy goes to the discard thread BEFORE the record leaves the table: a manager
        # close that pops the table now either finds this record (and waits for its lock, held
        # here) or runs after the discard is pending, which it then waits for. The other order
        # left a moment where close saw neither and closed the backend under the discard.
        # Only this record: the shard is resident since ``register``, so another thread may have
        # offloaded it again meanwhile, and that offload's record must stay.
        try:
            _discard_soon(mgr, rec.copy)
        finally:
            with _OFFLOADED_LOCK:
                table = _OFFLOADED.get(mgr, {})
                if table.get(sealed.shard_id) is rec:
                    del table[sealed.shard_id]
    return rewritten


# Zeroing and unpinning a restored shard's host copy (GiBs: about a second for 4 GiB on one
# thread, ten times the pinned host-to-device copy itself) is not needed for the shard to be
# usable, so it runs on a background thread. ``discard_offloaded`` (manager close) waits for it
# before the backend, whose context owns the pinned pages, goes away. Files are discarded at
# once: callers see the file gone when restore returns.
_PENDING: weakref.WeakKeyDictionary[ShardStore, list[Future[None]]] = weakref.WeakKeyDictionary()
_DISCARDER: ThreadPoolExecutor | None = None


def _discard_soon(mgr: ShardStore, copy: _Copy) -> None:
    global _DISCARDER
    if copy.memory is None:
        copy.discard()
        return
    with _OFFLOADED_LOCK:
        if _DISCARDER is None:
            _DISCARDER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vram-discard")
        # Discards that finished are dropped, failed (or cancelled) ones kept: ``_wait_discards``
        # reports them at close.
        pending = [f for f in _PENDING.get(mgr, []) if not _discarded(f)]
        copy.memory.closing_soon()  # a pooling backend's next allocate_host waits for it
        try:
            pending.append(_DISCARDER.submit(copy.discard))
        except RuntimeError:
            # The discard thread takes no more work (interpreter shutdown): zero and release the
            # copy here rather than leave it (and its pool announcement) behind.
            submitted = False
        else:
            submitted = True
        _PENDING[mgr] = pending
    if not submitted:
        copy.discard()


def _discarded(f: Future[None]) -> bool:
    return f.done() and not f.cancelled() and f.exception() is None


def _wait_discards(mgr: ShardStore) -> None:
    """Wait for every pending discard of ``mgr``, then raise the first failure: the backend, whose
    context owns the pinned pages, is closed right after, so none may still be running then."""
    with _OFFLOADED_LOCK:
        pending = _PENDING.pop(mgr, [])
    error: BaseException | None = None
    for f in pending:
        try:
            f.result()
        except BaseException as exc:  # wait for the rest first
            error = error or exc
    if error is not None:
        raise error


def _restore_into(
    mgr: ShardStore, buf: DeviceBuffer, rec: _Offloaded, max_retries: int, on_landed: LandedHook | None
) -> int:
    """Land the offloaded copy in ``buf`` and make it match the seal unit by unit; the number of
    units rewritten from the offloaded copy."""
    sealed, units = rec.entry.shard, rec.entry.unit_digests
    n, algorithm = sealed.vram_bytes, sealed.digest_algorithm
    backend = mgr.backend
    key = mgr.digest_key(algorithm, sealed.shard_id)
    result = _land(mgr, buf, rec.copy, algorithm, on_landed, key)
    rewritten: set[int] = set()
    for attempt in range(max_retries + 1):
        if _matches(sealed, units, result):
            break
        if attempt == max_retries:
            raise IntegrityViolation(
                f"shard {sealed.shard_id}: restore still landed wrong after {max_retries} "
                "retries; it stays offloaded"
            )
        bad = _bad_units(units, result.unit_digests) or list(range(unit_count(n)))
        damaged: list[int] = []
        for u in bad:
            start, length = _unit_range(u, n)
            data = rec.copy.read(start, length)
            # Offloaded bytes are used only where they hash to the sealed unit digest.
            if hash_units(data, algorithm, key=key).unit(0) != units[32 * u : 32 * u + 32]:
                damaged.append(u)
                continue
            buf.write(start, data)
            if on_landed is not None:
                on_landed(buf, start, length)
            rewritten.add(u)
        if damaged:
            ranges = [(s, s + m) for s, m in _runs(damaged, n)]
            mgr.emit(
                SEAL_VERIFICATION_FAILED,
                critical=True,
                shard_id=sealed.shard_id,
                reason="offloaded copy damaged",
                expected_digest=sealed.digest,
                actual_digest=result.digest.hex(),
                corrupted_ranges=[list(r) for r in ranges],
            )
            raise SealVerificationFailed(
                f"shard {sealed.shard_id}: the offloaded copy ({rec.to}) no longer holds the "
                f"sealed bytes in {len(damaged)} unit(s); it stays offloaded",
                shard_id=sealed.shard_id,
                expected_digest=sealed.digest,
                actual_digest=result.digest.hex(),
                corrupted_ranges=ranges,
            )
        result = backend.hash(buf, algorithm, n, key=key)
    return len(rewritten)


def _land(
    mgr: ShardStore,
    buf: DeviceBuffer,
    copy: _Copy,
    algorithm: str,
    on_landed: LandedHook | None,
    key: bytes | None = None,
) -> HashResult:
    """Copy the offloaded bytes into ``buf``; the digests of what is now in device memory.

    ``buf`` may be progressive (``Backend.allocate_progressive``): each chunk is mapped just
    before its bytes are written (``write_and_hash`` does the same chunk by chunk), so the
    allocation of chunk k+1 runs while chunk k copies; the digests of the whole buffer are taken
    only once every chunk is mapped and written."""
    backend, n = mgr.backend, copy.n
    if copy.memory is not None and on_landed is None:
        # Pinned host memory on CUDA: copies straight from it, hashing each chunk as it lands.
        return backend.write_and_hash(buf, copy.memory.view[:n], algorithm, key=key)
    for off, m in _chunks(n):
        buf.map_through(off + m)
        buf.write(off, copy.read(off, m) if copy.memory is None else copy.memory.view[off : off + m])
        if on_landed is not None:
            on_landed(buf, off, m)
    return backend.hash(buf, algorithm, n, key=key)


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for off in range(0, n, COPY_CHUNK):
        yield off, min(COPY_CHUNK, n - off)
