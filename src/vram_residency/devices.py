"""``DeviceGroup``: one ``VramManager`` per device of a worker, all with one worker token, so
that a sealed shard can be migrated by device id (issue 13).

    with DeviceGroup(token, devices=[0, 1], backend="host", capacity_bytes=64 << 20) as g:
        shard = g.manager(0).seal_model(data)
        moved = g.migrate(shard, 1)          # verified as it lands; the source is freed after

The moves themselves are ``VramManager.migrate`` / ``offload`` / ``restore``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from vram_residency.errors import ConfigError, InvalidInput
from vram_residency.formats.seal import seal_key
from vram_residency.manager import VramManager
from vram_residency.shard import SealedShard

__all__ = ["DEFAULT_RETRIES", "DeviceGroup"]

#: How many times a unit that arrived wrong is copied again before a migration gives up (the
#: same default as ``VramManager.migrate``).
DEFAULT_RETRIES = 3


class DeviceGroup:
    """One manager per device, all with one worker token: migrate by device id.

    ``DeviceGroup(token, devices=[0, 1], backend="host")`` gives two emulated devices in one
    process; on CUDA each manager owns its device's context. Managers are opened on first use,
    with the same options (worker id, audit log, backend) for every device.
    """

    def __init__(self, worker_token: str | bytes, devices: Sequence[int], **manager_options: Any) -> None:
        self._key = seal_key(worker_token)  # a bad token fails here, before any device is touched
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
        if not isinstance(manager, VramManager):
            raise InvalidInput(f"expected a VramManager, not {type(manager).__name__}")
        if manager.device not in self._devices:
            raise InvalidInput(f"device {manager.device} is not in this group {list(self._devices)}")
        if not manager.store.key_matches(self._key):
            raise ConfigError("manager does not share the group's worker token")
        with self._lock:
            if manager.device in self._managers and self._managers[manager.device] is not manager:
                raise InvalidInput(f"device {manager.device} already has a manager in this group")
            self._managers[manager.device] = manager

    def manager(self, device: int) -> VramManager:
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
                s.shard_id == shard_id for s in mgr.offloaded_shards()
            ):
                return mgr
        return None

    def migrate(self, shard: SealedShard, device: int, *, max_retries: int = DEFAULT_RETRIES) -> SealedShard:
        src = self.manager(shard.gpu_device)
        return src.migrate(shard, self.manager(device), max_retries=max_retries)

    def close(self) -> None:
        with self._lock:
            managers, self._managers = list(self._managers.values()), {}
        errors: list[BaseException] = []
        for mgr in managers:
            try:
                mgr.close()  # discards its offloaded copies too
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> DeviceGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
