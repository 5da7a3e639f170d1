"""``progressive_chunks``: the chunk schedule of a progressive allocation (restore into CUDA
virtual memory, and its host emulation). Known answers for the sizes measured on the GPU, and
properties over any size, granularity, first chunk and cap."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_residency.backends.base import ALIGNMENT, progressive_chunks
from vram_residency.errors import InvalidInput

MiB = 1 << 20
GiB = 1 << 30


def test_two_gib_at_two_mib_granularity() -> None:
    """The issue's shard, with the defaults (first 32 MiB, cap 512 MiB): 8 chunks where the first
    attempt mapped 32 of 64 MiB."""
    got = progressive_chunks(2 * GiB, 2 * MiB)
    assert [c // MiB for c in got] == [32, 64, 128, 256, 392, 392, 392, 392]


@pytest.mark.parametrize(
    ("total_mib", "expected"),
    [
        (2, [2]),
        (40, [40]),  # below twice the first chunk: one chunk (the copy of 40 MiB is < 1 ms)
        (64, [32, 32]),
        (90, [32, 58]),
        (1000, [32, 64, 128, 256, 260, 260]),
        (4096, [32, 64, 128, 256] + [452] * 8),
    ],
)
def test_known_schedules(total_mib: int, expected: list[int]) -> None:
    assert [c // MiB for c in progressive_chunks(total_mib * MiB, 2 * MiB)] == expected


def test_first_and_cap_are_rounded_to_the_granularity() -> None:
    # first 3 MiB -> 4 MiB; cap 9 MiB -> 8 MiB.
    got = progressive_chunks(40 * MiB, 2 * MiB, first=3 * MiB, cap=9 * MiB)
    assert [c // MiB for c in got] == [4, 6, 6, 8, 8, 8]


@pytest.mark.parametrize(
    "args",
    [
        (0, 2 * MiB),
        (-2 * MiB, 2 * MiB),
        (3 * MiB, 2 * MiB),  # not a multiple of the granularity
        (2 * MiB, 0),
        (2 * MiB, True),
        (2.0 * MiB, 2 * MiB),
        (2 * MiB, 2 * MiB, 0),
        (2 * MiB, 2 * MiB, 2 * MiB, -1),
    ],
)
def test_bad_arguments(args: tuple[Any, ...]) -> None:
    with pytest.raises(InvalidInput):
        progressive_chunks(*args)


@settings(max_examples=300, deadline=None)
@given(
    units=st.integers(1, 1 << 16),
    granularity=st.sampled_from([ALIGNMENT, 4096, 2 * MiB]),
    first_units=st.integers(1, 64),
    cap_units=st.integers(1, 1024),
)
def test_schedule_properties(units: int, granularity: int, first_units: int, cap_units: int) -> None:
    total = units * granularity
    first = first_units * granularity
    cap = max(cap_units * granularity, first)
    got = progressive_chunks(total, granularity, first, cap)
    # Covers the size exactly, in granularity multiples, each at most the cap.
    assert sum(got) == total
    assert all(c > 0 and c % granularity == 0 and c <= cap for c in got)
    # Never shrinking: no late chunk pays a driver call for little copy to hide it behind.
    assert all(a <= b for a, b in itertools.pairwise(got))
    # The first chunk is small: the first chunk asked for, or (a total below twice that, or a
    # cap below twice that) under twice it.
    assert got[0] == first or got[0] < 2 * first
    if total >= 2 * first and 2 * first <= cap:
        assert got[0] == first
    # Doubling from the first chunk while it grows, so the count is logarithmic up to the cap:
    # at most log2(cap / first) + 1 doubling chunks, then ceil(rest / cap) near-equal ones.
    doublings = 0
    while got[doublings:] and doublings < len(got) and got[doublings] == first << doublings:
        doublings += 1
    assert doublings <= max(1, (cap // first).bit_length())
    assert len(got) <= doublings + -(-total // cap) + 1
    # The near-equal tail differs by at most one granule.
    tail = got[doublings:]
    if tail:
        assert max(tail) - min(tail) <= granularity


@settings(max_examples=100, deadline=None)
@given(units=st.integers(1, 1 << 14))
def test_default_schedule_at_two_mib(units: int) -> None:
    """The CUDA defaults: first 32 MiB, cap 512 MiB, granularity 2 MiB."""
    total = units * 2 * MiB
    got = progressive_chunks(total, 2 * MiB)
    assert sum(got) == total and max(got) <= 512 * MiB
    assert got[0] == 32 * MiB or total < 64 * MiB
    # Up to 16 GiB: at most 4 doubling chunks + ceil(total / 512 MiB) near-equal ones.
    assert len(got) <= 4 + -(-total // (512 * MiB))
