"""``VramManager``: seal model bytes into device memory and verify them where they are."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from typing_extensions import Buffer

from vram_residency._core import (
    DEFAULT_MAX_TENSORS,
    AuditSink,
    BackendName,
    Check,
    ShardRecord,
    ShardStore,
    TensorSpan,
    attest_shards,
    check_seal_age,
    open_backend,
)
from vram_residency.backends.base import Backend, Capabilities, DeviceBuffer
from vram_residency.errors import ConfigError, InvalidInput
from vram_residency.formats import nhfast
from vram_residency.formats.attest import attest_key
from vram_residency.formats.keys import SecretKey
from vram_residency.formats.seal import seal_key
from vram_residency.formats.tree import SHA256_TREE_V1, HashResult
from vram_residency.shard import SealedShard

if TYPE_CHECKING:
    from vram_residency.sources.layout import FileFormat
    from vram_residency.sources.manifest import Manifest
    from vram_residency.sources.model import SealedModel
    from vram_residency.sources.repair import RepairReport

__all__ = ["AuditSink", "BackendName", "TensorSpan", "VramManager"]

log = logging.getLogger("vram_residency")

_DEFAULT_MAX_MODEL_BYTES = 100 * 2**30


class VramManager:
    """Seals model shards into device memory and verifies them on the device.

    ``backend`` is ``"auto"`` (CUDA when a usable GPU is present, else the host emulation),
    ``"cuda"`` or ``"host"``; ``.backend`` says which is in use. The manager is a context manager;
    ``close()`` zeroes and frees every shard.
    """

    def __init__(
        self,
        worker_token: str | bytes,
        device: int = 0,
        *,
        backend: BackendName = "auto",
        worker_id: str = "",
        capacity_bytes: int | None = None,
        max_model_bytes: int = _DEFAULT_MAX_MODEL_BYTES,
        max_tensors: int = DEFAULT_MAX_TENSORS,
        audit: AuditSink | None = None,
        allow_integrated: bool = False,
        fast_check: bool | None = None,
    ) -> None:
        """``fast_check``: also keep a keyed ``nh-fast-v1`` digest of every shard at seal time (one
        more memory-speed pass), which ``verify_many(check="fast")``, the scrubber and the
        service's pre-execute check compare instead of the seal's digest. None (the default):
        on for a real device, off for the host emulation (where the pass costs CPU time).

        ``max_tensors``: the most tensors one model file's header, or one model (``seal_files``
        over all its files, ``seal_tensors``), may list; more is ``InvalidInput`` before any
        device memory is touched. ``DEFAULT_MAX_TENSORS`` (262,144) is above every public
        checkpoint; the bound keeps a hostile header from costing gigabytes of host memory."""
        # Derive the keys first: a bad token must fail before any device is touched.
        seal_key_obj = seal_key(worker_token)
        self._attest_key: SecretKey = attest_key(worker_token)
        fast_key = SecretKey.from_token(worker_token, nhfast.KEY_INFO)
        if fast_check is not None and not isinstance(fast_check, bool):
            raise ConfigError("fast_check must be True, False or None")
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise ConfigError("device must be a non-negative integer")
        if device > 0xFFFFFFFF:  # seal-v1 binds it as a 32-bit field: no seal could be made
            raise ConfigError(f"device {device} does not fit seal-v1's 32-bit gpu_device field")
        if not isinstance(worker_id, str):
            raise ConfigError("worker_id must be a string")
        try:
            worker_id.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError("worker_id is not encodable as UTF-8") from None
        if isinstance(max_model_bytes, bool) or not isinstance(max_model_bytes, int) or max_model_bytes <= 0:
            raise ConfigError("max_model_bytes must be a positive integer")
        if isinstance(max_tensors, bool) or not isinstance(max_tensors, int) or max_tensors <= 0:
            raise ConfigError("max_tensors must be a positive integer")
        if capacity_bytes is not None and backend == "cuda":
            raise ConfigError("capacity_bytes applies to the host backend only")
        try:
            backend_obj = open_backend(backend, device, capacity_bytes, allow_integrated)
        except InvalidInput as exc:
            raise ConfigError(str(exc)) from None
        if fast_check is None:
            fast_check = not backend_obj.capabilities.emulated
        self._store = ShardStore(
            seal_key_obj, backend_obj, device=device, worker_id=worker_id,
            max_model_bytes=max_model_bytes, max_tensors=max_tensors, audit=audit,
            fast_key=fast_key, fast_check=fast_check,
        )  # fmt: skip

    # -- properties ---------------------------------------------------------------------------
    @property
    def store(self) -> ShardStore:
        """The seal core behind this manager (``vram_residency._core.ShardStore``): what the
        sources, the service and the testing tools call; applications use the manager."""
        return self._store

    @property
    def _backend(self) -> Backend:
        # Kept for the tests and benchmarks that inspect the backend; library code uses store.
        return self._store.backend

    @property
    def backend(self) -> str:
        """``"cuda"`` or ``"host"``: the backend in use."""
        return self._store.backend.name

    @property
    def capabilities(self) -> Capabilities:
        """What the backend in use can do (emulated memory, host views, device pointers, ...)."""
        return self._store.backend.capabilities

    @property
    def backend_description(self) -> str:
        return self._store.backend.describe()

    @property
    def device(self) -> int:
        return self._store.device

    @property
    def worker_id(self) -> str:
        return self._store.worker_id

    @property
    def max_model_bytes(self) -> int:
        return self._store.max_model_bytes

    @property
    def max_tensors(self) -> int:
        return self._store.max_tensors

    def __repr__(self) -> str:
        return (
            f"VramManager(backend={self.backend!r}, device={self.device}, "
            f"worker_id={self.worker_id!r}, shards={len(self._store)})"
        )

    # -- capacity -----------------------------------------------------------------------------
    def available_vram(self) -> int:
        self._store.check_open()
        return self._store.backend.mem_info()[0]

    def total_vram(self) -> int:
        self._store.check_open()
        return self._store.backend.mem_info()[1]

    def shards(self) -> list[SealedShard]:
        return self._store.shards()

    # -- sealing ------------------------------------------------------------------------------
    def seal_model(
        self,
        model_bytes: Buffer,
        device: int | None = None,
        *,
        model_ref: str | None = None,
        shard_index: int | None = None,
        total_shards: int | None = None,
        expected_digest: str | None = None,
        digest_algorithm: str = SHA256_TREE_V1,
    ) -> SealedShard:
        """Copy ``model_bytes`` into device memory, digest what landed there, and seal it."""
        if isinstance(model_bytes, str):
            raise InvalidInput("model_bytes must be bytes-like, not str")
        try:
            view = memoryview(model_bytes).cast("B")
        except TypeError:
            raise InvalidInput(
                f"model_bytes must support the buffer protocol, not {type(model_bytes).__name__}"
            ) from None
        except ValueError as exc:  # e.g. a non-contiguous buffer
            raise InvalidInput(f"model_bytes must be a contiguous buffer: {exc}") from None
        try:
            store = self._store
            backend = store.backend
            # The id is chosen before hashing: a keyed algorithm's key is per shard id.
            sid = store.new_shard_id()
            key = store.digest_key(digest_algorithm, sid) if isinstance(digest_algorithm, str) else None
            return store.seal_into(
                len(view),
                lambda buf: backend.write_and_hash(buf, view, digest_algorithm, key=key),
                shard_id=sid,
                device=device,
                model_ref=model_ref,
                shard_index=shard_index,
                total_shards=total_shards,
                expected_digest=expected_digest,
                digest_algorithm=digest_algorithm,
            )
        finally:
            view.release()

    def _seal_into(
        self, size: int, fill: Callable[[DeviceBuffer], HashResult | None], **kw: Any
    ) -> SealedShard:
        # Kept for tests that drive the sealing path directly; it is ShardStore.seal_into.
        return self._store.seal_into(size, fill, **kw)

    # -- files, tensors, repair (implemented in vram_residency.sources) ------------------------
    def seal_file(
        self,
        path: str | os.PathLike[str],
        device: int | None = None,
        *,
        format: FileFormat = "auto",
        model_ref: str | None = None,
        shard_index: int | None = None,
        total_shards: int | None = None,
        expected_digest: str | None = None,
        manifest: Manifest | str | os.PathLike[str] | None = None,
        digest_algorithm: str = SHA256_TREE_V1,
        progress: Callable[[int], None] | None = None,
        staging_bytes: int | None = None,
        staging_buffers: int | None = None,
        observe: Callable[[memoryview], None] | None = None,
    ) -> SealedShard:
        """Stream a file (raw, safetensors or GGUF) into device memory and seal it as one shard.

        Host memory stays bounded (``staging_bytes``, 128 MiB by default, 256 MiB at most). The
        shard's tensor index maps tensor names to their byte ranges in the file. A file that
        cannot be opened or parsed, or whose digest differs from ``expected_digest`` or the
        ``manifest``, raises ``InvalidInput`` with nothing left allocated. ``progress`` is called
        with each number of bytes copied; ``observe`` with the bytes themselves, in file order, as
        they stream (a plain SHA-256 beside the seal's digest; it may raise to abort the seal)."""
        from vram_residency.sources.files import seal_file

        return seal_file(
            self._store,
            path,
            device=device,
            format=format,
            model_ref=model_ref,
            shard_index=shard_index,
            total_shards=total_shards,
            expected_digest=expected_digest,
            manifest=manifest,
            digest_algorithm=digest_algorithm,
            progress=progress,
            staging_bytes=staging_bytes,
            staging_buffers=staging_buffers,
            observe=observe,
        )

    def seal_files(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        device: int | None = None,
        *,
        model_name: str | None = None,
        format: FileFormat = "auto",
        manifest: Manifest | str | os.PathLike[str] | None = None,
        digest_algorithm: str = SHA256_TREE_V1,
        progress: Callable[[int], None] | None = None,
        staging_bytes: int | None = None,
        staging_buffers: int | None = None,
    ) -> SealedModel:
        """Seal a multi-file model (a directory or ``*.safetensors.index.json`` of a sharded
        checkpoint, or a list of files in order) as one ``vram-model-v1`` model: one shard per
        file, all bound to a model_ref that covers every file's name, size and digest in order.
        All or nothing."""
        from vram_residency.sources.files import seal_files

        return seal_files(
            self._store,
            paths,
            device=device,
            model_name=model_name,
            format=format,
            manifest=manifest,
            digest_algorithm=digest_algorithm,
            progress=progress,
            staging_bytes=staging_bytes,
            staging_buffers=staging_buffers,
        )

    def seal_tensors(
        self,
        tensors: Any,
        device: int | None = None,
        *,
        model_name: str | None = None,
        digest_algorithm: str = SHA256_TREE_V1,
    ) -> SealedModel:
        """Seal tensors where they already are, without copying: an ``nn.Module``'s parameters and
        buffers, a mapping of names to tensors, or a sequence of tensors (CUDA array interface or
        DLPack; CPU memory on the host backend). The framework keeps owning that memory; see
        :mod:`vram_residency.sources.tensors` for what adopting cannot promise."""
        from vram_residency.sources.tensors import seal_tensors

        return seal_tensors(
            self._store, tensors, device=device, model_name=model_name, digest_algorithm=digest_algorithm
        )

    def verify_model(self, model: SealedModel) -> None:
        """Check that ``model``'s parts still bind to its model_ref, then verify every shard in
        one batch (see :meth:`verify_many`)."""
        from vram_residency.sources.model import SealedModel

        if isinstance(model, SealedShard):
            raise InvalidInput(
                "verify_model takes a SealedModel; verify a SealedShard with verify_sealed(shard) "
                "or verify_many([shard, ...])"
            )
        if not isinstance(model, SealedModel):
            raise InvalidInput(f"verify_model takes a SealedModel, not {type(model).__name__}")
        # The binding is checked before any verdict on the shards: on the host while the device
        # digests them when the batch is planned, before anything else when it is not.
        shards, binding = model.binding_check()
        self._store.verify_many(shards, before_verdict=binding)

    def repair(
        self, shard: SealedShard, source: str | os.PathLike[str] | Buffer | None = None
    ) -> RepairReport:
        """Re-copy only the damaged 1 MiB units of ``shard`` from ``source`` (by default the file
        it was sealed from), each checked against its sealed unit digest before it is written,
        then verify the shard against its original seal and audit ``ShardRepaired``."""
        from vram_residency.sources.repair import repair

        return repair(self._store, shard, source)

    # -- moving shards (implemented in vram_residency._migrate) ---------------------------------
    def migrate(self, shard: SealedShard, to: VramManager, *, max_retries: int = 3) -> SealedShard:
        """Move ``shard`` to ``to``'s device (a manager with the same worker token): copied peer to
        peer where the devices allow it, verified unit by unit as it lands, re-copied where it
        landed wrong; the source is zeroed and freed only once the destination matches. Returns
        the new seal (new shard id, new device), audited ``ShardMigrated``. On failure the
        original stays sealed here and nothing stays allocated there."""
        from vram_residency._migrate import migrate

        if not isinstance(to, VramManager):
            raise InvalidInput(f"destination must be a VramManager, not {type(to).__name__}")
        return migrate(self._store, shard, to.store, max_retries=max_retries)

    def offload(
        self,
        shard: SealedShard,
        to: Literal["host", "file"] = "host",
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        """Move ``shard``'s bytes to host memory (pinned on CUDA) or a new file, verified as they
        land, and free its VRAM. The shard is then unusable until :meth:`restore`."""
        from vram_residency._migrate import offload

        offload(self._store, shard, to, path)

    def restore(self, shard: SealedShard) -> int:
        """Bring an offloaded shard back under its original seal, verified in device memory
        before it is usable again (units that landed wrong are rewritten from the offloaded copy
        where that copy still matches the seal). Returns the number of units rewritten."""
        from vram_residency._migrate import restore

        return restore(self._store, shard)

    def offloaded_shards(self) -> list[SealedShard]:
        """Shards offloaded by this manager (sealed, not resident)."""
        from vram_residency._migrate import offloaded

        return offloaded(self._store)

    # -- verification -------------------------------------------------------------------------
    def _entry(self, shard: SealedShard) -> ShardRecord:
        # Kept for tests that inspect a shard's record; library code uses store.lookup.
        return self._store.lookup(shard)

    def device_buffer(self, shard: SealedShard) -> DeviceBuffer:
        """The device buffer holding ``shard``'s bytes, for executors that run on the sealed bytes
        in place (``buf.host_view()`` / ``buf.device_pointer``, as ``capabilities`` says). Any write
        through it is, to the seal, corruption; it stays valid until the shard is deallocated."""
        return self._store.lookup(shard).buf

    def verify_sealed(self, shard: SealedShard) -> None:
        """Check the seal's tag, then recompute the digest from device memory.

        Raises ``SealVerificationFailed`` (with ``corrupted_ranges`` and, where known,
        ``corrupted_tensors``) on any mismatch; ``NotSealed`` for an unknown shard."""
        if not isinstance(shard, SealedShard):
            raise InvalidInput(f"expected a SealedShard, not {type(shard).__name__}")
        self._store.verify_many([shard])

    def verify_many(
        self,
        shards: Iterable[SealedShard | SealedModel] | SealedModel,
        *,
        check: Check = "full",
        full_every_s: float | None = None,
    ) -> None:
        """Verify any collection of shards in one batch: one ``digest_many`` pass over all of
        them on the device, then unit digests only of the shards that changed, to say where.

        A ``SealedModel`` (alone or among the items) is checked for its binding first and
        contributes its shards. Every shard is audited; on any failure one
        ``SealVerificationFailed`` names every failed shard (``failures``, ``shard_ids``, each
        with its ranges and tensors). ``NotSealed`` for a shard this manager does not hold.
        ``check="fast"``: compare the keyed fast digests taken at seal time (see ``fast_check``
        and ``ShardStore.verify_many``) instead of the seal's digests, with the seal's digest
        for shards whose last full check is ``full_every_s`` or more seconds old."""
        from vram_residency.sources.model import SealedModel

        items: Iterable[object] = (shards,) if isinstance(shards, SealedModel) else shards
        if isinstance(items, (str, bytes, SealedShard)):
            raise InvalidInput("verify_many takes a collection of shards; use verify_sealed for one")
        flat: list[SealedShard] = []
        try:
            iterator = iter(items)
        except TypeError:
            raise InvalidInput(
                f"verify_many takes a collection of shards, not {type(shards).__name__}"
            ) from None
        for item in iterator:
            if isinstance(item, SealedModel):
                flat.extend(item.bound_shards())
            elif isinstance(item, SealedShard):
                flat.append(item)
            else:
                raise InvalidInput(
                    f"verify_many takes SealedShard or SealedModel items, not {type(item).__name__}"
                )
        self._store.verify_many(flat, check=check, full_every_s=full_every_s)

    # -- release ------------------------------------------------------------------------------
    # -- attestation (attest-v1) and seal age ----------------------------------------------------
    def attest(
        self,
        nonce: bytes,
        shards: Sequence[SealedShard | str] | None = None,
        probe: bool = False,
    ) -> dict[str, Any]:
        """The ``attest-v1`` statement (JSON form, tagged under KA) for ``nonce``: each shard's
        digest recomputed from device memory now, in one batched pass (``digest_many``), and with
        ``probe`` its BLAKE3 keyed hash under KP in the same pass.

        ``shards``: shards or shard ids, in the statement's order (default: every shard, in the
        order they were sealed). On a match every shard's ``last_verified_ns`` moves to now.

        A mismatch is a failed verification: ``SealVerificationFailed`` is audited for each shard
        that changed (with the changed ranges), ``AttestationIssued`` with verdict ``mismatch``,
        and ``AttestationMismatch`` is raised (a ``SealVerificationFailed``, so every caller stops
        the worker exactly as on a failed verify) carrying the tagged statement, which the worker
        still sends: it tells the orchestrator which shard failed."""
        return attest_shards(self._store, self._attest_key, nonce, shards, probe)

    def last_verified_ns(self) -> dict[str, int]:
        """Each shard's last successful verification (seal, verify or attest), ns since the epoch."""
        return self._store.last_verified_ns()

    def check_seal_age(
        self,
        max_age_ns: int,
        *,
        policy: Literal["reverify", "refuse"] = "reverify",
        now_ns: int | None = None,
    ) -> list[str]:
        """Enforce a maximum seal age: every shard whose last successful verification is older
        than ``max_age_ns`` is verified now (``"reverify"``; a mismatch raises as verify does),
        or the call raises ``StaleSeal`` naming them (``"refuse"``). Returns the ids re-verified."""
        return check_seal_age(self._store, max_age_ns, policy=policy, now_ns=now_ns)

    def deallocate(self, shard: SealedShard) -> None:
        """Zero and free the shard's device memory and forget its seal."""
        self._store.deallocate(shard)

    def close(self) -> None:
        """Zero and free every shard, then release the backend. Idempotent."""
        if self._store.closed:
            return
        from vram_residency._migrate import discard_offloaded

        # Offloaded copies (host memory, files) go with the manager: discarded once no offload
        # or restore is still running (one that ran on would file its copy after the discard).
        store = self._store
        store.close(drain=lambda: discard_offloaded(store))

    def __enter__(self) -> VramManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort only: device memory must not outlive a forgotten manager.
        store = self.__dict__.get("_store")
        if store is not None and not store.closed:
            with contextlib.suppress(Exception):  # nothing can be reported from a finalizer
                self.close()
