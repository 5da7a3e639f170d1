"""Known answers of specs/attest-v1.md, byte for byte, and the strict JSON form."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_residency.errors import InvalidInput
from vram_residency.formats import digest
from vram_residency.formats.attest import (
    AttestedShard,
    Statement,
    attest_key,
    attest_message,
    attest_tag,
    check_nonce,
    probe_key,
    statement_from_json,
    statement_to_json,
    verify_statement_tag,
)
from vram_residency.formats.tree import BLAKE3, hash_units

TOKEN = "example-worker-token-0123456789"
NONCE = bytes(range(32))
KA_HEX = "91cf9fc1292edf3e7a0c48bf754865a6799091362c4b6a2253ed184f038892c3"
KP_HEX = "1bb8c0715c74375fc1684e7b89baff04b32ca6995967c83074593ec35b76f923"
PROBE_HEX = "9d0f3e484d9110cb761916595fb6d1d0c76aa3234617a44293e60e24802baa85"
SEAL_SIG_HEX = "511ade73fd72447321eceac8b86ed28dd2a976dfbb68a0dafb7e43f29236fac2"
TAG_NO_PROBE = "adf3449b899ac5ea22fcf1d2f58df350f7503a454357ea74406882f44452cffa"
TAG_PROBE_OK = "d52224af1d780afa441d1775e9d1545c0a71078a4de9480dcbbaf58946111ff4"
TAG_PROBE_MISMATCH = "2f8ae8f4429863bb6c4413f753c1b748d9ebe18238596ec4ca6dbd6e6ff41de4"


def P(n: int) -> bytes:
    return bytes((i * 31 + 7) % 256 for i in range(n))


def spec_statement(probe: bytes | None, verdict: str = "ok") -> Statement:
    return Statement(
        nonce=NONCE,
        worker_id="worker-a",
        attested_at_ns=1764331260000000000,
        shards=(
            AttestedShard(
                shard_id="shard-00112233445566778899aabbccddeeff",
                seal_signature=bytes.fromhex(SEAL_SIG_HEX),
                digest_now=digest(P(4097)),
                probe=probe,
                verified_at_ns=1764331259000000000,
            ),
        ),
        verdict=verdict,  # type: ignore[arg-type]
    )


def test_ka_known_answer() -> None:
    assert attest_key(TOKEN)._expose_for_tests().hex() == KA_HEX


def test_kp_known_answer() -> None:
    assert probe_key(attest_key(TOKEN), NONCE).hex() == KP_HEX


def test_probe_known_answer_is_standard_blake3_keyed() -> None:
    kp = bytes.fromhex(KP_HEX)
    assert blake3.blake3(P(4097), key=kp).hexdigest() == PROBE_HEX
    # The project's own BLAKE3 path, keyed, gives the same value.
    assert hash_units(P(4097), BLAKE3, key=kp).digest.hex() == PROBE_HEX


@pytest.mark.parametrize(
    ("probe", "verdict", "expected"),
    [
        (None, "ok", TAG_NO_PROBE),
        (bytes.fromhex(PROBE_HEX), "ok", TAG_PROBE_OK),
        (bytes.fromhex(PROBE_HEX), "mismatch", TAG_PROBE_MISMATCH),
    ],
    ids=["no-probe-ok", "probe-ok", "probe-mismatch"],
)
def test_statement_tag_known_answers(probe: bytes | None, verdict: str, expected: str) -> None:
    ka = attest_key(TOKEN)
    s = spec_statement(probe, verdict)
    assert attest_tag(ka, s).hex() == expected
    assert verify_statement_tag(ka, s, bytes.fromhex(expected))
    # Round trip through the JSON form keeps every field and the tag.
    doc = statement_to_json(s, bytes.fromhex(expected))
    back, tag = statement_from_json(doc)
    assert back == s
    assert tag.hex() == expected


def test_message_layout_starts_with_domain_and_length_prefixed_nonce() -> None:
    msg = attest_message(spec_statement(None))
    assert msg.startswith(b"llorch-vram-attest-v1" + (5).to_bytes(2, "little") + b"nonce")
    assert msg[28:32] == (32).to_bytes(4, "little")
    # The empty probe is an empty value, not an absent field.
    assert (5).to_bytes(2, "little") + b"probe" + (0).to_bytes(4, "little") in msg
    assert msg.endswith((7).to_bytes(2, "little") + b"verdict" + (1).to_bytes(4, "little") + b"\x01")


@pytest.mark.parametrize("n", [0, 1, 15, 65, 200])
def test_nonce_length_limits(n: int) -> None:
    with pytest.raises(InvalidInput):
        check_nonce(b"\x00" * n)


@pytest.mark.parametrize("n", [16, 64])
def test_nonce_length_edges_accepted(n: int) -> None:
    assert check_nonce(b"\x01" * n) == b"\x01" * n


def _doc() -> dict[str, Any]:  # a JSON document: the edits reach into it
    return statement_to_json(spec_statement(bytes.fromhex(PROBE_HEX)), bytes.fromhex(TAG_PROBE_OK))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(format="attest-v2"),
        lambda d: d.update(extra=1),
        lambda d: d.pop("verdict"),
        lambda d: d.update(verdict="OK"),
        lambda d: d.update(nonce=NONCE.hex().upper()),
        lambda d: d.update(nonce="00" * 15),
        lambda d: d.update(attested_at_ns=-1),
        lambda d: d.update(attested_at_ns=True),
        lambda d: d.update(attested_at_ns=1.5),
        lambda d: d.update(tag="zz" * 32),
        lambda d: d.update(shards={}),
        lambda d: d["shards"][0].update(probe="ab"),
        lambda d: d["shards"][0].update(shard_id=""),
        lambda d: d["shards"][0].update(extra=None),
        lambda d: d["shards"][0].update(verified_at_ns=1 << 64),
        lambda d: d.update(worker_id=7),
    ],
)
def test_malformed_json_refused(edit: Callable[[dict[str, Any]], object]) -> None:
    d = _doc()
    edit(d)
    with pytest.raises(InvalidInput):
        statement_from_json(d)


@settings(max_examples=60, deadline=None)
@given(
    probe=st.none() | st.binary(min_size=32, max_size=32),
    worker=st.text(max_size=20),
    nonce=st.binary(min_size=16, max_size=64),
    t=st.integers(0, (1 << 64) - 1),
)
def test_json_round_trip_property(probe: bytes | None, worker: str, nonce: bytes, t: int) -> None:
    try:
        worker.encode("utf-8")
    except UnicodeEncodeError:
        return
    ka = attest_key(TOKEN)
    s = Statement(
        nonce=nonce,
        worker_id=worker,
        attested_at_ns=t,
        shards=(AttestedShard("shard-x", b"\x01" * 32, b"\x02" * 32, probe, t),),
        verdict="ok",
    )
    tag = attest_tag(ka, s)
    back, tag2 = statement_from_json(statement_to_json(s, tag))
    assert back == s and tag2 == tag and verify_statement_tag(ka, back, tag2)
