"""The local half of a tensor-parallel verify (``verify_shards``): whatever the rank's verify
raises must reach the collective as a failure, never as this rank's precomputed pass verdict."""

from __future__ import annotations

import os
from typing import Any

from vram_residency import VramManager
from vram_residency.distributed._collective import verify_shards
from vram_residency.errors import SealVerificationFailed

TOKEN = "tp-verdict-local-token-0123456789abcdef"
MiB = 1 << 20


class RefusingSink:
    """An audit sink that raises a SealVerificationFailed naming no shard when a success is
    written (a sink that forwards to a stricter checker, say)."""

    def __init__(self) -> None:
        self.refuse = False

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> None:
        if self.refuse and event_type == "SealVerified":
            raise SealVerificationFailed("the audit sink refused the record")


def test_a_verification_failure_naming_no_shard_is_not_a_pass() -> None:
    sink = RefusingSink()
    with VramManager(TOKEN, 0, backend="host", capacity_bytes=8 * MiB, audit=sink) as mgr:
        shards = [mgr.seal_model(os.urandom(MiB), model_ref=f"m{i}") for i in range(2)]
        assert verify_shards(mgr, shards) == [None, None]
        sink.refuse = True
        errors = verify_shards(mgr, shards)
        assert all(e is not None for e in errors)  # the rank's verify raised: it did not pass


def test_a_changed_shard_is_named_and_the_other_passes() -> None:
    with VramManager(TOKEN, 0, backend="host", capacity_bytes=8 * MiB) as mgr:
        shards = [mgr.seal_model(os.urandom(MiB), model_ref=f"m{i}") for i in range(2)]
        buf = mgr._entry(shards[1]).buf
        buf.write(7, bytes([buf.read(7, 1)[0] ^ 1]))
        errors = verify_shards(mgr, shards)
        assert errors[0] is None
        assert isinstance(errors[1], SealVerificationFailed) and errors[1].shard_id == shards[1].shard_id
