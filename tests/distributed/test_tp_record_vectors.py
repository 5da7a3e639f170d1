"""Known answers of docs/specs/tp-record-v1.md, and the checks of check_tp_record."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import pytest

from vram_residency import InvalidInput, SealVerificationFailed, VramManager
from vram_residency.distributed import RankPart, TPRecord, check_tp_record, tp_key, tp_message
from vram_residency.formats.seal import SealFields, seal_key, seal_message
from vram_residency.shard import SealedShard

TOKEN = "example-worker-token-0123456789"
DIGEST = "5e1fd3dc2db57d1b502c092c8851726417dea5bda061ba6b8987bb7f885580b5"


def _shard(shard_id: str, device: int, index: int) -> SealedShard:
    f = SealFields(
        shard_id,
        device,
        4097,
        "sha256-tree-v1",
        DIGEST,
        1764331200000000000,
        "worker-a",
        "llama-3-8b@sha256:abc",
        index,
        2,
    )
    return SealedShard.from_fields(f, seal_key(TOKEN).tag(seal_message(f)))


A = _shard("shard-00112233445566778899aabbccddeeff", 0, 0)
B = _shard("shard-ffeeddccbbaa99887766554433221100", 1, 1)
TWO = [RankPart(0, 0, "worker-a", (A,)), RankPart(1, 1, "worker-a", (B,))]


def test_key_known_answer() -> None:
    assert tp_key(TOKEN)._expose_for_tests().hex() == (
        "09051100f628dba89af29cb3e418f777565f8426448f6e003d9caa8c4bc0d556"
    )


def test_seal_tags_known_answers() -> None:
    assert A._signature.hex() == "511ade73fd72447321eceac8b86ed28dd2a976dfbb68a0dafb7e43f29236fac2"
    assert B._signature.hex() == "ca33419ea273080260ac740e8e2f7109bc5a61d6ac1640de39a43fb50e9bb232"


def test_two_rank_message_and_tag() -> None:
    m = tp_message("llama-3-8b", TWO)
    assert len(m) == 292
    assert hashlib.sha256(m).hexdigest() == "b5db7b081ec1e623304be5ad2071e516e16f75d41869042adf7cc3da1a00420c"
    rec = TPRecord.make(tp_key(TOKEN), "llama-3-8b", TWO)
    assert rec.signature == "fb9fc203a7bee8aa13c352b2ef9da58799b69219742d29fcbc0ea601bc461b8c"
    assert check_tp_record(rec.record(), TOKEN).parts == rec.parts


def test_one_rank_two_shards_encoding() -> None:
    parts = [RankPart(0, 0, "worker-a", (A, B))]
    m = tp_message("llama-3-8b", parts)
    assert hashlib.sha256(m).hexdigest() == "cce8292f6452517fd46ec2bb78fbf68e9f01844cedd42dbfdd9bc91c1d903631"
    assert TPRecord.make(tp_key(TOKEN), "llama-3-8b", parts).signature == (
        "d9ffb5a0b31e7f3b01f3a4c7801801a1a2885a55575549ecafd47d812a1498be"
    )
    # B was sealed on device 1: the checker refuses it as part of a device-0 rank.
    with pytest.raises(SealVerificationFailed, match="device"):
        check_tp_record(TPRecord.make(tp_key(TOKEN), "llama-3-8b", parts).record(), TOKEN)


def test_tp_tag_is_not_a_seal_tag() -> None:
    # Same token, different info: the two keys differ.
    assert tp_key(TOKEN)._expose_for_tests() != seal_key(TOKEN)._expose_for_tests()


# -- tampering, on records made by real managers ------------------------------------------------


def _real_record(world: int, per_rank: int = 2) -> dict[str, Any]:
    parts = []
    for r in range(world):
        with VramManager(TOKEN, device=r, backend="host", worker_id="w") as mgr:
            shards = tuple(mgr.seal_model(bytes([r + 1, j]) * 5000) for j in range(per_rank))
        parts.append(RankPart(r, r, "w", shards))
    return TPRecord.make(tp_key(TOKEN), "m", parts).record()


def test_real_record_checks() -> None:
    rec = _real_record(4)
    checked = check_tp_record(rec, TOKEN)
    assert checked.world_size == 4 and checked.model_name == "m"
    assert "signature" not in repr(checked) and rec["signature"] not in repr(checked)


@pytest.mark.parametrize(
    "edit",
    [
        "drop_last_rank",
        "drop_rank_fix_world",
        "extra_rank",
        "swap_ranks",
        "swap_ranks_renumbered",
        "reorder_shards",
        "drop_shard",
        "rename_model",
        "wrong_token",
        "world_size",
        "device",
    ],
)
def test_tampered_record_refused(edit: str) -> None:
    rec = _real_record(3)
    bad = copy.deepcopy(rec)
    token = TOKEN
    parts = bad["parts"]
    if edit == "drop_last_rank":
        parts.pop()
    elif edit == "drop_rank_fix_world":
        parts.pop()
        bad["world_size"] = 2
    elif edit == "extra_rank":
        parts.append(copy.deepcopy(parts[0]) | {"rank": 3})
    elif edit == "swap_ranks":
        parts[0], parts[1] = parts[1], parts[0]
    elif edit == "swap_ranks_renumbered":
        # Rank numbers fixed up, seals moved: the devices or the tag give it away.
        parts[0]["seals"], parts[1]["seals"] = parts[1]["seals"], parts[0]["seals"]
        parts[0]["device"], parts[1]["device"] = parts[1]["device"], parts[0]["device"]
    elif edit == "reorder_shards":
        parts[1]["seals"].reverse()
    elif edit == "drop_shard":
        parts[2]["seals"].pop()
    elif edit == "rename_model":
        bad["model_name"] = "other"
    elif edit == "wrong_token":
        token = "another-worker-token-0123456789"
    elif edit == "world_size":
        bad["world_size"] = 4
    elif edit == "device":
        parts[1]["device"] = 7
    with pytest.raises(SealVerificationFailed):
        check_tp_record(bad, token)


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {},
        {"format": "tp-record-v0"},
        {"format": "tp-record-v1", "model_name": "", "world_size": 1, "parts": [], "signature": "0" * 64},
        {"format": "tp-record-v1", "model_name": "m", "world_size": True, "parts": [], "signature": "0" * 64},
        {"format": "tp-record-v1", "model_name": "m", "world_size": 1, "parts": {}, "signature": "0" * 64},
        {"format": "tp-record-v1", "model_name": "m", "world_size": 1, "parts": [], "signature": "AB"},
        {
            "format": "tp-record-v1",
            "model_name": "m",
            "world_size": 1,
            "parts": [{"seals": []}],
            "signature": "0" * 64,
        },
    ],
)
def test_malformed_record(bad: Any) -> None:
    with pytest.raises(InvalidInput):
        check_tp_record(bad, TOKEN)


def test_seal_given_as_text_is_malformed() -> None:
    """A seal record is an object in the doc (and in every record the library writes): the same
    seal as JSON text, with its tag still valid, is refused as malformed, as a client built from
    the doc would refuse it."""
    rec = _real_record(3)
    check_tp_record(rec, TOKEN)
    for encode in (json.dumps, lambda s: json.dumps(s).encode()):
        bad = copy.deepcopy(rec)
        bad["parts"][1]["seals"][0] = encode(bad["parts"][1]["seals"][0])
        with pytest.raises(InvalidInput, match="seal"):
            check_tp_record(bad, TOKEN)
