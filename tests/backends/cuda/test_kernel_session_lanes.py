"""``KernelSession``'s routing, without a GPU: the compute lane's session hands out the backend's
stream, events, scratch and result buffer and all its multiprocessors; the low lane's session hands
out the lane's own and a share of the multiprocessors (``_LOW_SM_DIVISOR``), and waits through the
lane's own wait. Stand-in objects record which of them was asked; nothing is launched."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from vram_residency.backends.cuda._backend import _LOW_SM_DIVISOR, KernelSession
from vram_residency.errors import IntegrityViolation


def _record(calls: list[str], what: str, result: object) -> Any:
    def call(*args: object) -> object:
        calls.append(" ".join([what, *map(str, args)]))
        return result

    return call


def _backend(calls: list[str]) -> Any:
    return SimpleNamespace(
        _stream="compute stream",
        _t0="backend t0",
        _t1="backend t1",
        multiprocessors=132,
        _scratch=_record(calls, "backend scratch", 1000),
        _result_buffer=_record(calls, "backend results", "backend pinned"),
        _sync=_record(calls, "sync", None),
        _graphs="backend graphs",
    )


def _lane(calls: list[str]) -> Any:
    return SimpleNamespace(
        stream="low stream",
        t0="lane t0",
        t1="lane t1",
        arena=_record(calls, "arena", 2000),
        _pinned=_record(calls, "lane pinned", "lane pinned"),
        _wait=_record(calls, "lane wait", None),
        graphs="lane graphs",
    )


def test_the_compute_lane_session_is_the_backends() -> None:
    calls: list[str] = []
    ks = KernelSession(_backend(calls))
    assert (ks.stream, ks.t0, ks.t1, ks.multiprocessors) == (
        "compute stream",
        "backend t0",
        "backend t1",
        132,
    )
    assert ks.scratch(64) == 1000 and str(ks.result_buffer(32)) == "backend pinned"
    assert str(ks.graphs) == "backend graphs"
    ks.wait()
    assert calls == ["backend scratch 64", "backend results 32", "sync compute stream nh-fast-v1 kernels"]


def test_the_low_lane_session_is_the_lanes_on_a_share_of_the_sms() -> None:
    calls: list[str] = []
    ks = KernelSession(_backend(calls), _lane(calls))
    assert (ks.stream, ks.t0, ks.t1) == ("low stream", "lane t0", "lane t1")
    assert ks.multiprocessors == 132 // _LOW_SM_DIVISOR
    assert ks.scratch(64) == 2000 and str(ks.result_buffer(32)) == "lane pinned"
    assert str(ks.graphs) == "lane graphs"
    ks.wait()
    assert calls == ["arena 64", "lane pinned 32", "lane wait"]


@pytest.mark.parametrize("low", [False, True])
def test_a_session_used_after_its_block_refuses(low: bool) -> None:
    calls: list[str] = []
    ks = KernelSession(_backend(calls), _lane(calls) if low else None)
    ks._open = False
    for use in (
        lambda: ks.stream,
        lambda: ks.multiprocessors,
        lambda: ks.scratch(1),
        lambda: ks.graphs,
        ks.wait,
    ):
        with pytest.raises(IntegrityViolation, match="after its with block"):
            use()
    assert calls == []
