"""Independent clients of the project's own formats (docs/specs/), written from the text alone.

``nh_fast_v1`` and ``tp_message`` below were written from ``docs/specs/nh-fast-v1.md`` and
``docs/specs/tp-record-v1.md`` (and the fixed ``seal-v1`` spec they build on) without reading the
implementation, as an orchestrator in another language would: blake3, hashlib/hmac, cryptography's
HKDF and numpy only, nothing from ``vram_residency``. They are checked against every known answer
in the docs, then the library's public API (``formats.nhfast``, the host backend, the CLI's
``vram-residency digest``, ``distributed.tp_message`` / ``check_tp_record``) is checked against
them with hypothesis over sizes, boundaries and fields. A disagreement is a bug in the doc or the
code; both must change together.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.formats.test_spec_independent import KA_FIELDS  # seal-v1's known-answer fields
from vram_residency import check_seal_record
from vram_residency.backends.host import HostBackend
from vram_residency.distributed import RankPart, check_tp_record, tp_key, tp_message
from vram_residency.errors import InvalidInput, SealVerificationFailed
from vram_residency.formats import nhfast, tree

MIB = 1 << 20
TOKEN = "example-worker-token-0123456789"
SHARD_A = "shard-00112233445566778899aabbccddeeff"
SHARD_B = "shard-ffeeddccbbaa99887766554433221100"
KAT_KEY = bytes(range(32))
# Few examples, small sizes: the whole module stays within a few seconds on a shared 2-core box.
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pattern(n: int) -> bytes:
    """``P(n)``: the bytes ``(i * 31 + 7) mod 256``, the docs' known-answer input."""
    return bytes((np.arange(n, dtype=np.uint64) * 31 + 7).astype(np.uint8).tobytes())


def le(x: int, width: int) -> bytes:
    return x.to_bytes(width, "little")


def hkdf_sha256(ikm: bytes, info: bytes) -> bytes:
    # salt = none: RFC 5869's default (HashLen zero bytes), which cryptography applies for None.
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)


# ---------------------------------------------------------------- nh-fast-v1, from the text alone

_MASK32 = np.uint64(0xFFFFFFFF)


def nh_key_schedule(key: bytes) -> tuple[bytes, bytes, np.ndarray[Any, np.dtype[np.uint64]]]:
    """Section "Key schedule": keyed BLAKE3 (not derive_key) of the 23-byte string, 5184 bytes."""
    x = blake3.blake3(b"nh-fast-v1 key schedule", key=key).digest(length=5184)
    words = np.frombuffer(x[64:5184], dtype="<u4").astype(np.uint64)
    assert words.shape == (1280,)
    return x[0:32], x[32:64], words


