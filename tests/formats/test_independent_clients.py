"""The fixed specs checked the way an independent client would check them.

Each ``ref_*`` function below was written from the spec text alone (``/work/shared/specs`` and
``docs/specs``), with nothing but ``hashlib``, ``hmac``, ``struct`` and, where a spec names
BLAKE3, the standard ``blake3`` package; nothing on the reference side imports vram_residency.
The tests then check (1) every known answer printed in a spec against the reference and against
the library's public API, (2) hypothesis properties that the reference and the library agree,
edge sizes included, and (3) that the library refuses what a spec says must be refused, with a
typed error from ``vram_residency.errors`` and constant-time tag comparison.

Where the library is stricter than a spec (a policy of this project, not a spec rule), the
property strategies stay inside the library's domain and the test says so.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import struct
import time
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import blake3
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

# ================================================================================================
# The reference side: spec text only.
# ================================================================================================

TOKEN = "example-worker-token-0123456789"
LEAF = 4096
UNIT = 1 << 20


def P(n: int) -> bytes:
    """``P(n)``: the ``n`` bytes ``(i * 31 + 7) mod 256`` (sha256-tree-v1, "Known answers")."""
    return bytes((i * 31 + 7) % 256 for i in range(n))


def sha256(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def ref_hkdf(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 by hand: salt none = HashLen (32) zero bytes, extract then expand."""
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    okm, t, i = b"", b"", 1
    while len(okm) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        okm += t
        i += 1
    return okm[:length]


def ref_hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def F(name: str, value: bytes) -> bytes:
    """``LE16(len(name)) || name || LE32(len(value)) || value`` (seal-v1 "Message")."""
    raw = name.encode("ascii")
    return struct.pack("<H", len(raw)) + raw + struct.pack("<I", len(value)) + value


# -- sha256-tree-v1 -------------------------------------------------------------------------------


