"""Several devices in one process, without tensor parallelism: one ``VramManager`` per device.

A worker that owns several GPUs seals each model (or shard) on one of them. This keeps which
shard lives on which device (the bookkeeping a migration between devices needs: ``device_of``),
and verifies every device at once: one thread per device, each driving its own manager (on CUDA,
its own context and stream), so that the devices hash their memory concurrently and the wall
time is the slowest device's, not the sum.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from typing_extensions import Buffer

from vram_residency.distributed._collective import verify_shards
from vram_residency.errors import ConfigError, InvalidInput, NotSealed, VramError
from vram_residency.manager import BackendName, VramManager
from vram_residency.shard import SealedShard
from vram_residency.sources.model import SealedModel

__all__ = ["DeviceVerification", "MultiDeviceManager"]

T = TypeVar("T", SealedShard, SealedModel)


class DeviceVerification:
    """What one :meth:`MultiDeviceManager.verify_all` found: every failure, by device."""

    def __init__(self, failures: dict[int, list[tuple[SealedShard, Exception]]], seconds: float) -> None:
        self.failures = failures
        self.seconds = seconds

    @property
    def ok(self) -> bool:
        return not any(self.failures.values())

    def __repr__(self) -> str:
        bad = {d: [s.shard_id for s, _ in f] for d, f in self.failures.items() if f}
        return f"DeviceVerification(ok={self.ok}, failed={bad}, seconds={self.seconds:.6f})"


class MultiDeviceManager:
    """One :class:`VramManager` per device of ``devices``, all from the same token and options.

    Seal with :meth:`seal_model` / :meth:`seal_file` / :meth:`seal_files` / :meth:`seal_tensors`
    naming the device; ``device_of(shard)`` says where a shard lives; :meth:`verify_all` verifies
    every shard on every device concurrently. ``close()`` closes every manager.
    """

    def __init__(
        self,
        worker_token: str | bytes,
        devices: Sequence[int],
        *,
        backend: BackendName = "auto",
        **options: Any,
    ) -> None:
        devs = list(devices)
        if not devs or len(set(devs)) != len(devs):
            raise ConfigError("devices must be a non-empty list of distinct device numbers")
        self._managers: dict[int, VramManager] = {}
        try:
            for d in devs:
                self._managers[d] = VramManager(worker_token, d, backend=backend, **options)
        except BaseException:
            self.close()
            raise
        self._where: dict[str, int] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=len(devs), thread_name_prefix="vram-verify")

    @property
    def devices(self) -> list[int]:
        return list(self._managers)

    def manager(self, device: int) -> VramManager:
        try:
            return self._managers[device]
        except KeyError:
            raise InvalidInput(f"device {device!r} is not one of {self.devices}") from None

    def __iter__(self) -> Iterator[VramManager]:
        return iter(self._managers.values())

    def _track(self, device: int, sealed: T) -> T:
        shards = sealed.shards if isinstance(sealed, SealedModel) else (sealed,)
        with self._lock:
            for s in shards:
                self._where[s.shard_id] = device
        return sealed

    # -- sealing, on a named device --------------------------------------------------------------
    def seal_model(self, model_bytes: Buffer, device: int, **kwargs: Any) -> SealedShard:
        return self._track(device, self.manager(device).seal_model(model_bytes, **kwargs))

    def seal_file(self, path: Any, device: int, **kwargs: Any) -> SealedShard:
        return self._track(device, self.manager(device).seal_file(path, **kwargs))

    def seal_files(self, paths: Any, device: int, **kwargs: Any) -> SealedModel:
        return self._track(device, self.manager(device).seal_files(paths, **kwargs))

    def seal_tensors(self, tensors: Any, device: int, **kwargs: Any) -> SealedModel:
        return self._track(device, self.manager(device).seal_tensors(tensors, **kwargs))

    # -- bookkeeping ------------------------------------------------------------------------------
    def device_of(self, shard: SealedShard) -> int:
        """The device ``shard`` lives on; ``NotSealed`` for a shard this manager does not hold."""
        if not isinstance(shard, SealedShard):
            raise InvalidInput(f"expected a SealedShard, not {type(shard).__name__}")
        with self._lock:
            device = self._where.get(shard.shard_id)
        if device is None:
            raise NotSealed(f"shard {shard.shard_id!r} is not sealed on any of {self.devices}")
        return device

    def shards(self, device: int | None = None) -> list[SealedShard]:
        if device is not None:
            return self.manager(device).shards()
        return [s for m in self._managers.values() for s in m.shards()]

    def placement(self) -> dict[int, list[str]]:
        """Shard ids by device (what a migration planner starts from)."""
        return {d: [s.shard_id for s in m.shards()] for d, m in self._managers.items()}

    def deallocate(self, shard: SealedShard) -> None:
        self.manager(self.device_of(shard)).deallocate(shard)
        with self._lock:
            self._where.pop(shard.shard_id, None)

    # -- verification -----------------------------------------------------------------------------
    def verify_sealed(self, shard: SealedShard) -> None:
        self.manager(self.device_of(shard)).verify_sealed(shard)

    def verify_all(self, *, raise_on_failure: bool = True) -> DeviceVerification:
        """Verify every shard on every device, the devices concurrently (one thread each).

        Every shard is verified even after a failure. With ``raise_on_failure`` the first
        failure (in device order) is raised after all devices finished; the result lists all."""
        import time

        t0 = time.perf_counter()
        per_device = {d: m.shards() for d, m in self._managers.items()}
        futures = {
            d: self._pool.submit(verify_shards, self._managers[d], shards)
            for d, shards in per_device.items()
            if shards
        }
        failures: dict[int, list[tuple[SealedShard, Exception]]] = {}
        for d, fut in futures.items():
            errors = fut.result()
            failures[d] = [(s, e) for s, e in zip(per_device[d], errors, strict=True) if e is not None]
        result = DeviceVerification(failures, time.perf_counter() - t0)
        if raise_on_failure:
            for f in failures.values():
                if f:
                    raise f[0][1]
        return result

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        errors: list[BaseException] = []
        for m in getattr(self, "_managers", {}).values():
            try:
                m.close()
            except VramError as exc:  # close the others; report the first afterwards
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> MultiDeviceManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
