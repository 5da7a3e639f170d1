"""bench/staging_ab.py without a GPU: what its GPU run stands on and can be checked here (the
page-backing report from /proc/self/smaps, the staging swap, the parallel_copy timer, the summary)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests.bench.bench_helpers import load_bench

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


sab = load_bench("staging_ab")

SMAPS = """\
7f0000000000-7f0000001000 rw-p 00000000 00:00 0
Size:                  4 kB
KernelPageSize:        4 kB
Rss:                   4 kB
AnonHugePages:         0 kB
Locked:                0 kB
7f0000001000-7f0004001000 rw-p 00000000 00:00 0
Size:              65536 kB
KernelPageSize:        4 kB
Rss:               65536 kB
AnonHugePages:     63488 kB
Locked:                0 kB
VmFlags: rd wr mr mw me ac
7f0004001000-7f0004002000 rw-s 00000000 00:05 12 /dev/nvidiactl
Size:                  4 kB
KernelPageSize:        4 kB
Rss:                   4 kB
Locked:                4 kB
"""


def test_smaps_range_sums_every_mapping_that_overlaps_the_range() -> None:
    # A buffer whose first page sits in one mapping and the rest in the next: both count, the
    # third (after its end) does not.
    got = sab.smaps_range(0x7F0000000010, 64 * MiB - 16, SMAPS)
    assert got == {
        "vmas": 2,
        "paths": [""],
        "kernel_page_kB": [4],
        "Size": 65540,
        "Rss": 65540,
        "AnonHugePages": 63488,
        "Locked": 0,
    }
    assert sab.smaps_range(0x7F0004001000, 4096, SMAPS)["paths"] == ["/dev/nvidiactl"]
    assert sab.smaps_range(0x10, 16, SMAPS) == {"vmas": 0, "paths": [], "kernel_page_kB": []}


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_smaps_range_finds_a_real_array() -> None:
    a = np.ones(8 * MiB, dtype=np.uint8)
    got = sab.smaps_range(int(a.ctypes.data), a.size)
    assert got["vmas"] >= 1
    assert got["Size"] >= 8 * 1024  # kB
    assert got["Rss"] >= 8 * 1024  # every page was written by np.ones


def test_swap_staging_exchanges_buffers_and_keeps_each_sides_events() -> None:
    a = SimpleNamespace(_staging=[("a0", "ea0"), ("a1", "ea1")])
    b = SimpleNamespace(_staging=[("b0", "eb0"), ("b1", "eb1")])
    sab.swap_staging(a, b)
    assert a._staging == [("b0", "ea0"), ("b1", "ea1")]
    assert b._staging == [("a0", "eb0"), ("a1", "eb1")]
    sab.swap_staging(a, b)
    assert a._staging == [("a0", "ea0"), ("a1", "ea1")]
    assert b._staging == [("b0", "eb0"), ("b1", "eb1")]
    with pytest.raises(ValueError, match=r"shorter|longer"):  # zip(strict=True): unequal pools
        sab.swap_staging(a, SimpleNamespace(_staging=[("c0", "ec0")]))


def test_copy_timer_counts_each_call_and_restores_the_name() -> None:
    calls: list[tuple[Any, ...]] = []

    def copy(*args: Any) -> None:
        calls.append(args)

    module = SimpleNamespace(parallel_copy=copy)
    spent: list[float] = []
    with sab.copy_timer(module, spent):
        module.parallel_copy(1, 2)
        module.parallel_copy(3, 4)
    assert calls == [(1, 2), (3, 4)]
    assert len(spent) == 2 and all(t >= 0 for t in spent)
    assert module.parallel_copy is copy


def test_summary_gives_new_over_old_per_figure() -> None:
    def seal(gbps: float, copy_ms: float, rest_ms: float) -> dict[str, float]:
        return {"GBps": gbps, "copy_s": copy_ms / 1e3, "rest_s": rest_ms / 1e3, "chunks": 1}

    rnd = {
        "old_memcpy_GBps": [20.0, 20.0],
        "new_memcpy_GBps": [19.0, 19.0],
        "old_64MiB": seal(20.0, 2.0, 1.0),
        "new_64MiB": seal(19.0, 2.1, 1.0),
        "old_1024MiB": seal(35.0, 30.0, 0.5),
        "new_1024MiB": seal(35.0, 30.0, 0.6),
    }
    lines = sab.summarize({"rounds": [rnd], "swapped_rounds": []})
    assert lines[0] == "memcpy into staging, new/old: 0.950 (rounds 0.950..0.950)"
    assert lines[1].startswith("seal 64MiB pageable (own staging), new/old GB/s: 0.950")
    assert "rest (not copying) ms old/new: 1.000/1.000; copying ms old/new: 2.000/2.100" in lines[1]
    assert lines[2].startswith("seal 1024MiB pageable (own staging), new/old GB/s: 1.000")
    assert len(lines) == 3


def test_drop_staging_frees_the_buffers_and_the_copy_threads() -> None:
    closed: list[str] = []

    class Buf:
        def __init__(self, name: str) -> None:
            self.name = name

        def close(self) -> None:
            closed.append(self.name)

    class Pool:
        down = False

        def shutdown(self) -> None:
            self.down = True

    pool = Pool()
    be = SimpleNamespace(_staging=[(Buf("s0"), "e0"), (Buf("s1"), "e1")], _copy_pool=pool)
    sab.drop_staging(be)
    assert closed == ["s0", "s1"]
    assert be._staging == [] and be._copy_pool is None and pool.down
    sab.drop_staging(be)  # nothing left: nothing more to free
    assert closed == ["s0", "s1"]
