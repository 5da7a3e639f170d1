"""Several devices in one process (host backend: each device an emulated memory of its own)."""

from __future__ import annotations

import numpy as np
import pytest

from vram_residency import ConfigError, InvalidInput, NotSealed, SealVerificationFailed
from vram_residency.distributed import MultiDeviceManager
from vram_residency.testing import flip_bit

TOKEN = "multi-device-test-token-0123456789"


def _data(seed: int, n: int = 3 << 20) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_placement_and_concurrent_verification() -> None:
    with MultiDeviceManager(TOKEN, [0, 1, 2], backend="host") as md:
        shards = {d: [md.seal_model(_data(10 * d + j), d) for j in range(2)] for d in md.devices}
        for d, ss in shards.items():
            for s in ss:
                assert md.device_of(s) == d == s.gpu_device
        assert md.placement() == {d: [s.shard_id for s in ss] for d, ss in shards.items()}
        assert md.verify_all().ok
        bad = shards[1][1]
        flip_bit(md.manager(1), bad, 8 * (2 << 20) + 5)
        result = md.verify_all(raise_on_failure=False)
        assert not result.ok
        assert {d: [s.shard_id for s, _ in f] for d, f in result.failures.items() if f} == {1: [bad.shard_id]}
        ((_, exc),) = result.failures[1]
        assert isinstance(exc, SealVerificationFailed)
        assert exc.corrupted_ranges == [(2 << 20, 3 << 20)]
        with pytest.raises(SealVerificationFailed):
            md.verify_all()
        md.deallocate(bad)
        with pytest.raises(NotSealed):
            md.device_of(bad)
        assert md.verify_all().ok


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        MultiDeviceManager(TOKEN, [], backend="host")
    with pytest.raises(ConfigError):
        MultiDeviceManager(TOKEN, [0, 0], backend="host")
    with MultiDeviceManager(TOKEN, [0, 1], backend="host") as md:
        with pytest.raises(InvalidInput):
            md.seal_model(b"x" * 10, 5)
        with pytest.raises(InvalidInput):
            md.device_of("shard-x")  # type: ignore[arg-type]
        with MultiDeviceManager(TOKEN, [3], backend="host") as other:
            foreign = other.seal_model(b"y" * 100, 3)
            with pytest.raises(NotSealed):
                md.device_of(foreign)
