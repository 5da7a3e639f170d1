"""Concurrent seal, verify and deallocate from many threads keep the manager consistent."""

from __future__ import annotations

import contextlib
import os
import random
import threading

from vram_residency import NotSealed, VramManager

TOKEN = "thread-token-0123456789abcdef"


def test_concurrent_seal_verify_deallocate() -> None:
    cap = 256 << 20
    with VramManager(TOKEN, backend="host", capacity_bytes=cap) as mgr:
        errors: list[BaseException] = []
        barrier = threading.Barrier(16)

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                barrier.wait()
                mine = []
                for _ in range(20):
                    mine.append(mgr.seal_model(os.urandom(rng.randrange(1, 600_000))))
                    for s in rng.sample(mine, min(3, len(mine))):
                        mgr.verify_sealed(s)
                    if rng.random() < 0.5:
                        victim = mine.pop(rng.randrange(len(mine)))
                        mgr.deallocate(victim)
                # Other threads' shards may vanish under us: only NotSealed is acceptable.
                for s in mgr.shards():
                    with contextlib.suppress(NotSealed):
                        mgr.verify_sealed(s)
                for s in mine:
                    mgr.deallocate(s)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert mgr.shards() == []
        assert mgr.available_vram() == cap


def test_double_deallocate_race() -> None:
    with VramManager(TOKEN, backend="host", capacity_bytes=64 << 20) as mgr:
        shard = mgr.seal_model(b"z" * 100_000)
        outcomes: list[str] = []

        def free() -> None:
            try:
                mgr.deallocate(shard)
                outcomes.append("freed")
            except NotSealed:
                outcomes.append("not-sealed")

        ts = [threading.Thread(target=free) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sorted(outcomes) == ["freed"] + ["not-sealed"] * 7
        assert mgr.available_vram() == 64 << 20


def test_close_waits_for_a_seal_in_flight() -> None:
    import time

    from vram_residency import VramError
    from vram_residency.backends.base import DeviceBuffer

    cap = 64 << 20
    mgr = VramManager(TOKEN, backend="host", capacity_bytes=cap)
    started = threading.Event()
    outcome: list[object] = []

    def slow_fill(buf: DeviceBuffer) -> None:
        started.set()
        time.sleep(0.3)
        buf.write(0, b"x" * 1000)

    def seal() -> None:
        try:
            outcome.append(mgr._seal_into(1000, slow_fill))
        except VramError as exc:
            outcome.append(exc)

    t = threading.Thread(target=seal)
    t.start()
    assert started.wait(5)
    mgr.close()  # must wait for the seal, which then fails to register and frees its buffer
    t.join()
    assert len(outcome) == 1
    assert isinstance(outcome[0], NotSealed)
    # The seal's buffer was freed before close() returned.
    assert mgr._backend.mem_info() == (cap, cap)
