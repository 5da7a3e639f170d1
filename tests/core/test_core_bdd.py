"""Step definitions for tests/features/core.feature."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from vram_residency import (
    InsufficientVram,
    SealVerificationFailed,
    VramManager,
    check_seal_record,
)
from vram_residency.testing import flip_bit

TOKEN = "bdd-worker-token-0123456789abcdef"
scenarios("core.feature")


@pytest.fixture
def ctx() -> dict[str, Any]:
    return {}


@pytest.fixture
def mgr() -> Iterator[VramManager]:
    with VramManager(TOKEN, backend="host", capacity_bytes=64 << 20) as m:
        yield m


@given("a manager on the host backend with 64 MiB of capacity")
def _manager(mgr: VramManager) -> None:
    assert mgr.total_vram() == 64 << 20


@when(parsers.parse("I seal {mib:d} MiB of model bytes"))
@given(parsers.parse("a sealed shard of {mib:d} MiB"))
def _seal(mgr: VramManager, ctx: dict[str, Any], mib: int) -> None:
    ctx["shard"] = mgr.seal_model(os.urandom(mib << 20), model_ref="bdd-model")
    ctx["free"] = mgr.available_vram()


@then("the shard verifies")
def _verifies(mgr: VramManager, ctx: dict[str, Any]) -> None:
    mgr.verify_sealed(ctx["shard"])


@then("its seal record checks out with the worker token")
def _record(ctx: dict[str, Any]) -> None:
    assert check_seal_record(ctx["shard"].record(), TOKEN) == ctx["shard"]


@when(parsers.parse("one bit at byte {byte:d} flips in device memory"))
def _flip(mgr: VramManager, ctx: dict[str, Any], byte: int) -> None:
    flip_bit(mgr, ctx["shard"], 8 * byte + 5)


def _failure(mgr: VramManager, shard: Any) -> SealVerificationFailed:
    with pytest.raises(SealVerificationFailed) as info:
        mgr.verify_sealed(shard)
    return info.value


@then("verification fails with a digest mismatch")
def _mismatch(mgr: VramManager, ctx: dict[str, Any]) -> None:
    ctx["error"] = _failure(mgr, ctx["shard"])
    assert ctx["error"].tag_valid
    assert ctx["error"].actual_digest != ctx["shard"].digest


@then(parsers.parse("the corrupted range contains byte {byte:d}"))
def _located(ctx: dict[str, Any], byte: int) -> None:
    assert any(s <= byte < e for s, e in ctx["error"].corrupted_ranges)


@when("someone edits the shard's model reference")
def _edit(ctx: dict[str, Any]) -> None:
    ctx["shard"] = dataclasses.replace(ctx["shard"], model_ref="evil-model")


@then("verification fails because the tag does not match")
def _tag(mgr: VramManager, ctx: dict[str, Any]) -> None:
    assert _failure(mgr, ctx["shard"]).tag_valid is False


@when(parsers.parse("I try to seal {mib:d} MiB more"))
def _try_seal(mgr: VramManager, ctx: dict[str, Any], mib: int) -> None:
    with pytest.raises(InsufficientVram) as info:
        mgr.seal_model(b"\1" * (mib << 20))
    ctx["error"] = info.value


@then("the seal fails with InsufficientVram that may be retried")
def _oom(ctx: dict[str, Any]) -> None:
    assert ctx["error"].retriable


@then("no additional memory is in use")
def _no_leak(mgr: VramManager, ctx: dict[str, Any]) -> None:
    assert mgr.available_vram() == ctx["free"]
