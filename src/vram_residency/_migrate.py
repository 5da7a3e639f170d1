"""Sealed shards that move: verified migration between devices, offload to host memory or a file,
and restore, none of which trusts the copy it makes.

Every move follows one rule: the *receiving* side recomputes the unit digests of what landed and
compares them with the unit digests taken at seal time (trusted host memory of the manager). A
unit that arrived wrong is copied again from the sender (bounded retries); the sender is zeroed
and freed only after every unit and the digest match. Any failure leaves the original where it was,
sealed and verifiable, and frees what was allocated on the receiving side.

- ``migrate(src, shard, dest)``: ``src`` and ``dest`` are two managers on different devices that
  share one worker token (checked). The result is a new seal (new shard id, ``gpu_device`` of the
  destination), audited ``ShardMigrated`` with its predecessor. ``DeviceGroup`` holds one manager
  per device and migrates by device id.
- ``offload(mgr, shard, to="host"|"file")``: the bytes go to host memory (pinned on CUDA) or a
  file, each chunk hashed as it lands and compared with the seal; then the VRAM is zeroed and
  freed. The shard is *offloaded*: it is not registered, so verify/execute answer NotSealed.
- ``restore(mgr, shard)``: back into device memory, digested there, compared unit by unit with
  the seal; a unit that landed wrong is rewritten from the offloaded copy only if that copy's unit
  still hashes to the sealed unit digest. Only then is the shard registered (usable) again, under
  its original seal.

Manager internals used here (the lead ports these onto the core API): ``mgr._entry(shard)``,
``mgr._seal_into(...)`` (with ``fill``, ``expected_digest``, ``tensors``, ``source``),
``mgr._allocate(n)``, ``mgr._backend``, ``mgr._key``, ``mgr._emit``, and ``_register`` /
``_forget`` below (``mgr._lock`` and ``mgr._entries``).
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from vram_residency.backends.base import COPY_CHUNK, DeviceBuffer, HostMemory, LandedHook
from vram_residency.errors import (
    ConfigError,
    IntegrityViolation,
    InvalidInput,
    NotSealed,
    SealVerificationFailed,
)
from vram_residency.formats.seal import verify_tag
from vram_residency.formats.tree import UNIT_SIZE, HashResult, hash_units, unit_count
from vram_residency.shard import SealedShard

if TYPE_CHECKING:
    from vram_residency.manager import VramManager, _Entry

__all__ = [
    "DEFAULT_RETRIES",
    "DeviceGroup",
    "OffloadTarget",
    "migrate",
    "offload",
    "offloaded",
    "restore",
]

#: How many times a unit that arrived wrong is copied again before the move gives up.
DEFAULT_RETRIES: Final = 3
_PROBE: Final = b"vram-residency migrate: same worker token?"

OffloadTarget = Literal["host", "file"]


# -- manager internals, in one place ----------------------------------------------------------------


def _register(mgr: VramManager, entry: _Entry) -> None:
    with mgr._lock:
        mgr._check_open()
        mgr._entries[entry.shard.shard_id] = entry


def _forget(mgr: VramManager, entry: _Entry) -> bool:
    """Unregister ``entry`` (True) unless something else replaced or removed it (False)."""
    with mgr._lock:
        if mgr._entries.get(entry.shard.shard_id) is entry:
            del mgr._entries[entry.shard.shard_id]
            return True
    return False


def _check_tag(mgr: VramManager, shard: SealedShard, tag: bytes, action: str) -> None:
    """The seal must be intact before anything moves: a move keeps a seal; it cannot make an
    edited or forged one good."""
    if not (verify_tag(mgr._key, shard.fields(), tag) and hmac.compare_digest(shard._signature, tag)):
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
    return (
        len(result.unit_digests) == len(unit_digests)
        and not _bad_units(unit_digests, result.unit_digests)
        and hmac.compare_digest(result.digest.hex(), sealed.digest)
    )


def _check_retries(max_retries: int) -> None:
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries <= 100:
        raise InvalidInput("max_retries must be an integer between 0 and 100")


# -- migration ------------------------------------------------------------------------------------


def _check_peer(src: VramManager, dest: VramManager) -> None:
    from vram_residency.manager import VramManager

    if not isinstance(dest, VramManager):
        raise InvalidInput(f"destination must be a VramManager, not {type(dest).__name__}")
    if dest is src:
        raise InvalidInput("destination is the shard's own manager: nothing to migrate")
    src._check_open()
    dest._check_open()
    if dest.device == src.device and dest._backend.name == src._backend.name:
        raise InvalidInput(f"destination is the same device ({dest.device}) as the source")
    # One token: the new seal must be checkable with the same token as the old one. Compared
    # through tags of a fixed message, so that no key material is ever compared or exposed.
    if not hmac.compare_digest(src._key.tag(_PROBE), dest._key.tag(_PROBE)):
        raise ConfigError("source and destination managers do not share one worker token")


def migrate(
    src: VramManager,
    shard: SealedShard,
    dest: VramManager,
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
    entry = src._entry(shard)
    t0 = time.perf_counter_ns()
    with entry.lock:
        if entry.buf.closed:
            raise NotSealed(f"shard {shard.shard_id!r} was deallocated")
        _check_tag(src, shard, entry.tag, "migrated")
        sealed, units = entry.shard, entry.unit_digests
        n, algorithm = sealed.vram_bytes, sealed.digest_algorithm
        sbk, dbk = src._backend, dest._backend
        retried = 0

        def fill(dst: DeviceBuffer) -> HashResult:
            nonlocal retried
            result = dbk.copy_and_hash_from(dst, sbk, entry.buf, n, algorithm, on_landed=on_landed)
            for _attempt in range(max_retries):
                if _matches(sealed, units, result):
                    return result
                bad = _bad_units(units, result.unit_digests) or list(range(unit_count(n)))
                retried += len(bad)
                for off, length in _runs(bad, n):
                    dbk.copy_from(dst, sbk, entry.buf, off, length)
                    if on_landed is not None:
                        on_landed(dst, off, length)
                result = dbk.hash(dst, algorithm, n)
            if _matches(sealed, units, result):
                return result
            # Is the source itself damaged, or only the transfer? The source check raises
            # SealVerificationFailed (and audits it) in the first case.
            src._verify_entry(shard, entry)
            raise IntegrityViolation(
                f"shard {sealed.shard_id}: copy to device {dest.device} still arrived wrong after "
                f"{max_retries} retries while the source verifies; source kept"
            )

        new = dest._seal_into(
            n,
            fill,
            model_ref=sealed.model_ref,
            shard_index=sealed.shard_index,
            total_shards=sealed.total_shards,
            expected_digest=sealed.digest,
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
            src._emit("ShardMigrated", **fields)
            if dest._audit is not None and dest._audit is not src._audit:
                dest._emit("ShardMigrated", **fields)
        except BaseException:
            # Without its lineage record the new seal must not exist: undo it, keep the source.
            with contextlib.suppress(Exception):
                dest.deallocate(new)
            raise
        # The destination matches and is recorded: only now is the source zeroed and freed.
        if _forget(src, entry):
            entry.buf.close()
    src._emit("VramDeallocated", shard_id=sealed.shard_id, vram_bytes=n, reason="migrated")
    return new


class DeviceGroup:
    """One manager per device, all with one worker token: migrate by device id.

    ``DeviceGroup(token, devices=[0, 1], backend="host")`` gives two emulated devices in one
    process; on CUDA each manager owns its device's context. Managers are opened on first use,
    with the same options (worker id, audit log, backend) for every device.
    """

    def __init__(self, worker_token: str | bytes, devices: Sequence[int], **manager_options: Any) -> None:
        from vram_residency.formats.seal import seal_key

        seal_key(worker_token)  # a bad token fails here, before any device is touched
        self._token = worker_token
        ids = list(devices)
        if not ids or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in ids):
            raise ConfigError("devices must be a non-empty list of non-negative integers")
        if len(set(ids)) != len(ids):
            raise ConfigError("devices must not repeat")
        self._devices = tuple(ids)
        self._options = dict(manager_options)
        self._managers: dict[int, VramManager] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DeviceGroup(devices={list(self._devices)}, open={sorted(self._managers)})"

    @property
    def devices(self) -> tuple[int, ...]:
        return self._devices

    def add(self, manager: VramManager) -> None:
        """Use an existing manager for its device (it must share the group's token)."""
        from vram_residency.formats.seal import seal_key

        if manager.device not in self._devices:
            raise InvalidInput(f"device {manager.device} is not in this group {list(self._devices)}")
        if not hmac.compare_digest(seal_key(self._token).tag(_PROBE), manager._key.tag(_PROBE)):
            raise ConfigError("manager does not share the group's worker token")
        with self._lock:
            if manager.device in self._managers and self._managers[manager.device] is not manager:
                raise InvalidInput(f"device {manager.device} already has a manager in this group")
            self._managers[manager.device] = manager

    def manager(self, device: int) -> VramManager:
        from vram_residency.manager import VramManager

        if isinstance(device, bool) or not isinstance(device, int) or device not in self._devices:
            raise InvalidInput(f"unknown device {device!r}; this worker has devices {list(self._devices)}")
        with self._lock:
            mgr = self._managers.get(device)
            if mgr is None:
                mgr = VramManager(self._token, device, **self._options)
                self._managers[device] = mgr
            return mgr

    def owner(self, shard_id: str) -> VramManager | None:
        """The manager holding (or having offloaded) ``shard_id``, if any."""
        with self._lock:
            managers = list(self._managers.values())
        for mgr in managers:
            if any(s.shard_id == shard_id for s in mgr.shards()) or any(
                s.shard_id == shard_id for s in offloaded(mgr)
            ):
                return mgr
        return None

    def migrate(self, shard: SealedShard, device: int, *, max_retries: int = DEFAULT_RETRIES) -> SealedShard:
        src = self.manager(shard.gpu_device)
        return migrate(src, shard, self.manager(device), max_retries=max_retries)

    def close(self) -> None:
        with self._lock:
            managers, self._managers = list(self._managers.values()), {}
        errors: list[BaseException] = []
        for mgr in managers:
            try:
                discard_offloaded(mgr)
                mgr.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> DeviceGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- offload and restore --------------------------------------------------------------------------


class _Copy:
    """The offloaded bytes: host memory (pinned on CUDA) or a file we created."""

    def __init__(self, memory: HostMemory | None, path: str | None, n: int) -> None:
        self.memory = memory
        self.path = path
        self.n = n

    def read(self, offset: int, length: int) -> bytes:
        if self.memory is not None:
            return bytes(self.memory.view[offset : offset + length])
        assert self.path is not None
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise SealVerificationFailed(f"offload file {self.path} was truncated")
        return data

    def discard(self) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                _zero_and_unlink(self.path, self.n)
            self.path = None


def _zero_and_unlink(path: str, n: int) -> None:
    # Best effort against the bytes lingering in the page cache or on disk blocks the file owned.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            zeros = bytes(min(n, COPY_CHUNK))
            for off in range(0, n, COPY_CHUNK):
                os.pwrite(fd, zeros[: min(COPY_CHUNK, n - off)], off)
        finally:
            os.close(fd)
    os.unlink(path)


@dataclass(slots=True)
class _Offloaded:
    entry: _Entry
    copy: _Copy
    to: OffloadTarget
    lock: threading.Lock = field(default_factory=threading.Lock)


_OFFLOADED: weakref.WeakKeyDictionary[VramManager, dict[str, _Offloaded]] = weakref.WeakKeyDictionary()
_OFFLOADED_LOCK = threading.Lock()


def _table(mgr: VramManager) -> dict[str, _Offloaded]:
    with _OFFLOADED_LOCK:
        return _OFFLOADED.setdefault(mgr, {})


def offloaded(mgr: VramManager) -> list[SealedShard]:
    """The shards ``mgr`` has offloaded (sealed, not resident, not usable until restored)."""
    with _OFFLOADED_LOCK:
        table = dict(_OFFLOADED.get(mgr, {}))
    return [rec.entry.shard for rec in table.values()]


def discard_offloaded(mgr: VramManager) -> None:
    """Zero and release every offloaded copy of ``mgr`` (at shutdown)."""
    with _OFFLOADED_LOCK:
        table = _OFFLOADED.pop(mgr, {})
    for rec in table.values():
        with rec.lock:
            rec.copy.discard()


def _receive_host(
    mgr: VramManager,
    entry: _Entry,
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
    mgr._backend.read_into(entry.buf, offset, out)
    if on_landed is not None:
        on_landed(out, offset, n)
    bad = _bad_units(units, hash_units(out, sealed.digest_algorithm).unit_digests, first)
    for _attempt in range(max_retries):
        if not bad:
            return
        again = []
        for u in bad:
            start, length = _unit_range(u, sealed.vram_bytes)
            piece = out[start - offset : start - offset + length]
            mgr._backend.read_into(entry.buf, start, piece)
            if on_landed is not None:
                on_landed(piece, start, length)
            if hash_units(piece, sealed.digest_algorithm).unit(0) != units[32 * u : 32 * u + 32]:
                again.append(u)
        bad = again
    if bad:
        mgr._verify_entry(sealed, entry)  # raises when the device memory itself is damaged
        raise IntegrityViolation(
            f"shard {sealed.shard_id}: copy to host still arrived wrong after {max_retries} retries; "
            "the shard stays resident"
        )


def offload(
    mgr: VramManager,
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
    entry = mgr._entry(shard)
    with entry.lock:
        if entry.buf.closed:
            raise NotSealed(f"shard {shard.shard_id!r} was deallocated")
        _check_tag(mgr, shard, entry.tag, "offloaded")
        sealed = entry.shard
        n = sealed.vram_bytes
        copy = _offload_copy(mgr, entry, to, path, max_retries, on_landed)
        try:
            rec = _Offloaded(entry, copy, to)
            table = _table(mgr)
            with _OFFLOADED_LOCK:
                table[sealed.shard_id] = rec
            try:
                mgr._emit(
                    "ShardOffloaded",
                    shard_id=sealed.shard_id,
                    vram_bytes=n,
                    to=to,
                    path=copy.path,
                    backend=mgr.backend,
                )
            except BaseException:
                with _OFFLOADED_LOCK:
                    table.pop(sealed.shard_id, None)
                raise
        except BaseException:
            copy.discard()
            raise
        # The copy is proven and recorded: the VRAM can go.
        if _forget(mgr, entry):
            entry.buf.close()


def _offload_copy(
    mgr: VramManager,
    entry: _Entry,
    to: OffloadTarget,
    path: str | os.PathLike[str] | None,
    max_retries: int,
    on_landed: LandedHook | None,
) -> _Copy:
    n = entry.shard.vram_bytes
    if to == "host":
        memory = mgr._backend.allocate_host(n)
        try:
            for off in range(0, n, COPY_CHUNK):
                m = min(COPY_CHUNK, n - off)
                _receive_host(mgr, entry, memory.view[off : off + m], off, max_retries, on_landed)
        except BaseException:
            memory.close()
            raise
        return _Copy(memory, None, n)
    assert path is not None
    target = os.fspath(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        raise InvalidInput(f"offload file {target} exists already; not overwriting it") from None
    except OSError as exc:
        raise InvalidInput(f"cannot create offload file {target}: {exc.strerror}") from None
    stage: HostMemory | None = None
    try:
        stage = mgr._backend.allocate_host(min(n, COPY_CHUNK))
        for off in range(0, n, COPY_CHUNK):
            m = min(COPY_CHUNK, n - off)
            piece = stage.view[:m]
            _receive_host(mgr, entry, piece, off, max_retries, on_landed)
            done = 0
            while done < m:
                done += os.pwrite(fd, piece[done:], off + done)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            _zero_and_unlink(target, n)
        raise
    finally:
        if stage is not None:
            stage.close()
    os.close(fd)
    return _Copy(None, target, n)


def restore(
    mgr: VramManager,
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
    mgr._check_open()
    with _OFFLOADED_LOCK:
        rec = _OFFLOADED.get(mgr, {}).get(shard.shard_id)
    if rec is None:
        raise NotSealed(f"shard {shard.shard_id!r} is not offloaded by this manager")
    with rec.lock:
        with _OFFLOADED_LOCK:
            if _OFFLOADED.get(mgr, {}).get(shard.shard_id) is not rec:
                raise NotSealed(f"shard {shard.shard_id!r} was restored or discarded already")
        entry = rec.entry
        _check_tag(mgr, shard, entry.tag, "restored")
        sealed, units = entry.shard, entry.unit_digests
        n, algorithm = sealed.vram_bytes, sealed.digest_algorithm
        backend = mgr._backend
        t0 = time.perf_counter_ns()
        buf = mgr._allocate(n)
        try:
            result = _land(mgr, buf, rec.copy, algorithm, on_landed)
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
                    if hash_units(data, algorithm).unit(0) != units[32 * u : 32 * u + 32]:
                        damaged.append(u)
                        continue
                    buf.write(start, data)
                    if on_landed is not None:
                        on_landed(buf, start, length)
                    rewritten.add(u)
                if damaged:
                    ranges = [(s, s + m) for s, m in _runs(damaged, n)]
                    mgr._emit(
                        "SealVerificationFailed",
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
                result = backend.hash(buf, algorithm, n)
            restored = dataclasses.replace(entry, buf=buf, lock=threading.Lock())
            _register(mgr, restored)
            try:
                mgr._emit(
                    "ShardRestored",
                    shard_id=sealed.shard_id,
                    vram_bytes=n,
                    source=rec.to,
                    repaired_units=len(rewritten),
                    duration_ns=time.perf_counter_ns() - t0,
                )
            except BaseException:
                _forget(mgr, restored)
                raise
        except BaseException:
            buf.close()
            raise
        with _OFFLOADED_LOCK:
            _OFFLOADED.get(mgr, {}).pop(sealed.shard_id, None)
        rec.copy.discard()
    return len(rewritten)


def _land(
    mgr: VramManager, buf: DeviceBuffer, copy: _Copy, algorithm: str, on_landed: LandedHook | None
) -> HashResult:
    """Copy the offloaded bytes into ``buf``; the digests of what is now in device memory."""
    backend, n = mgr._backend, copy.n
    if copy.memory is not None and on_landed is None:
        # Pinned host memory on CUDA: copies straight from it, hashing each chunk as it lands.
        return backend.write_and_hash(buf, copy.memory.view[:n], algorithm)
    for off, m in _chunks(n):
        buf.write(off, copy.read(off, m) if copy.memory is None else copy.memory.view[off : off + m])
        if on_landed is not None:
            on_landed(buf, off, m)
    return backend.hash(buf, algorithm, n)


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for off in range(0, n, COPY_CHUNK):
        yield off, min(COPY_CHUNK, n - off)