def ref_leaves(m: bytes) -> list[bytes]:
    k = max(1, -(-len(m) // LEAF))
    return [sha256(m[i * LEAF : (i + 1) * LEAF] + b"\x00") for i in range(k)]


def ref_parent(left: bytes, right: bytes) -> bytes:
    return sha256(left + right + b"\x01")


def ref_root_levels(nodes: list[bytes]) -> bytes:
    """Step 4 literally: pair neighbours from the left, an unpaired last node moves up."""
    while len(nodes) > 1:
        nxt = [ref_parent(nodes[i], nodes[i + 1]) for i in range(0, len(nodes) - 1, 2)]
        if len(nodes) % 2:
            nxt.append(nodes[-1])
        nodes = nxt
    return nodes[0]


def ref_root_rfc6962(nodes: list[bytes]) -> bytes:
    """The spec's parenthesis: RFC 6962's split at the largest power of two below k."""
    if len(nodes) == 1:
        return nodes[0]
    p = 1 << ((len(nodes) - 1).bit_length() - 1)
    return ref_parent(ref_root_rfc6962(nodes[:p]), ref_root_rfc6962(nodes[p:]))


def ref_tree_final(root: bytes, n: int) -> bytes:
    return sha256(root + struct.pack("<Q", n) + b"sha256-tree-v1" + b"\x02")


def ref_tree(m: bytes) -> bytes:
    return ref_tree_final(ref_root_levels(ref_leaves(m)), len(m))


@cache
def _all_full(p: int) -> bytes:
    """Root of ``p`` (a power of two) leaves that are all the full leaf of ``P``."""
    if p == 1:
        return sha256(P(LEAF) + b"\x00")
    h = _all_full(p // 2)
    return ref_parent(h, h)


def ref_tree_of_P(n: int) -> bytes:
    """sha256-tree-v1 of ``P(n)`` for any ``n`` without materialising it. ``P`` has period 256,
    which divides 4096, so every chunk but the last is ``P(4096)`` and the last is ``P(rest)``;
    the RFC 6962 split then needs only the roots of all-full power-of-two subtrees."""
    k = max(1, -(-n // LEAF))
    last = sha256(P(n - (k - 1) * LEAF) + b"\x00")

    def root(k: int) -> bytes:  # k leaves: k-1 full ones, then `last`
        if k == 1:
            return last
        p = 1 << ((k - 1).bit_length() - 1)
        return ref_parent(_all_full(p), root(k - p))

    return ref_tree_final(root(k), n)


# -- seal-v1 --------------------------------------------------------------------------------------


def ref_seal_key(token: str | bytes) -> bytes:
    ikm = token.encode("utf-8") if isinstance(token, str) else token
    return ref_hkdf(ikm, b"llorch-vram-seal-v1")


def ref_seal_message(
    shard_id: str,
    gpu_device: int,
    vram_bytes: int,
    digest_algorithm: str,
    digest: bytes,
    sealed_at_ns: int,
    worker_id: str,
    model_ref: str | None,
    shard_index: int | None,
    total_shards: int | None,
) -> bytes:
    def opt64(v: int | None) -> bytes:
        return b"" if v is None else struct.pack("<Q", v)

    return (
        b"llorch-vram-seal-v1"
        + F("shard_id", shard_id.encode("utf-8"))
        + F("gpu_device", struct.pack("<I", gpu_device))
        + F("vram_bytes", struct.pack("<Q", vram_bytes))
        + F("digest_algorithm", digest_algorithm.encode("utf-8"))
        + F("digest", digest)
        + F("sealed_at_ns", struct.pack("<Q", sealed_at_ns))
        + F("worker_id", worker_id.encode("utf-8"))
        + F("model_ref", b"" if model_ref is None else model_ref.encode("utf-8"))
        + F("shard_index", opt64(shard_index))
        + F("total_shards", opt64(total_shards))
    )


# -- attest-v1 ------------------------------------------------------------------------------------


def ref_attest_key(token: str) -> bytes:
    return ref_hkdf(token.encode("utf-8"), b"llorch-vram-attest-v1")


def ref_probe_key(ka: bytes, nonce: bytes) -> bytes:
    return ref_hmac(ka, b"probe" + nonce)


def ref_probe(kp: bytes, data: bytes) -> bytes:
    return blake3.blake3(data, key=kp).digest()


RefShard = tuple[str, bytes, bytes, "bytes | None", int]  # shard_id, seal_sig, digest_now, probe, t


def ref_attest_message(
    nonce: bytes, worker_id: str, attested_at_ns: int, shards: list[RefShard], ok: bool
) -> bytes:
    out = (
        b"llorch-vram-attest-v1"
        + F("nonce", nonce)
        + F("worker_id", worker_id.encode("utf-8"))
        + F("attested_at_ns", struct.pack("<Q", attested_at_ns))
        + F("shard_count", struct.pack("<I", len(shards)))
    )
    for sid, sig, now, probe, t in shards:
        out += (
            F("shard_id", sid.encode("utf-8"))
            + F("seal_signature", sig)
            + F("digest_now", now)
            + F("probe", b"" if probe is None else probe)
            + F("verified_at_ns", struct.pack("<Q", t))
        )
    return out + F("verdict", b"\x01" if ok else b"\x00")


# -- nh-fast-v1 (docs/specs/nh-fast-v1.md) --------------------------------------------------------


def ref_nh_schedule(key: bytes) -> tuple[bytes, bytes, tuple[int, ...]]:
    x = blake3.blake3(b"nh-fast-v1 key schedule", key=key).digest(length=5184)
    return x[:32], x[32:64], struct.unpack("<1280I", x[64:])


def ref_nh_leaf(chunk: bytes, k: tuple[int, ...]) -> bytes:
    m = struct.unpack("<1024I", chunk + bytes(LEAF - len(chunk)))
    out = b""
    for t in range(3):
        o = 128 * t
        h = 0
        for p in range(512):
            h += ((m[2 * p] + k[2 * p + o]) & 0xFFFFFFFF) * ((m[2 * p + 1] + k[2 * p + 1 + o]) & 0xFFFFFFFF)
        out += struct.pack("<Q", h % (1 << 64))
    return out


def ref_nh_fast(key: bytes, m: bytes) -> tuple[bytes, list[bytes]]:
    k_unit, k_top, k = ref_nh_schedule(key)
    n = len(m)
    c = max(1, -(-n // LEAF))
    tags = [ref_nh_leaf(m[i * LEAF : (i + 1) * LEAF], k) for i in range(c)]
    u = max(1, -(-n // UNIT))
    units = [blake3.blake3(b"".join(tags[256 * j : 256 * j + 256]), key=k_unit).digest() for j in range(u)]
    return blake3.blake3(b"".join(units) + struct.pack("<Q", n), key=k_top).digest(), units


def ref_nh_shard_key(token: str, shard_id: str) -> bytes:
    kw = ref_hkdf(token.encode("utf-8"), b"llorch-vram-nhfast-v1")
    raw = shard_id.encode("utf-8")
    return ref_hmac(kw, b"nh-fast-v1 shard" + struct.pack("<I", len(raw)) + raw)


# -- tp-record-v1 (docs/specs/tp-record-v1.md) ----------------------------------------------------

RefPart = tuple[int, str, list[bytes]]  # device, worker_id, seal tags (rank = position)


def ref_tp_message(model_name: str, parts: list[RefPart]) -> bytes:
    out = b"llorch-vram-tp-record-v1" + F("model_name", model_name.encode("utf-8"))
    out += F("world_size", struct.pack("<I", len(parts)))
    for r, (device, worker_id, tags) in enumerate(parts):
        out += F("rank", struct.pack("<I", r)) + F("device", struct.pack("<I", device))
        out += F("worker_id", worker_id.encode("utf-8")) + F("shards", struct.pack("<I", len(tags)))
        out += b"".join(F("seal", t) for t in tags)
    return out


# ================================================================================================
# The library side.
# ================================================================================================

from vram_residency.errors import ConfigError, InvalidInput, SealVerificationFailed, VramError  # noqa: E402
from vram_residency.formats import tree  # noqa: E402
from vram_residency.formats.seal import SealFields, seal_key, seal_message, seal_tag, verify_tag  # noqa: E402
from vram_residency.formats.stream import StreamHasher  # noqa: E402
from vram_residency.shard import check_seal_record  # noqa: E402

#: Sizes a tree implementation gets wrong first: empty, one byte, leaf and unit boundaries +/- 1.
EDGE_SIZES = sorted(
    {0, 1, 2, 31, 32, 33, 63, 64, 65}
    | {b + d for b in (LEAF, 2 * LEAF, 3 * LEAF, 4 * LEAF, 5 * LEAF) for d in (-1, 0, 1)}
    | {UNIT + d for d in (-LEAF, -1, 0, 1, LEAF)}
)


def _bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


sizes = st.sampled_from(EDGE_SIZES) | st.integers(0, 6 * LEAF + 17)


# ================================================================================================
# sha256-tree-v1
# ================================================================================================

TREE_KAT = [
    (b"", "37e2f51ed116754f5bccd9726e3adb0b4c84af27df70df0fe0684b022975db58"),
    (b"abc", "16889f98eeb0e2e16ee2e640cb6eea840349415a15a1c2a69d6766f0b0b3d896"),
    (P(4096), "2ef4a69a251c059b70d2e2b7aab99bf8bcb0a1822d208604dcc0b1dd501c2d23"),
    (P(4097), "5e1fd3dc2db57d1b502c092c8851726417dea5bda061ba6b8987bb7f885580b5"),
    (P(12288), "4ce8a6713e2cbf90adb1a8b539c84b1512c7450fe7895619e8bcdd5bb805803f"),
    (P(20481), "ffcdcd1f12bcb420959af918506ad32aebd2bea01e69c08e48065db574fa6833"),
    (P(1048576), "34bc5f0978eec0aeccac1445e6a9adda7494a3ee898ee4ee94ce128e91970c16"),
]
_tree_ids = [str(len(m)) for m, _ in TREE_KAT]


def _library_tree_paths(m: bytes, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, bytes]]:
    """Every public host path that yields a sha256-tree-v1 digest."""
    yield "digest", tree.digest(m)
    yield "hash_units/1", tree.hash_units(m, tree.SHA256_TREE_V1, threads=1).digest
    yield "hash_units/3", tree.hash_units(bytearray(m), tree.SHA256_TREE_V1, threads=3).digest
    yield "digest_only", tree.digest_only(memoryview(m), tree.SHA256_TREE_V1)
    s = StreamHasher()
    for off in range(0, len(m), 5000):  # pieces that straddle leaves and units
        s.update(m[off : off + 5000])
    yield "stream", s.finalize().digest
    from vram_residency.formats import _native

    with monkeypatch.context() as mp:  # the pure-Python path (when the native library is absent)
        mp.setattr(_native, "available", lambda: False)
        yield "python", tree.hash_units(m, tree.SHA256_TREE_V1, threads=1).digest


@pytest.mark.parametrize(("m", "expected"), TREE_KAT, ids=_tree_ids)
def test_tree_known_answers_reference(m: bytes, expected: str) -> None:
    assert ref_tree(m).hex() == expected
    assert ref_tree_final(ref_root_rfc6962(ref_leaves(m)), len(m)).hex() == expected
    assert ref_tree_of_P(len(m)).hex() == expected or m in (b"", b"abc")


@pytest.mark.parametrize(("m", "expected"), TREE_KAT, ids=_tree_ids)
def test_tree_known_answers_library(m: bytes, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for path, d in _library_tree_paths(m, monkeypatch):
        assert d.hex() == expected, path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=sizes, seed=st.integers(0, 2**32))
@example(n=0, seed=0)
def test_tree_property_library_equals_reference(n: int, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _bytes(n, seed)
    want = ref_tree(m)
    for path, d in _library_tree_paths(m, monkeypatch):
        assert d == want, path


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 600), seed=st.integers(0, 2**32))
def test_tree_level_pairing_is_rfc6962_split(k: int, seed: int) -> None:
    """The spec's claim in step 4, checked: both tree shapes give the same root for any k."""
    rng = random.Random(seed)
    nodes = [rng.randbytes(32) for _ in range(k)]
    assert ref_root_levels(list(nodes)) == ref_root_rfc6962(nodes)


def test_tree_unit_digests_are_aligned_subtree_roots() -> None:
    """The library's unit digests (kept at seal time for localisation) are the roots of aligned
    256-leaf subtrees of the spec's tree: checked on 2 MiB + 4097 bytes (three units)."""
    m = _bytes(2 * UNIT + LEAF + 1, 7)
    res = tree.hash_units(m, tree.SHA256_TREE_V1)
    leaves = ref_leaves(m)
    assert [res.unit(j) for j in range(3)] == [
        ref_root_levels(leaves[256 * j : 256 * j + 256]) for j in range(3)
    ]
    assert res.digest == ref_tree(m)


@pytest.mark.parametrize(
    "n",
    [
        3 * UNIT + 5,
        (1 << 36) + 12345,  # 65,537 units: a 64 GiB shard, by its unit digests
        (1 << 36) - 1,
        (1 << 36),
        (5 << 30) + LEAF - 1,
    ],
)
def test_tree_large_unit_counts_by_unit_digests(n: int) -> None:
    """Large shards without their bytes: every full unit of ``P`` is the same, so the library's
    ``reduce_sha256_tree`` gets the unit digests, and the reference its periodic tree."""
    u = max(1, -(-n // UNIT))
    full = tree.hash_units(P(UNIT), tree.SHA256_TREE_V1).unit(0)
    last = tree.hash_units(P(n - (u - 1) * UNIT), tree.SHA256_TREE_V1).unit(0)
    assert tree.reduce_sha256_tree([full] * (u - 1) + [last], n) == ref_tree_of_P(n)


@pytest.mark.parametrize(
    "units",
    [
        [b"\x00" * 31, b"\x00" * 33],  # right count and total, wrong sizes
        [b"\x00" * 32, b"\x00"],
        b"\x00" * 33,  # packed: 2 "units", the second one byte
        b"\x00" * 63,
        [b"\x00" * 32],  # one unit for a two-unit message
    ],
    ids=["31+33", "32+1", "packed33", "packed63", "one-unit"],
)
def test_tree_reduce_refuses_malformed_unit_digests(units: list[bytes] | bytes) -> None:
    with pytest.raises(InvalidInput):
        tree.reduce_sha256_tree(units, UNIT + 1)


@pytest.mark.parametrize("alg", ["sha256-tree-v2", "SHA256-TREE-V1", "sha256", "", "blake3 "])
def test_tree_unknown_algorithm_refused(alg: str) -> None:
    with pytest.raises(InvalidInput):
        tree.digest(b"abc", alg)


def test_blake3_is_standard() -> None:
    for n in (0, 1, 1023, 1024, 1025, UNIT + 1):
        m = _bytes(n, n)
        assert tree.digest(m, tree.BLAKE3) == blake3.blake3(m).digest()


# ================================================================================================
# seal-v1
# ================================================================================================

SEAL_K = "31b83883f044ed633900ca9da7d42fd1fa22af86a56680a4f9f42f73908a18a7"
SEAL_TAG_FULL = "511ade73fd72447321eceac8b86ed28dd2a976dfbb68a0dafb7e43f29236fac2"
SEAL_TAG_ABSENT = "cdcac52608ca1258b1c9987a02f6c95b18749db5ec4e02c51c05a0fb028b4a20"
SHARD_A = "shard-00112233445566778899aabbccddeeff"


def _seal_args(full: bool = True) -> dict[str, Any]:
    return dict(
        shard_id=SHARD_A,
        gpu_device=0,
        vram_bytes=4097,
        digest_algorithm="sha256-tree-v1",
        digest=ref_tree(P(4097)),
        sealed_at_ns=1764331200000000000,
        worker_id="worker-a" if full else "",
        model_ref="llama-3-8b@sha256:abc" if full else None,
        shard_index=0 if full else None,
        total_shards=2 if full else None,
    )


def _lib_fields(a: dict[str, Any]) -> SealFields:
    return SealFields(**{**a, "digest": a["digest"].hex()})


def test_seal_key_known_answer() -> None:
    assert ref_seal_key(TOKEN).hex() == SEAL_K
    # The hand-made HKDF agrees with pyca/cryptography's, and with the library's key.
    hk = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"llorch-vram-seal-v1")
    assert hk.derive(TOKEN.encode()).hex() == SEAL_K
    assert seal_key(TOKEN)._expose_for_tests().hex() == SEAL_K
    assert seal_key(TOKEN.encode("utf-8"))._expose_for_tests().hex() == SEAL_K


@pytest.mark.parametrize(("full", "expected"), [(True, SEAL_TAG_FULL), (False, SEAL_TAG_ABSENT)])
def test_seal_known_answers(full: bool, expected: str) -> None:
    a = _seal_args(full)
    msg = ref_seal_message(**a)
    assert ref_hmac(ref_seal_key(TOKEN), msg).hex() == expected
    f = _lib_fields(a)
    assert seal_message(f) == msg
    assert seal_tag(seal_key(TOKEN), f).hex() == expected
    assert verify_tag(seal_key(TOKEN), f, bytes.fromhex(expected))
    # The JSON record an independent client would write checks with the library.
    rec = {"format": "seal-v1", **a, "digest": a["digest"].hex(), "signature": expected}
    assert check_seal_record(json.dumps(rec), TOKEN).shard_id == SHARD_A


_utf8_text = st.text(st.characters(codec="utf-8"), max_size=24)
_u64 = st.integers(0, (1 << 64) - 1) | st.sampled_from([0, 1, (1 << 32) - 1, 1 << 32, (1 << 64) - 1])
_u32 = st.integers(0, (1 << 32) - 1) | st.sampled_from([0, (1 << 32) - 1])


@st.composite
def seal_args(draw: st.DrawFn) -> dict[str, Any]:
    # Inside the library's domain: shard_id non-empty, and shard_index / total_shards given together
    # with index < total (project policy beyond the spec; see the report).
    idx: int | None = None
    total: int | None = None
    if draw(st.booleans()):
        total = draw(st.integers(1, (1 << 64) - 1))
        idx = draw(st.integers(0, total - 1))
    return dict(
        shard_id=draw(_utf8_text.filter(bool)),
        gpu_device=draw(_u32),
        vram_bytes=draw(_u64),
        digest_algorithm=draw(st.sampled_from(["sha256-tree-v1", "blake3", "nh-fast-v1"])),
        digest=draw(st.binary(min_size=32, max_size=32)),
        sealed_at_ns=draw(_u64),
        worker_id=draw(_utf8_text),
        model_ref=draw(st.none() | _utf8_text.filter(bool)),
        shard_index=idx,
        total_shards=total,
    )


@settings(max_examples=150, deadline=None)
@given(a=seal_args(), token=st.binary(min_size=16, max_size=80))
def test_seal_property_library_equals_reference(a: dict[str, Any], token: bytes) -> None:
    msg = ref_seal_message(**a)
    tag = ref_hmac(ref_seal_key(token), msg)
    f = _lib_fields(a)
    key = seal_key(token)
    assert seal_message(f) == msg
    assert seal_tag(key, f) == tag
    assert verify_tag(key, f, tag)
    # Every single-bit change of the tag fails.
    bit = int.from_bytes(hashlib.sha256(msg).digest()[:2], "little") % 256
    bad = bytearray(tag)
    bad[bit // 8] ^= 1 << (bit % 8)
    assert not verify_tag(key, f, bytes(bad))
    rec = {"format": "seal-v1", **a, "digest": a["digest"].hex(), "signature": tag.hex()}
    assert check_seal_record(json.dumps(rec), token).record()["signature"] == tag.hex()


@pytest.mark.parametrize("n", [0, 1, 31, 33, 64])
def test_seal_tag_of_wrong_length_fails(n: int) -> None:
    f = _lib_fields(_seal_args())
    tag = bytes.fromhex(SEAL_TAG_FULL)
    cand = (tag + tag)[:n]
    assert not verify_tag(seal_key(TOKEN), f, cand)


@pytest.mark.parametrize(
    "change",
    [
        {"gpu_device": 1 << 32},
        {"gpu_device": -1},
        {"gpu_device": True},
        {"vram_bytes": 1 << 64},
        {"vram_bytes": 4097.0},
        {"sealed_at_ns": -1},
        {"digest": "AB" * 32},  # upper-case hex: not the canonical spelling
        {"digest": "ab" * 31},
        {"digest": "ab" * 33},
        {"digest": " " + "ab" * 32},
        {"digest_algorithm": "sha256-tree-v2"},
        {"model_ref": ""},  # the spec: an empty model_ref is rejected as invalid input
        {"shard_id": "\ud800"},  # no UTF-8 encoding
        {"worker_id": "a\udfffb"},
        {"model_ref": "\ud83d"},
        {"shard_index": 1 << 64, "total_shards": 1},
        {"total_shards": -1, "shard_index": 0},
    ],
)
def test_seal_fields_out_of_spec_refused(change: dict[str, Any]) -> None:
    a = {**_seal_args(), "digest": ref_tree(P(4097)).hex(), **change}
    with pytest.raises(InvalidInput):
        seal_message(SealFields(**a))
    assert not verify_tag(seal_key(TOKEN), SealFields(**a), bytes.fromhex(SEAL_TAG_FULL))


def _record_text(**change: Any) -> str:
    a = _seal_args()
    rec: dict[str, Any] = {"format": "seal-v1", **a, "digest": a["digest"].hex(), "signature": SEAL_TAG_FULL}
    rec.update(change)
    return json.dumps(rec)


@pytest.mark.parametrize(
    "text",
    [
        _record_text(format="seal-v2"),
        _record_text(format="SEAL-V1"),
        _record_text(signature=SEAL_TAG_FULL.upper()),
        _record_text(signature=SEAL_TAG_FULL[:62]),
        _record_text(signature=SEAL_TAG_FULL + "00"),
        _record_text(signature=None),
        _record_text(vram_bytes="4097"),
        _record_text() + " {}",  # trailing data after the object
        _record_text() + "x",
        _record_text()[:-1] + ', "shard_id": "shard-x"}',  # a duplicate key
        "[" + _record_text() + "]",
        "",
    ],
)
def test_seal_record_out_of_spec_refused(text: str) -> None:
    with pytest.raises(InvalidInput):
        check_seal_record(text, TOKEN)


def test_seal_record_edit_fails_verification() -> None:
    assert check_seal_record(_record_text(), TOKEN)
    with pytest.raises(SealVerificationFailed):
        check_seal_record(_record_text(vram_bytes=4098), TOKEN)
    with pytest.raises(SealVerificationFailed):
        check_seal_record(_record_text(), TOKEN + "x")


@pytest.mark.parametrize("token", ["", "short", b"\x00" * 15, "\ud800" * 20])
def test_unusable_tokens_refused(token: str | bytes) -> None:
    with pytest.raises(ConfigError):
        seal_key(token)


def _spy_compare_digest(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """Record the calls of the real ``hmac.compare_digest`` (its result is unchanged)."""
    calls: list[tuple[bytes, bytes]] = []
    real: Callable[[bytes, bytes], bool] = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return calls


def test_seal_tags_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_compare_digest(monkeypatch)
    f = _lib_fields(_seal_args())
    wrong = b"\x00" * 32
    assert not verify_tag(seal_key(TOKEN), f, wrong)
    assert (bytes.fromhex(SEAL_TAG_FULL), wrong) in calls or (wrong, bytes.fromhex(SEAL_TAG_FULL)) in calls


def test_error_types_are_the_librarys() -> None:
    assert issubclass(InvalidInput, VramError) and issubclass(SealVerificationFailed, VramError)
    assert issubclass(ConfigError, VramError)


# ================================================================================================
# attest-v1
# ================================================================================================

from vram_residency.attest import AttestationRefused, NonceStore, check_attestation  # noqa: E402
from vram_residency.formats.attest import (  # noqa: E402
    AttestedShard,
    Statement,
    attest_key,
    attest_message,
    attest_tag,
    probe_key,
    statement_from_json,
    verify_statement_tag,
)

NONCE = bytes(range(32))
KA_HEX = "91cf9fc1292edf3e7a0c48bf754865a6799091362c4b6a2253ed184f038892c3"
KP_HEX = "1bb8c0715c74375fc1684e7b89baff04b32ca6995967c83074593ec35b76f923"
PROBE_HEX = "9d0f3e484d9110cb761916595fb6d1d0c76aa3234617a44293e60e24802baa85"
ATTEST_TAGS = [
    (False, True, "adf3449b899ac5ea22fcf1d2f58df350f7503a454357ea74406882f44452cffa"),
    (True, True, "d52224af1d780afa441d1775e9d1545c0a71078a4de9480dcbbaf58946111ff4"),
    (True, False, "2f8ae8f4429863bb6c4413f753c1b748d9ebe18238596ec4ca6dbd6e6ff41de4"),
]


def ref_attest_json(
    nonce: bytes, worker_id: str, attested_at_ns: int, shards: list[RefShard], ok: bool, ka: bytes
) -> dict[str, Any]:
    """The spec's JSON form, as an independent worker would write it."""
    tag = ref_hmac(ka, ref_attest_message(nonce, worker_id, attested_at_ns, shards, ok))
    return {
        "format": "attest-v1",
        "nonce": nonce.hex(),
        "worker_id": worker_id,
        "attested_at_ns": attested_at_ns,
        "shards": [
            {
                "shard_id": sid,
                "seal_signature": sig.hex(),
                "digest_now": now.hex(),
                "probe": None if probe is None else probe.hex(),
                "verified_at_ns": t,
            }
            for sid, sig, now, probe, t in shards
        ],
        "verdict": "ok" if ok else "mismatch",
        "tag": tag.hex(),
    }


def _lib_statement(nonce: bytes, worker_id: str, at: int, shards: list[RefShard], ok: bool) -> Statement:
    return Statement(
        nonce=nonce,
        worker_id=worker_id,
        attested_at_ns=at,
        shards=tuple(AttestedShard(*s) for s in shards),
        verdict="ok" if ok else "mismatch",
    )


def test_attest_keys_and_probe_known_answers() -> None:
    ka = ref_attest_key(TOKEN)
    kp = ref_probe_key(ka, NONCE)
    assert (ka.hex(), kp.hex()) == (KA_HEX, KP_HEX)
    assert ref_probe(kp, P(4097)).hex() == PROBE_HEX
    lib_ka = attest_key(TOKEN)
    assert lib_ka._expose_for_tests().hex() == KA_HEX
    assert probe_key(lib_ka, NONCE).hex() == KP_HEX


@pytest.mark.parametrize(("with_probe", "ok", "expected"), ATTEST_TAGS)
def test_attest_tag_known_answers(with_probe: bool, ok: bool, expected: str) -> None:
    shards: list[RefShard] = [
        (
            SHARD_A,
            bytes.fromhex(SEAL_TAG_FULL),
            ref_tree(P(4097)),
            bytes.fromhex(PROBE_HEX) if with_probe else None,
            1764331259000000000,
        )
    ]
    args = (NONCE, "worker-a", 1764331260000000000, shards, ok)
    msg = ref_attest_message(*args)
    assert ref_hmac(ref_attest_key(TOKEN), msg).hex() == expected
    st_ = _lib_statement(*args)
    assert attest_message(st_) == msg
    assert attest_tag(attest_key(TOKEN), st_).hex() == expected
    parsed, tag = statement_from_json(ref_attest_json(*args, ref_attest_key(TOKEN)))
    assert parsed == st_ and tag.hex() == expected
    assert verify_statement_tag(attest_key(TOKEN), parsed, tag)


_ref_shard = st.tuples(
    _utf8_text.filter(bool),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
    st.none() | st.binary(min_size=32, max_size=32),
    _u64,
)


@settings(max_examples=120, deadline=None)
@given(
    nonce=st.binary(min_size=16, max_size=64),
    worker=_utf8_text,
    at=_u64,
    shards=st.lists(_ref_shard, max_size=4),
    ok=st.booleans(),
    token=st.binary(min_size=16, max_size=64),
)
def test_attest_property_library_equals_reference(
    nonce: bytes, worker: str, at: int, shards: list[RefShard], ok: bool, token: bytes
) -> None:
    ka = ref_hkdf(token, b"llorch-vram-attest-v1")
    msg = ref_attest_message(nonce, worker, at, shards, ok)
    s = _lib_statement(nonce, worker, at, shards, ok)
    lib_ka = attest_key(token)
    assert attest_message(s) == msg
    assert attest_tag(lib_ka, s) == ref_hmac(ka, msg)
    assert probe_key(lib_ka, nonce) == ref_probe_key(ka, nonce)
    parsed, tag = statement_from_json(
        json.loads(json.dumps(ref_attest_json(nonce, worker, at, shards, ok, ka)))
    )
    assert parsed == s and verify_statement_tag(lib_ka, parsed, tag)
    assert not verify_statement_tag(lib_ka, parsed, tag[:31])
    assert not verify_statement_tag(lib_ka, parsed, tag + b"\x00")


def _good_doc() -> dict[str, Any]:
    shards: list[RefShard] = [
        (
            SHARD_A,
            bytes.fromhex(SEAL_TAG_FULL),
            ref_tree(P(4097)),
            bytes.fromhex(PROBE_HEX),
            1764331259000000000,
        )
    ]
    return ref_attest_json(NONCE, "worker-a", 1764331260000000000, shards, True, ref_attest_key(TOKEN))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(format="attest-v0"),
        lambda d: d.update(nonce=NONCE.hex()[:-1]),  # odd number of hex digits
        lambda d: d.update(nonce="00" * 15),  # 15 bytes: below the spec's 16
        lambda d: d.update(nonce="00" * 65),  # 65 bytes: above the spec's 64
        lambda d: d.update(nonce=" " + NONCE.hex()),
        lambda d: d.update(tag=d["tag"][:62]),
        lambda d: d.update(tag=d["tag"] + "00"),
        lambda d: d.update(tag=d["tag"].upper()),
        lambda d: d["shards"][0].update(probe=PROBE_HEX[:62]),
        lambda d: d["shards"][0].update(probe=""),  # an empty probe is JSON null, never ""
        lambda d: d["shards"][0].update(seal_signature=SEAL_TAG_FULL + "00"),
        lambda d: d["shards"][0].update(digest_now=None),
        lambda d: d["shards"][0].update(verified_at_ns=-1),
        lambda d: d["shards"][0].update(shard_id="\ud800"),
        lambda d: d.update(verdict=1),
        lambda d: d.update(verdict="mismatch ", extra=None),
        lambda d: d.update(attested_at_ns=str(d["attested_at_ns"])),
    ],
)
def test_attest_json_out_of_spec_refused(edit: Callable[[dict[str, Any]], object]) -> None:
    d = _good_doc()
    edit(d)
    with pytest.raises(InvalidInput):
        statement_from_json(d)


def _seal_record_for(token: str, worker_id: str = "worker-a") -> dict[str, Any]:
    a = {**_seal_args(), "worker_id": worker_id}
    sig = ref_hmac(ref_seal_key(token), ref_seal_message(**a))
    return {"format": "seal-v1", **a, "digest": a["digest"].hex(), "signature": sig.hex()}


def _statement_for(nonce: bytes, issued: int, probe: bytes | None, *, delay: int = 1000) -> dict[str, Any]:
    rec = _seal_record_for(TOKEN)
    shards: list[RefShard] = [
        (SHARD_A, bytes.fromhex(rec["signature"]), ref_tree(P(4097)), probe, issued + delay // 2)
    ]
    return ref_attest_json(nonce, "worker-a", issued + delay, shards, True, ref_attest_key(TOKEN))


def test_attest_full_check_of_an_independent_statement(tmp_path: Any) -> None:
    """A statement and seal record written by the reference pass every check of the spec's list,
    probe included (recomputed by the library from a real file); the same nonce again is refused."""
    store = NonceStore()
    issued = store.issue("worker-a", 32)
    model = tmp_path / "shard.bin"
    model.write_bytes(P(4097))
    probe = ref_probe(ref_probe_key(ref_attest_key(TOKEN), issued.nonce), P(4097))
    doc = _statement_for(issued.nonce, issued.issued_at_ns, probe)
    res = check_attestation(
        json.dumps(doc),
        TOKEN,
        issued.nonce,
        [_seal_record_for(TOKEN)],
        issued.issued_at_ns,
        10**9,
        {SHARD_A: model},
        nonces=store,
    )
    assert res.probed == (SHARD_A,)
    with pytest.raises(AttestationRefused) as exc:  # the same nonce, a second time: a replay
        check_attestation(
            doc, TOKEN, issued.nonce, [_seal_record_for(TOKEN)], issued.issued_at_ns, 10**9, nonces=store
        )
    assert exc.value.check == 2
    # A wrong probe (another nonce's) is refused at check 6.
    store2 = NonceStore()
    i2 = store2.issue("worker-a", 16)
    doc2 = _statement_for(i2.nonce, i2.issued_at_ns, probe)
    with pytest.raises(AttestationRefused) as exc:
        check_attestation(
            doc2,
            TOKEN,
            i2.nonce,
            [_seal_record_for(TOKEN)],
            i2.issued_at_ns,
            10**9,
            {SHARD_A: model},
            nonces=store2,
        )
    assert exc.value.check == 6


def test_attest_expired_nonce_refused() -> None:
    store = NonceStore(ttl_ns=1)
    issued = store.issue("worker-a")
    doc = _statement_for(issued.nonce, issued.issued_at_ns, None)
    time.sleep(0.002)  # past the 1 ns lifetime
    with pytest.raises(AttestationRefused) as exc:
        check_attestation(
            doc, TOKEN, issued.nonce, [_seal_record_for(TOKEN)], issued.issued_at_ns, 10**9, nonces=store
        )
    assert exc.value.check == 2


@pytest.mark.parametrize(("delay", "allowed", "check"), [(10**9 + 1, 10**9, 3), (10**6, 10**6, 0)])
def test_attest_delay_window(delay: int, allowed: int, check: int) -> None:
    issued = 1764331200000000000
    doc = _statement_for(NONCE, issued, None, delay=delay)

    def call() -> Any:
        return check_attestation(doc, TOKEN, NONCE, [_seal_record_for(TOKEN)], issued, allowed)

    if check == 0:
        assert call().statement.attested_at_ns == issued + delay  # exactly the edge: accepted
    else:
        with pytest.raises(AttestationRefused) as exc:
            call()
        assert exc.value.check == check


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(_good_doc()) + " []",
        json.dumps(_good_doc()) + "\x00",
        json.dumps(_good_doc())[:-1] + ', "verdict": "ok"}',  # duplicate key
        json.dumps([_good_doc()]),
    ],
    ids=["trailing-json", "trailing-nul", "duplicate-key", "array"],
)
def test_attest_text_out_of_spec_refused(text: str) -> None:
    with pytest.raises(InvalidInput):
        check_attestation(text, TOKEN, NONCE, [_seal_record_for(TOKEN)], 1764331200000000000, 10**12)


def test_attest_tags_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_compare_digest(monkeypatch)
    d = _good_doc()
    s, tag = statement_from_json(d)
    wrong = bytes(32)
    assert not verify_statement_tag(attest_key(TOKEN), s, wrong)
    assert any(wrong in c and tag in c for c in calls)


# ================================================================================================
# nh-fast-v1 (our own format: docs/specs/nh-fast-v1.md)
# ================================================================================================

from vram_residency.formats import _nhfast_native, nhfast  # noqa: E402

NH_KEY = bytes(range(32))
NH_KAT = [  # input, D, U_0
    (
        b"",
        "c8f0a12c84783c497f14a66fa124dd968fe4c4411a23af13844ee9e9948ad82f",
        "81ac16b7a50f758caa4c1ff1157379cd9baf37d1784bb4892f34eacc54dd2e05",
    ),
    (
        b"abc",
        "340ef17825027a657fc820b11d756de16bcdc11291057921cd811e3d390a8982",
        "aad069153000993828d4568d9270390259f9022cb01f38df301bdddb498c7b21",
    ),
    (
        P(4096),
        "7d71eb4a4bfbbc8e4946c00db86a8806f3b9de4756d3141a005625be185c50d0",
        "bb2d39aa1f97b259d6691cda098e28dbc2f2e0b437ae9cacf12a4645b65db4a1",
    ),
    (
        P(4097),
        "b1db44a3ca5d6f9d7bf7c610195cd2f8efcf041a161be4cfe72c224b01a8ff67",
        "26488743297b99385947b02dcbdceb47df0a33b2361752ab889cb075b5f4b469",
    ),
    (
        P(1048576),
        "96ba2e397e692c2f250797ef9f15638113ba9bbbe28d2d559d4a086857089d42",
        "cbc9438bcef250d6637b63f02e859e0f27711260ac8493a4da2d6ac5b44e6c11",
    ),
    (
        P(1052673),
        "61e54277ce1b595c0ffe3cc91c17b5e8498c2a78d401e38498465a898a9fa3f7",
        "cbc9438bcef250d6637b63f02e859e0f27711260ac8493a4da2d6ac5b44e6c11",
    ),
]
_nh_ids = [str(len(m)) for m, _, _ in NH_KAT]


def _library_nh_paths(
    m: bytes, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, bytes, bytes]]:
    """(path, digest, unit digests) from every public host path of nh-fast-v1."""
    d, u = nhfast.hash_units(m, key, threads=1)
    yield "nhfast.hash_units/1", d, u
    d, u = nhfast.hash_units(memoryview(m), key, threads=3)
    yield "nhfast.hash_units/3", d, u
    r = tree.hash_units(bytearray(m), tree.NH_FAST_V1, key=key)
    yield "tree.hash_units", r.digest, r.unit_digests
    yield "digest_only", tree.digest_only(m, tree.NH_FAST_V1, key=key), u
    yield "reduce_units", nhfast.reduce_units(u, len(m), key), u
    with monkeypatch.context() as mp:  # the numpy path (when the native library is absent)
        mp.setattr(_nhfast_native, "available", lambda: False)
        d, u = nhfast.hash_units(m, key, threads=2)
        yield "numpy", d, u


def test_nh_key_schedule_and_leaf_known_answers() -> None:
    k_unit, k_top, k = ref_nh_schedule(NH_KEY)
    nh_bytes = struct.pack("<1280I", *k)
    assert k_unit.hex() == "c7a9fe560d44841778c22120ce1b526366609eee92b4ff3696e96a1b445bd921"
    assert k_top.hex() == "1a5a85550446f71b8af4a80528c165dd8ac7f9c7407b26cd92db82d575065092"
    assert nh_bytes[:32].hex() == "9e630d8e292148e32cad13aa5339585ce8478c8780ed81b4384b5e015bd1b697"
    assert nh_bytes[5088:].hex() == "d656b005ec5cc168cc6a000911817635597886e73b30cd0ec180cc59a90d0d49"
    sched = nhfast.key_schedule(NH_KEY)
    assert (sched.unit_key, sched.top_key, sched.nh_key) == (k_unit, k_top, nh_bytes)
    for chunk, want in (
        (P(4096), "77683a70e669eda286a6ebd26adf3fe807f4b959f4c7fa44"),
        (b"", "d6a871b4f5b9d55f79d760d54630eeab2f545bb5b0dfffd2"),
    ):
        assert ref_nh_leaf(chunk, k).hex() == want
        assert nhfast.leaf_tags(memoryview(chunk), sched, 1).hex() == want


@pytest.mark.parametrize(("m", "d", "u0"), NH_KAT, ids=_nh_ids)
def test_nh_known_answers(m: bytes, d: str, u0: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rd, ru = ref_nh_fast(NH_KEY, m)
    assert (rd.hex(), ru[0].hex()) == (d, u0)
    for path, ld, lu in _library_nh_paths(m, NH_KEY, monkeypatch):
        assert (ld.hex(), lu[:32].hex()) == (d, u0), path
        assert lu == b"".join(ru), path


def test_nh_second_unit_and_token_keys() -> None:
    _, ru = ref_nh_fast(NH_KEY, P(1052673))
    assert ru[1].hex() == "26488743297b99385947b02dcbdceb47df0a33b2361752ab889cb075b5f4b469"
    kw = ref_hkdf(TOKEN.encode(), b"llorch-vram-nhfast-v1")
    assert kw.hex() == "254baa21cdac400f500bd872fa2ab707d977f84cbbf84a7c2ecb7f2ce83636bd"
    k = ref_nh_shard_key(TOKEN, SHARD_A)
    assert k.hex() == "8054cf4f7e705576f3a00d520ef0e103999ba3025b83ef2876b557b35995e66b"
    assert nhfast.manager_key(TOKEN.encode()) == kw and nhfast.shard_key(kw, SHARD_A) == k
    want = "7d0e599795e404949c3bb30a98a6cd493a2ab920a24358dbf13a652cef525839"
    assert ref_nh_fast(k, P(4097))[0].hex() == want
    assert tree.digest(P(4097), tree.NH_FAST_V1, key=k).hex() == want


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=sizes, seed=st.integers(0, 2**32), key=st.binary(min_size=32, max_size=32))
@example(n=0, seed=0, key=bytes(32))
def test_nh_property_library_equals_reference(
    n: int, seed: int, key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = _bytes(n, seed)
    rd, ru = ref_nh_fast(key, m)
    for path, ld, lu in _library_nh_paths(m, key, monkeypatch):
        assert (ld, lu) == (rd, b"".join(ru)), path


@settings(max_examples=25, deadline=None)
@given(shard_id=_utf8_text.filter(bool), token=st.binary(min_size=16, max_size=64))
def test_nh_shard_key_property(shard_id: str, token: bytes) -> None:
    kw = ref_hkdf(token, b"llorch-vram-nhfast-v1")
    raw = shard_id.encode("utf-8")
    want = ref_hmac(kw, b"nh-fast-v1 shard" + struct.pack("<I", len(raw)) + raw)
    assert nhfast.shard_key(nhfast.manager_key(token), shard_id) == want


@pytest.mark.parametrize(
    "key", [b"", bytes(31), bytes(33), "0" * 32, None], ids=["0", "31", "33", "str", "none"]
)
def test_nh_bad_keys_refused(key: Any) -> None:
    with pytest.raises(InvalidInput):
        nhfast.hash_units(b"abc", key)
    with pytest.raises(InvalidInput):
        tree.digest(b"abc", tree.NH_FAST_V1, key=key)


@pytest.mark.parametrize(
    "units",
    [[bytes(31), bytes(33)], [bytes(32), bytes(32), b""], bytes(63), [bytes(32)]],
    ids=["31+33", "32+32+0", "packed63", "one-unit"],
)
def test_nh_reduce_refuses_malformed_unit_digests(units: list[bytes] | bytes) -> None:
    with pytest.raises(InvalidInput):
        nhfast.reduce_units(units, UNIT + 1, NH_KEY)


@pytest.mark.parametrize("shard_id", ["", "\ud800"])
def test_nh_shard_key_refuses_bad_ids(shard_id: str) -> None:
    with pytest.raises(InvalidInput):
        nhfast.shard_key(bytes(32), shard_id)


# ================================================================================================
# tp-record-v1 (our own format: docs/specs/tp-record-v1.md)
# ================================================================================================

from vram_residency.distributed import check_tp_record  # noqa: E402
from vram_residency.distributed._record import RankPart, TPRecord, tp_key, tp_message  # noqa: E402

K_TP = "09051100f628dba89af29cb3e418f777565f8426448f6e003d9caa8c4bc0d556"
SEAL_TAG_B = "ca33419ea273080260ac740e8e2f7109bc5a61d6ac1640de39a43fb50e9bb232"
TP_MSG_HEX = (
    "6c6c6f7263682d7672616d2d74702d7265636f72642d76310a006d6f64656c5f6e616d650a0000006c6c616d612d332d"
    "38620a00776f726c645f73697a650400000002000000040072616e6b0400000000000000060064657669636504000000"
    "000000000900776f726b65725f696408000000776f726b65722d610600736861726473040000000100000004007365616c"
    "20000000511ade73fd72447321eceac8b86ed28dd2a976dfbb68a0dafb7e43f29236fac2040072616e6b040000000100"
    "0000060064657669636504000000010000000900776f726b65725f696408000000776f726b65722d61060073686172647304"
    "0000000100000004007365616c20000000ca33419ea273080260ac740e8e2f7109bc5a61d6ac1640de39a43fb50e9bb232"
)


def ref_seal_record(token: str | bytes, a: dict[str, Any]) -> dict[str, Any]:
    sig = ref_hmac(ref_seal_key(token), ref_seal_message(**a))
    return {"format": "seal-v1", **a, "digest": a["digest"].hex(), "signature": sig.hex()}


def _shard_b() -> dict[str, Any]:
    return {
        **_seal_args(),
        "shard_id": "shard-ffeeddccbbaa99887766554433221100",
        "gpu_device": 1,
        "shard_index": 1,
    }


def ref_tp_record(
    token: str | bytes, model: str, parts: list[tuple[int, str, list[dict[str, Any]]]]
) -> dict[str, Any]:
    recs = [(dev, wid, [ref_seal_record(token, a) for a in seals]) for dev, wid, seals in parts]
    msg = ref_tp_message(
        model, [(dev, wid, [bytes.fromhex(r["signature"]) for r in rs]) for dev, wid, rs in recs]
    )
    tp_k = ref_hkdf(token.encode("utf-8") if isinstance(token, str) else token, b"llorch-vram-tp-record-v1")
    return {
        "format": "tp-record-v1",
        "model_name": model,
        "world_size": len(parts),
        "parts": [
            {"rank": r, "device": dev, "worker_id": wid, "seals": rs} for r, (dev, wid, rs) in enumerate(recs)
        ],
        "signature": ref_hmac(tp_k, msg).hex(),
    }


def _lib_parts(rec: dict[str, Any], token: str | bytes) -> list[RankPart]:
    return [
        RankPart(
            p["rank"], p["device"], p["worker_id"], tuple(check_seal_record(s, token) for s in p["seals"])
        )
        for p in rec["parts"]
    ]


def test_tp_known_answers() -> None:
    assert ref_hkdf(TOKEN.encode(), b"llorch-vram-tp-record-v1").hex() == K_TP
    assert tp_key(TOKEN)._expose_for_tests().hex() == K_TP
    a, b = _seal_args(), _shard_b()
    assert ref_seal_record(TOKEN, a)["signature"] == SEAL_TAG_FULL
    assert ref_seal_record(TOKEN, b)["signature"] == SEAL_TAG_B
    two = ref_tp_record(TOKEN, "llama-3-8b", [(0, "worker-a", [a]), (1, "worker-a", [b])])
    msg = ref_tp_message(
        "llama-3-8b",
        [(0, "worker-a", [bytes.fromhex(SEAL_TAG_FULL)]), (1, "worker-a", [bytes.fromhex(SEAL_TAG_B)])],
    )
    assert len(msg) == 292 and msg.hex() == TP_MSG_HEX
    assert sha256(msg).hex() == "b5db7b081ec1e623304be5ad2071e516e16f75d41869042adf7cc3da1a00420c"
    assert two["signature"] == "fb9fc203a7bee8aa13c352b2ef9da58799b69219742d29fcbc0ea601bc461b8c"
    parts = _lib_parts(two, TOKEN)
    assert tp_message("llama-3-8b", parts) == msg
    assert TPRecord.make(tp_key(TOKEN), "llama-3-8b", parts).record() == two
    assert check_tp_record(json.loads(json.dumps(two)), TOKEN).signature == two["signature"]
    # W = 1 with [A, B]: an encoding vector only (B's device is 1, so it does not check).
    one = ref_tp_message(
        "llama-3-8b", [(0, "worker-a", [bytes.fromhex(SEAL_TAG_FULL), bytes.fromhex(SEAL_TAG_B)])]
    )
    assert sha256(one).hex() == "cce8292f6452517fd46ec2bb78fbf68e9f01844cedd42dbfdd9bc91c1d903631"
    assert (
        ref_hmac(bytes.fromhex(K_TP), one).hex()
        == "d9ffb5a0b31e7f3b01f3a4c7801801a1a2885a55575549ecafd47d812a1498be"
    )
    lib_one = [RankPart(0, 0, "worker-a", tuple(parts[0].shards) + tuple(parts[1].shards))]
    assert tp_message("llama-3-8b", lib_one) == one
    with pytest.raises(SealVerificationFailed):
        check_tp_record(ref_tp_record(TOKEN, "llama-3-8b", [(0, "worker-a", [a, b])]), TOKEN)


@st.composite
def tp_parts(draw: st.DrawFn) -> list[tuple[int, str, list[dict[str, Any]]]]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        dev, wid = draw(_u32), draw(_utf8_text)
        seals = [
            {**draw(seal_args()), "gpu_device": dev, "worker_id": wid} for _ in range(draw(st.integers(1, 3)))
        ]
        out.append((dev, wid, seals))
    return out


@settings(max_examples=40, deadline=None)
@given(model=_utf8_text.filter(bool), parts=tp_parts(), token=st.binary(min_size=16, max_size=48))
def test_tp_property_library_equals_reference(
    model: str, parts: list[tuple[int, str, list[dict[str, Any]]]], token: bytes
) -> None:
    rec = ref_tp_record(token, model, parts)
    lib = _lib_parts(rec, token)
    assert TPRecord.make(tp_key(token), model, lib).record() == rec
    assert check_tp_record(json.loads(json.dumps(rec)), token).signature == rec["signature"]


def _two_rank() -> dict[str, Any]:
    return ref_tp_record(
        TOKEN, "llama-3-8b", [(0, "worker-a", [_seal_args()]), (1, "worker-a", [_shard_b()])]
    )


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda d: d.update(format="tp-record-v2"), InvalidInput),
        (lambda d: d.update(model_name=""), InvalidInput),
        (lambda d: d.update(model_name="\ud800"), InvalidInput),
        (lambda d: d.update(world_size=0), InvalidInput),
        (lambda d: d.update(world_size=65537), InvalidInput),
        (lambda d: d.update(world_size=True), InvalidInput),
        (lambda d: d.update(world_size=2.0), InvalidInput),
        (lambda d: d.update(signature=d["signature"].upper()), InvalidInput),
        (lambda d: d.update(signature=d["signature"][:62]), InvalidInput),
        (lambda d: d.update(signature=d["signature"] + "00"), InvalidInput),
        (lambda d: d["parts"][0].update(seals=[]), InvalidInput),
        (lambda d: d["parts"][0].update(rank=-1), InvalidInput),
        (lambda d: d.update(world_size=1), SealVerificationFailed),  # a rank extra
        (lambda d: d.update(parts=d["parts"][::-1]), SealVerificationFailed),  # ranks swapped
        (lambda d: d["parts"][1].update(device=0), SealVerificationFailed),  # not the seal's device
        (lambda d: d.update(model_name="llama-3-8B"), SealVerificationFailed),
        (lambda d: d.update(signature=SEAL_TAG_FULL), SealVerificationFailed),  # a seal tag is no tp tag
    ],
)
def test_tp_out_of_spec_refused(edit: Callable[[dict[str, Any]], object], error: type[Exception]) -> None:
    d = _two_rank()
    assert check_tp_record(json.loads(json.dumps(d)), TOKEN)
    edit(d)
    with pytest.raises(error):
        check_tp_record(d, TOKEN)


def test_tp_tags_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    d = _two_rank()
    d["signature"] = "00" * 32
    calls = _spy_compare_digest(monkeypatch)
    with pytest.raises(SealVerificationFailed):
        check_tp_record(d, TOKEN)
    assert any(bytes(32) in c for c in calls)


# ================================================================================================
# The worker's own output (host backend), checked by the reference alone
# ================================================================================================

from vram_residency import VramManager  # noqa: E402


def ref_digest(algorithm: str, shard_id: str, m: bytes) -> bytes:
    if algorithm == "sha256-tree-v1":
        return ref_tree(m)
    if algorithm == "blake3":
        return blake3.blake3(m).digest()
    return ref_nh_fast(ref_nh_shard_key(TOKEN, shard_id), m)[0]


@pytest.mark.parametrize("algorithm", ["sha256-tree-v1", "blake3", "nh-fast-v1"])
def test_worker_records_and_statement_check_by_the_reference(algorithm: str) -> None:
    """Seal records and an attest-v1 statement (with probes) that a worker writes are accepted by
    an orchestrator that has only the specs: tags, digests, probes and encodings recomputed here."""
    # (An empty model is refused by the manager, so the smallest shard is one byte.)
    datas = [_bytes(n, n) for n in (1, LEAF - 1, LEAF, LEAF + 1, 3 * LEAF)]
    with VramManager(TOKEN, backend="host", worker_id="wörker-ü") as mgr:
        shards = [
            mgr.seal_model(
                m, model_ref="mödel@ref", shard_index=i, total_shards=len(datas), digest_algorithm=algorithm
            )
            for i, m in enumerate(datas)
        ]
        recs = [json.loads(json.dumps(s.record())) for s in shards]
        nonce = bytes(range(64))
        doc = json.loads(json.dumps(mgr.attest(nonce, probe=True)))
    ks = ref_seal_key(TOKEN)
    for rec, m in zip(recs, datas, strict=True):
        a = {k: rec[k] for k in rec if k not in ("format", "signature")}
        assert rec["format"] == "seal-v1" and a["digest_algorithm"] == algorithm
        assert bytes.fromhex(a["digest"]) == ref_digest(algorithm, a["shard_id"], m)
        a["digest"] = bytes.fromhex(a["digest"])
        assert hmac.compare_digest(ref_hmac(ks, ref_seal_message(**a)).hex(), rec["signature"])
    ka = ref_attest_key(TOKEN)
    kp = ref_probe_key(ka, nonce)
    assert doc["format"] == "attest-v1" and doc["nonce"] == nonce.hex() and doc["verdict"] == "ok"
    shards_ref: list[RefShard] = []
    for sd, rec, m in zip(doc["shards"], recs, datas, strict=True):
        assert sd["shard_id"] == rec["shard_id"] and sd["seal_signature"] == rec["signature"]
        assert sd["digest_now"] == rec["digest"] and sd["probe"] == ref_probe(kp, m).hex()
        shards_ref.append(
            (
                sd["shard_id"],
                bytes.fromhex(sd["seal_signature"]),
                bytes.fromhex(sd["digest_now"]),
                bytes.fromhex(sd["probe"]),
                sd["verified_at_ns"],
            )
        )
    msg = ref_attest_message(nonce, doc["worker_id"], doc["attested_at_ns"], shards_ref, True)
    assert doc["worker_id"] == "wörker-ü"
    assert hmac.compare_digest(ref_hmac(ka, msg).hex(), doc["tag"])


@pytest.mark.parametrize(
    "tag", [SEAL_TAG_FULL, 32, 1 << 62, None, [0] * 32], ids=["hex-str", "int32", "int-huge", "none", "list"]
)
def test_tag_of_wrong_type_is_invalid_input(tag: Any) -> None:
    """A tag that is not bytes is a caller error (InvalidInput), not a TypeError, and never turned
    into bytes by ``bytes(tag)``: ``bytes(32)`` is 32 zero bytes, ``bytes(1 << 62)`` a MemoryError (a terabyte-sized int an allocation)."""
    f = _lib_fields(_seal_args())
    with pytest.raises(InvalidInput):
        verify_tag(seal_key(TOKEN), f, tag)
    s, _ = statement_from_json(_good_doc())
    with pytest.raises(InvalidInput):
        verify_statement_tag(attest_key(TOKEN), s, tag)
