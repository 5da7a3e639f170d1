"""Adversarial checks of the verify plan (``ShardStore._verify_planned``, ``_plan_applies``):
a presented shard object edited in place must never get a verdict other than the one a verify
from scratch gives, on the real host backend."""

from __future__ import annotations

import numpy as np
import pytest

from vram_residency import SealVerificationFailed, VramManager

TOKEN = "verify-plan-review3-token-0123456789"
CAP = 64 << 20


class _LyingLen(bytes):
    """bytes whose ``len`` says 32 whatever they hold: the buffer (what ``b"".join`` and
    ``hmac.compare_digest`` read) is the real one."""

    def __len__(self) -> int:
        return 32


def _outcome(mgr: VramManager, batch: list[object]) -> object:
    try:
        mgr.verify_many(batch)  # type: ignore[arg-type]
    except SealVerificationFailed as exc:
        return ("failed", exc.shard_ids, exc.tag_valid)
    return None


@pytest.mark.parametrize("check", ["full", "fast"])
def test_tags_split_31_33_behind_a_lying_len_are_refused_as_from_scratch(check: str) -> None:
    # The joined tags are unchanged, split 31 + 33 bytes across two shards, in bytes subclasses
    # whose len() says 32: the plan's length check must not take len()'s word for it.
    mgr = VramManager(TOKEN, backend="host", capacity_bytes=CAP, fast_check=True)
    with mgr:
        model = mgr.seal_tensors({f"w{i}": np.arange(3000 + i, dtype=np.uint8) for i in range(3)})
        batch: list[object] = list(model.shards)
        mgr.verify_many(model.shards, check=check)  # type: ignore[arg-type]
        mgr.verify_many(model.shards, check=check)  # type: ignore[arg-type]
        assert mgr.store._plans
        a, b = model.shards[0], model.shards[1]
        ta, tb = a.tag, b.tag
        object.__setattr__(a, "_signature", _LyingLen(ta[:31]))
        object.__setattr__(b, "_signature", _LyingLen(ta[31:] + tb))
        planned = _outcome(mgr, batch)
        mgr.store._plans.clear()
        scratch = _outcome(mgr, batch)
        assert scratch == ("failed", [a.shard_id, b.shard_id], False)
        assert planned == scratch