def nh_leaf_tags(data: bytes, words: np.ndarray[Any, np.dtype[np.uint64]]) -> list[bytes]:
    """Steps 1 to 3: pad to whole 4096-byte chunks (one for n = 0), three Toeplitz-shifted NH."""
    c = max(1, -(-len(data) // 4096))
    padded = data + bytes(c * 4096 - len(data))
    m = np.frombuffer(padded, dtype="<u4").astype(np.uint64).reshape(c, 1024)
    sums = []
    for t in range(3):
        s = (m + words[128 * t : 128 * t + 1024]) & _MASK32
        # Each product of two values < 2^32 fits in 64 bits; numpy's uint64 sum wraps mod 2^64.
        sums.append((s[:, 0::2] * s[:, 1::2]).sum(axis=1, dtype=np.uint64))
    return [b"".join(le(int(sums[t][i]), 8) for t in range(3)) for i in range(c)]


def nh_fast_v1(data: bytes, key: bytes) -> tuple[bytes, list[bytes]]:
    """``(D, [U_0 .. U_{u-1}])`` of ``data`` under the 32-byte ``key``: steps 1 to 5."""
    k_unit, k_top, words = nh_key_schedule(key)
    tags = nh_leaf_tags(data, words)
    n = len(data)
    u = max(1, -(-n // MIB))
    assert len(tags) <= 256 * u
    units = [blake3.blake3(b"".join(tags[256 * j : 256 * j + 256]), key=k_unit).digest() for j in range(u)]
    return blake3.blake3(b"".join(units) + le(n, 8), key=k_top).digest(), units


def nh_worker_key(token: bytes) -> bytes:
    return hkdf_sha256(token, b"llorch-vram-nhfast-v1")


def nh_shard_key(worker_key: bytes, shard_id: str) -> bytes:
    sid = shard_id.encode("utf-8")
    return hmac.new(worker_key, b"nh-fast-v1 shard" + le(len(sid), 4) + sid, hashlib.sha256).digest()


# Every known answer of docs/specs/nh-fast-v1.md: (input, D, [U_0, ..]) under K = 00 01 .. 1f.
# The last five rows were added from this reference and confirmed by the library (below).
NH_KATS: list[tuple[str, bytes, str, list[str]]] = [
    (
        "empty",
        b"",
        "c8f0a12c84783c497f14a66fa124dd968fe4c4411a23af13844ee9e9948ad82f",
        ["81ac16b7a50f758caa4c1ff1157379cd9baf37d1784bb4892f34eacc54dd2e05"],
    ),
    (
        "abc",
        b"abc",
        "340ef17825027a657fc820b11d756de16bcdc11291057921cd811e3d390a8982",
        ["aad069153000993828d4568d9270390259f9022cb01f38df301bdddb498c7b21"],
    ),
    (
        "P(4096)",
        pattern(4096),
        "7d71eb4a4bfbbc8e4946c00db86a8806f3b9de4756d3141a005625be185c50d0",
        ["bb2d39aa1f97b259d6691cda098e28dbc2f2e0b437ae9cacf12a4645b65db4a1"],
    ),
    (
        "P(4097)",
        pattern(4097),
        "b1db44a3ca5d6f9d7bf7c610195cd2f8efcf041a161be4cfe72c224b01a8ff67",
        ["26488743297b99385947b02dcbdceb47df0a33b2361752ab889cb075b5f4b469"],
    ),
    (
        "P(1048576)",
        pattern(MIB),
        "96ba2e397e692c2f250797ef9f15638113ba9bbbe28d2d559d4a086857089d42",
        ["cbc9438bcef250d6637b63f02e859e0f27711260ac8493a4da2d6ac5b44e6c11"],
    ),
    (
        "P(1052673)",
        pattern(MIB + 4097),
        "61e54277ce1b595c0ffe3cc91c17b5e8498c2a78d401e38498465a898a9fa3f7",
        [
            "cbc9438bcef250d6637b63f02e859e0f27711260ac8493a4da2d6ac5b44e6c11",
            "26488743297b99385947b02dcbdceb47df0a33b2361752ab889cb075b5f4b469",
        ],
    ),
    # Added: one byte short of a leaf, one byte past a unit, exactly two units, two units and a leaf.
    (
        "P(4095)",
        pattern(4095),
        "5ad3169dea5e1b05cedc85b99c1fc768195b73dfaac6fb9ad0a49dbebb5b2ffb",
        ["f4bec3ddfcf8f18fe4acac9ad48c38efdabbca165d5da1fc892d3d4cbcf41e5b"],
    ),
    (
        "P(1048577)",
        pattern(MIB + 1),
        "517da3c18f8afdbdd93dcd7f568a05bcd9049b655de16af14ba8b534b3ed536a",
        [
            "cbc9438bcef250d6637b63f02e859e0f27711260ac8493a4da2d6ac5b44e6c11",
            "6fdcc28a0bc07d39718854f3afe8ba01eccb57c30e61a3f83416d1b595114cd7",
        ],
    ),
    (
        "P(2097152)",
        pattern(2 * MIB),
        "1f4a9c2e2d71c4997c30246829b3cd518869d525e5861dd24500449e075f308a",
        [
            "cbc9438bcef250d6637b63f02e859e0f27711260ac8493a4da2d6ac5b44e6c11",
            "cbc9438bcef250d6637b63f02e859e0f27711260ac8493a4da2d6ac5b44e6c11",
        ],
    ),
    (
        "P(2101248)",
        pattern(2 * MIB + 4096),
        "06a4787db8b829a40df49da731d3aef483a7eba1e761395500bac56f578f7b1a",
        [
            "cbc9438bcef250d6637b63f02e859e0f27711260ac8493a4da2d6ac5b44e6c11",
            "cbc9438bcef250d6637b63f02e859e0f27711260ac8493a4da2d6ac5b44e6c11",
            "bb2d39aa1f97b259d6691cda098e28dbc2f2e0b437ae9cacf12a4645b65db4a1",
        ],
    ),
]


def test_nh_key_schedule_known_answers() -> None:
    k_unit, k_top, words = nh_key_schedule(KAT_KEY)
    assert k_unit.hex() == "c7a9fe560d44841778c22120ce1b526366609eee92b4ff3696e96a1b445bd921"
    assert k_top.hex() == "1a5a85550446f71b8af4a80528c165dd8ac7f9c7407b26cd92db82d575065092"
    nh_key = words.astype("<u4").tobytes()
    assert nh_key[0:32].hex() == "9e630d8e292148e32cad13aa5339585ce8478c8780ed81b4384b5e015bd1b697"
    assert nh_key[5088:5120].hex() == "d656b005ec5cc168cc6a000911817635597886e73b30cd0ec180cc59a90d0d49"
    # The library's schedule: the same 5120 key bytes and the two BLAKE3 keys.
    sched = nhfast.key_schedule(KAT_KEY)
    assert bytes(sched.unit_key) == k_unit and bytes(sched.top_key) == k_top
    assert sched.nh_key == nh_key


def test_nh_leaf_tag_known_answers() -> None:
    _, _, words = nh_key_schedule(KAT_KEY)
    assert nh_leaf_tags(pattern(4096), words)[0].hex() == "77683a70e669eda286a6ebd26adf3fe807f4b959f4c7fa44"
    assert nh_leaf_tags(b"", words)[0].hex() == "d6a871b4f5b9d55f79d760d54630eeab2f545bb5b0dfffd2"
    # Padding: a short chunk's tag is that of the chunk with zeros appended (n is bound in D).
    assert nh_leaf_tags(b"abc", words) == nh_leaf_tags(b"abc" + bytes(4093), words)


@pytest.mark.parametrize(("name", "data", "digest", "units"), NH_KATS, ids=[k[0] for k in NH_KATS])
def test_nh_known_answers(name: str, data: bytes, digest: str, units: list[str]) -> None:
    d, u = nh_fast_v1(data, KAT_KEY)
    assert (d.hex(), [x.hex() for x in u]) == (digest, units)
    # The library's reference and host path give the same digest and unit digests.
    assert nhfast.hash_units(data, KAT_KEY) == (d, b"".join(u))
    if len(data) <= 4097:
        assert nhfast.reference_hash(data, KAT_KEY) == (d, b"".join(u))


def test_nh_keys_from_token_known_answers() -> None:
    k_worker = nh_worker_key(TOKEN.encode())
    assert k_worker.hex() == "254baa21cdac400f500bd872fa2ab707d977f84cbbf84a7c2ecb7f2ce83636bd"
    k = nh_shard_key(k_worker, SHARD_A)
    assert k.hex() == "8054cf4f7e705576f3a00d520ef0e103999ba3025b83ef2876b557b35995e66b"
    assert (
        nh_fast_v1(pattern(4097), k)[0].hex()
        == "7d0e599795e404949c3bb30a98a6cd493a2ab920a24358dbf13a652cef525839"
    )
    assert (
        nh_fast_v1(bytes(4097), k)[0].hex()
        == "e740d288d242e45c52057693babbf939a088b6f7a67a17a16d6e7bb3e4b09928"
    )
    assert nhfast.manager_key(TOKEN.encode()) == k_worker
    assert nhfast.hash_units(bytes(4097), k)[0] == nh_fast_v1(bytes(4097), k)[0]
    assert nhfast.shard_key(k_worker, SHARD_A) == k


# Shard ids as the spec allows them: any non-empty UTF-8 text (non-ASCII, NUL, long ones too).
_shard_ids = st.text(min_size=1, max_size=300)
_tokens = st.binary(min_size=16, max_size=200)


@FAST
@given(token=_tokens, shard_id=_shard_ids)
def test_nh_key_derivation_matches(token: bytes, shard_id: str) -> None:
    k_worker = nh_worker_key(token)
    assert nhfast.manager_key(token) == k_worker
    assert nhfast.shard_key(k_worker, shard_id) == nh_shard_key(k_worker, shard_id)


def test_nh_empty_shard_id_is_refused() -> None:
    # The doc says the id is the seal record's shard_id, which is never empty; the library refuses it.
    with pytest.raises(InvalidInput):
        nhfast.shard_key(bytes(32), "")


# Lengths at every boundary the format has: 0, a leaf +-1, a unit +-1, two units +-1.
_EDGES = [0, 1, 3, 4, 4095, 4096, 4097, 8191, 8192, MIB - 1, MIB, MIB + 1, 2 * MIB - 1, 2 * MIB, 2 * MIB + 1]
# Near a boundary: hypothesis alone mostly draws small lengths, which would leave units untested.
_lengths = st.builds(
    lambda base, delta: max(0, base + delta),
    st.sampled_from([0, 4096, MIB, 2 * MIB]),
    st.integers(-4100, 4100),
)


def _check_library(n: int, seed: int, key: bytes) -> None:
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    d, units = nh_fast_v1(data, key)
    assert nhfast.hash_units(data, key) == (d, b"".join(units))
    assert nhfast.reduce_units(units, n, key) == d
    assert tree.hash_units(data, tree.NH_FAST_V1, key=key).digest == d


@pytest.mark.parametrize("n", _EDGES)
def test_nh_library_matches_independent_at_edges(n: int) -> None:
    _check_library(n, n, hashlib.sha256(le(n, 8)).digest())


@FAST
@given(n=_lengths, seed=st.integers(0, 2**32 - 1), key=st.binary(min_size=32, max_size=32))
def test_nh_library_matches_independent(n: int, seed: int, key: bytes) -> None:
    _check_library(n, seed, key)


@FAST
@given(
    n=st.sampled_from([1, 4095, 4096, 4097, MIB, MIB + 1]), pos=st.integers(0, 2**31), bit=st.integers(0, 7)
)
def test_nh_host_backend_matches_independent(n: int, pos: int, bit: int) -> None:
    """The host backend's keyed digest of device-held bytes, with one bit flipped somewhere."""
    data = bytearray(pattern(n))
    data[pos % n] ^= 1 << bit
    key = hashlib.sha256(bytes(data[:64])).digest()
    backend = HostBackend(capacity_bytes=2 * MIB)
    buf = backend.allocate(n)
    try:
        buf.write(0, bytes(data))
        d, units = nh_fast_v1(bytes(data), key)
        res = backend.hash(buf, tree.NH_FAST_V1, key=key)
        assert (res.digest, res.unit_digests) == (d, b"".join(units))
        cut = pos % (n + 1)
        assert backend.digest(buf, tree.NH_FAST_V1, cut, key=key) == nh_fast_v1(bytes(data[:cut]), key)[0]
    finally:
        buf.close()
        backend.close()


def _cli_digest(path: Path, token_file: Path, shard_id: str) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vram_residency.cli.main",
            "digest",
            "-a",
            "nh-fast-v1",
            "--token-file",
            str(token_file),
            "--shard-id",
            shard_id,
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    hex_digest, algorithm, name = out.split()
    assert (algorithm, name) == ("nh-fast-v1", str(path))
    return hex_digest


def test_nh_cli_digest_matches_independent(tmp_path: Path) -> None:
    """``vram-residency digest -a nh-fast-v1``: the doc's token/shard known answer, and a file of
    two units and a byte under a non-ASCII shard id."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # a token file's trailing newline is not part of the token
    token_file.chmod(0o600)
    kat = tmp_path / "p4097"
    kat.write_bytes(pattern(4097))
    assert (
        _cli_digest(kat, token_file, SHARD_A)
        == "7d0e599795e404949c3bb30a98a6cd493a2ab920a24358dbf13a652cef525839"
    )
    big = tmp_path / "big"
    data = os.urandom(2 * MIB + 1)
    big.write_bytes(data)
    sid = "shard-é\u00ff-2"
    want = nh_fast_v1(data, nh_shard_key(nh_worker_key(TOKEN.encode()), sid))[0].hex()
    assert _cli_digest(big, token_file, sid) == want


# ------------------------------------------------------- tp-record-v1, from the text alone


def field(name: str, value: bytes) -> bytes:
    """``F(name, value) = LE16(len(name)) || name || LE32(len(value)) || value``."""
    raw = name.encode("ascii")
    return le(len(raw), 2) + raw + le(len(value), 4) + value


def seal_record(key: bytes, fields: dict[str, Any]) -> dict[str, Any]:
    """A ``seal-v1`` JSON record (the keys documented in tp-record-v1.md) with its tag."""
    msg = b"llorch-vram-seal-v1" + b"".join(
        [
            field("shard_id", fields["shard_id"].encode()),
            field("gpu_device", le(fields["gpu_device"], 4)),
            field("vram_bytes", le(fields["vram_bytes"], 8)),
            field("digest_algorithm", fields["digest_algorithm"].encode()),
            field("digest", bytes.fromhex(fields["digest"])),
            field("sealed_at_ns", le(fields["sealed_at_ns"], 8)),
            field("worker_id", fields["worker_id"].encode()),
            field("model_ref", b"" if fields["model_ref"] is None else fields["model_ref"].encode()),
            field("shard_index", b"" if fields["shard_index"] is None else le(fields["shard_index"], 8)),
            field("total_shards", b"" if fields["total_shards"] is None else le(fields["total_shards"], 8)),
        ]
    )
    tag = hmac.new(key, msg, hashlib.sha256).hexdigest()
    return {"format": "seal-v1", **fields, "signature": tag}


def tp_message_ref(model_name: str, parts: list[tuple[int, str, list[bytes]]]) -> bytes:
    """The message; ``parts[r] = (device, worker_id, [seal tags])`` in rank order."""
    out = (
        b"llorch-vram-tp-record-v1"
        + field("model_name", model_name.encode())
        + field("world_size", le(len(parts), 4))
    )
    for rank, (device, worker_id, tags) in enumerate(parts):
        out += (
            field("rank", le(rank, 4))
            + field("device", le(device, 4))
            + field("worker_id", worker_id.encode())
        )
        out += field("shards", le(len(tags), 4)) + b"".join(field("seal", t) for t in tags)
    return out


def tp_record_ref(
    token: bytes, model_name: str, parts: list[tuple[int, str, list[dict[str, Any]]]]
) -> dict[str, Any]:
    msg = tp_message_ref(
        model_name, [(d, w, [bytes.fromhex(s["signature"]) for s in seals]) for d, w, seals in parts]
    )
    tag = hmac.new(hkdf_sha256(token, b"llorch-vram-tp-record-v1"), msg, hashlib.sha256).hexdigest()
    return {
        "format": "tp-record-v1",
        "model_name": model_name,
        "world_size": len(parts),
        "parts": [
            {"rank": r, "device": d, "worker_id": w, "seals": seals} for r, (d, w, seals) in enumerate(parts)
        ],
        "signature": tag,
    }


SEAL_KEY = hkdf_sha256(TOKEN.encode(), b"llorch-vram-seal-v1")
SEAL_A = seal_record(SEAL_KEY, KA_FIELDS)
SEAL_B = seal_record(SEAL_KEY, {**KA_FIELDS, "shard_id": SHARD_B, "gpu_device": 1, "shard_index": 1})
MSG_292_HEX = (
    "6c6c6f7263682d7672616d2d74702d7265636f72642d76310a006d6f64656c5f6e616d650a0000006c6c616d612d332d38620a00776f"
    "726c645f73697a650400000002000000040072616e6b0400000000000000060064657669636504000000000000000900776f726b6572"
    "5f696408000000776f726b65722d610600736861726473040000000100000004007365616c20000000511ade73fd72447321eceac8b8"
    "6ed28dd2a976dfbb68a0dafb7e43f29236fac2040072616e6b0400000001000000060064657669636504000000010000000900776f72"
    "6b65725f696408000000776f726b65722d610600736861726473040000000100000004007365616c20000000ca33419ea273080260ac"
    "740e8e2f7109bc5a61d6ac1640de39a43fb50e9bb232"
)


def _rank_part(rank: int, device: int, worker_id: str, seals: list[dict[str, Any]]) -> RankPart:
    return RankPart(rank, device, worker_id, tuple(check_seal_record(s, TOKEN) for s in seals))


def test_tp_known_answers() -> None:
    assert SEAL_A["signature"] == "511ade73fd72447321eceac8b86ed28dd2a976dfbb68a0dafb7e43f29236fac2"
    assert SEAL_B["signature"] == "ca33419ea273080260ac740e8e2f7109bc5a61d6ac1640de39a43fb50e9bb232"
    k_tp = hkdf_sha256(TOKEN.encode(), b"llorch-vram-tp-record-v1")
    assert k_tp.hex() == "09051100f628dba89af29cb3e418f777565f8426448f6e003d9caa8c4bc0d556"
    tags = [bytes.fromhex(SEAL_A["signature"]), bytes.fromhex(SEAL_B["signature"])]
    two = tp_message_ref("llama-3-8b", [(0, "worker-a", tags[:1]), (1, "worker-a", tags[1:])])
    assert (len(two), two.hex()) == (292, MSG_292_HEX)
    assert (
        hashlib.sha256(two).hexdigest() == "b5db7b081ec1e623304be5ad2071e516e16f75d41869042adf7cc3da1a00420c"
    )
    assert (
        hmac.new(k_tp, two, hashlib.sha256).hexdigest()
        == "fb9fc203a7bee8aa13c352b2ef9da58799b69219742d29fcbc0ea601bc461b8c"
    )
    one = tp_message_ref("llama-3-8b", [(0, "worker-a", tags)])
    assert len(one) == 223
    assert (
        hashlib.sha256(one).hexdigest() == "cce8292f6452517fd46ec2bb78fbf68e9f01844cedd42dbfdd9bc91c1d903631"
    )
    assert (
        hmac.new(k_tp, one, hashlib.sha256).hexdigest()
        == "d9ffb5a0b31e7f3b01f3a4c7801801a1a2885a55575549ecafd47d812a1498be"
    )
    # The library: the same message bytes, and the independently built record checks.
    parts = [_rank_part(0, 0, "worker-a", [SEAL_A]), _rank_part(1, 1, "worker-a", [SEAL_B])]
    assert tp_message("llama-3-8b", parts) == two
    assert tp_key(TOKEN).tag(two).hex() == "fb9fc203a7bee8aa13c352b2ef9da58799b69219742d29fcbc0ea601bc461b8c"
    assert tp_message("llama-3-8b", [_rank_part(0, 0, "worker-a", [SEAL_A, SEAL_B])]) == one
    record = tp_record_ref(
        TOKEN.encode(), "llama-3-8b", [(0, "worker-a", [SEAL_A]), (1, "worker-a", [SEAL_B])]
    )
    assert record["signature"] == "fb9fc203a7bee8aa13c352b2ef9da58799b69219742d29fcbc0ea601bc461b8c"
    checked = check_tp_record(json.loads(json.dumps(record)), TOKEN)
    assert checked.record() == record


_names = st.text(alphabet="abcXYZ019-_.@:/ éü中", min_size=1, max_size=40)


@FAST
@given(
    model_name=_names,
    worker_id=st.one_of(st.just(""), _names),
    shape=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 3)), min_size=1, max_size=4),
    seed=st.binary(min_size=8, max_size=8),
)
def test_tp_library_matches_independent(
    model_name: str, worker_id: str, shape: list[tuple[int, int]], seed: bytes
) -> None:
    """Any group shape: the library's message is ours, it accepts our record and rebuilds it, and a
    record with two ranks' parts swapped (each still consistent with its seals) fails the tag."""
    total = sum(n for _, n in shape)
    parts: list[tuple[int, str, list[dict[str, Any]]]] = []
    index = 0
    for device, n in shape:
        seals = []
        for _ in range(n):
            digest = hashlib.sha256(seed + le(index, 4)).hexdigest()
            seals.append(
                seal_record(
                    SEAL_KEY,
                    {
                        **KA_FIELDS,
                        "shard_id": f"shard-{digest[:32]}",
                        "gpu_device": device,
                        "worker_id": worker_id,
                        "vram_bytes": index,
                        "digest": digest,
                        "shard_index": index,
                        "total_shards": total,
                    },
                )
            )
            index += 1
        parts.append((device, worker_id, seals))
    record = tp_record_ref(TOKEN.encode(), model_name, parts)
    lib_parts = [_rank_part(r, d, w, s) for r, (d, w, s) in enumerate(parts)]
    assert tp_message(model_name, lib_parts) == tp_message_ref(
        model_name, [(d, w, [bytes.fromhex(x["signature"]) for x in s]) for d, w, s in parts]
    )
    assert check_tp_record(json.loads(json.dumps(record)), TOKEN).record() == record
    if len(parts) >= 2 and parts[0] != parts[1]:
        swapped = json.loads(json.dumps(record))
        swapped["parts"][0]["seals"], swapped["parts"][1]["seals"] = (
            record["parts"][1]["seals"],
            record["parts"][0]["seals"],
        )
        swapped["parts"][0]["device"], swapped["parts"][1]["device"] = parts[1][0], parts[0][0]
        with pytest.raises(SealVerificationFailed):
            check_tp_record(swapped, TOKEN)


def test_tp_record_shape_rules() -> None:
    """What the doc's "Checking a record" says a checker refuses, and what it ignores."""
    token = TOKEN.encode()
    good = tp_record_ref(token, "llama-3-8b", [(0, "worker-a", [SEAL_A]), (1, "worker-a", [SEAL_B])])
    with pytest.raises(InvalidInput):
        check_tp_record(tp_record_ref(token, "m", [(0, "worker-a", [])]), TOKEN)  # n_r >= 1
    for key, value in [
        ("world_size", True),
        ("world_size", 0),
        ("model_name", ""),
        ("format", "tp-record-v2"),
        ("signature", good["signature"].upper()),
    ]:
        with pytest.raises(InvalidInput):
            check_tp_record({**good, key: value}, TOKEN)
    # A seal record is an object ("SEAL-RECORD ... an object"): not its JSON text, even with a
    # valid tag.
    for seal in (json.dumps(SEAL_A), json.dumps(SEAL_A).encode()):
        as_text = copy.deepcopy(good)
        as_text["parts"][0]["seals"] = [seal]
        with pytest.raises(InvalidInput):
            check_tp_record(as_text, TOKEN)
    # Other keys are not in the message: ignored, and not covered by the tag.
    check_tp_record({**good, "note": "anything"}, TOKEN)
    # model_name is the record's own label: not compared with the seals' model_ref.
    check_tp_record(
        tp_record_ref(token, "another name", [(0, "worker-a", [SEAL_A]), (1, "worker-a", [SEAL_B])]), TOKEN
    )
