"""nh-fast-v1 on the host: every path agrees with the pure-Python reference at every edge length,
keys are checked, and the structured changes of the spec's security section are detected."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_residency.backends.host import HostBackend
from vram_residency.errors import InvalidInput
from vram_residency.formats import _native, _nhfast_native, nhfast, tree

MIB = 1 << 20
EDGES = [0, 1, 7, 8, 4095, 4096, 4097, MIB - 1, MIB, MIB + 1, 2 * MIB + 4097]
native = pytest.mark.skipif(not _nhfast_native.available(), reason="native nh-fast-v1 not built")


def _data(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def _ref_tags(data: bytes, nh_key: bytes) -> bytes:
    leaves = max(1, -(-len(data) // 4096))
    return b"".join(nhfast.reference_leaf_tag(data[i * 4096 : (i + 1) * 4096], nh_key) for i in range(leaves))


@pytest.mark.parametrize("n", EDGES)
def test_every_path_matches_the_reference(n: int) -> None:
    data, key = _data(n, n), os.urandom(32)
    sched = nhfast.key_schedule(key)
    ref = _ref_tags(data, sched.nh_key)
    assert nhfast._numpy_tags(memoryview(data), sched.nh_key) == ref
    if _nhfast_native.available():
        for want in (0, 1, 2):
            for threads in (1, 2, 3):
                assert _nhfast_native.leaf_tags(memoryview(data), sched.nh_key, threads, want=want) == ref
    units = nhfast.unit_digests_from_tags(sched, ref, n)
    res = tree.hash_units(data, tree.NH_FAST_V1, key=key)
    assert res.unit_digests == units
    assert res.digest == nhfast.finalize(sched, units, n) == nhfast.reduce_units(units, n, key)
    assert len(res.unit_digests) == 32 * tree.unit_count(n)


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=9000), st.binary(min_size=32, max_size=32))
def test_native_equals_reference_property(data: bytes, key: bytes) -> None:
    assert tree.hash_units(data, tree.NH_FAST_V1, key=key).digest == nhfast.reference_hash(data, key)[0]


@native
def test_read_only_and_memoryview_inputs() -> None:
    data = _data(3 * 4096 + 11, 1)
    key = bytes(32)
    a = tree.hash_units(bytearray(data), tree.NH_FAST_V1, key=key)
    b = tree.hash_units(memoryview(data)[: len(data)], tree.NH_FAST_V1, key=key)
    assert a == b == tree.hash_units(data, tree.NH_FAST_V1, key=key, threads=1)


def test_key_is_required_and_checked() -> None:
    with pytest.raises(InvalidInput, match="32-byte key"):
        tree.hash_units(b"x", tree.NH_FAST_V1)
    with pytest.raises(InvalidInput, match="32-byte key"):
        tree.hash_units(b"x", tree.NH_FAST_V1, key=b"short")
    with pytest.raises(InvalidInput):
        nhfast.key_schedule(b"\x00" * 31)
    with pytest.raises(InvalidInput):
        nhfast.shard_key(bytes(32), "")
    with pytest.raises(InvalidInput, match="unit digest count"):
        nhfast.reduce_units(b"\x00" * 64, 5, bytes(32))
    assert tree.NH_FAST_V1 in tree.KEYED_ALGORITHMS
    # Not yet accepted where no key is passed (seal records, CLI, stream hasher, backends' checks).
    assert tree.NH_FAST_V1 not in tree.ALGORITHMS
    with pytest.raises(InvalidInput, match="unknown digest algorithm"):
        tree.check_algorithm(tree.NH_FAST_V1)
    assert tree.check_algorithm(tree.NH_FAST_V1, keyed=True) == tree.NH_FAST_V1


def test_different_keys_give_unrelated_digests() -> None:
    data = _data(5000, 2)
    digests = {tree.digest(data, tree.NH_FAST_V1, key=os.urandom(32)) for _ in range(20)}
    assert len(digests) == 20


def test_shard_keys_differ_by_shard() -> None:
    worker = os.urandom(32)
    assert nhfast.shard_key(worker, "shard-a") != nhfast.shard_key(worker, "shard-b")
    # The length prefix keeps ids that are prefixes of each other apart.
    assert nhfast.shard_key(worker, "ab") != nhfast.shard_key(worker, "a")


# -- the structured changes of the spec's security section, on the host, over fresh keys ---------


def _patterns(data: bytes, rng: np.random.Generator) -> dict[str, bytes]:
    n = len(data)
    arr = np.frombuffer(data, dtype=np.uint8)
    out: dict[str, bytes] = {}
    flip = arr.copy()
    bit = int(rng.integers(0, 8 * n))
    flip[bit // 8] ^= np.uint8(1 << (bit % 8))
    out["single flip"] = flip.tobytes()
    # Two opposite flips: the same bit set in one leaf, cleared in another (sums are unchanged).
    opp = arr.copy()
    pos_set = int(np.flatnonzero((arr[:4096] & 1) == 0)[0])
    pos_clear = 4096 * 3 + int(np.flatnonzero((arr[4096 * 3 : 4096 * 4] & 1) == 1)[0])
    opp[pos_set] |= 1
    opp[pos_clear] &= 0xFE
    out["opposite flips"] = opp.tobytes()
    leaves = arr.reshape(-1, 4096).copy()
    leaves[[1, 6]] = leaves[[6, 1]]
    out["swapped leaves"] = leaves.tobytes()
    out["shifted range"] = data[:8192] + data[8193:20000] + data[8192:8193] + data[20000:]
    zero = arr.copy()
    zero[4096 * 2 : 4096 * 3] = 0
    out["zeroed page"] = zero.tobytes()
    return out


def test_structured_changes_detected_over_fresh_keys() -> None:
    rng = np.random.default_rng(7)
    data = _data(8 * 4096, 3)
    for _ in range(200):
        key = rng.bytes(32)
        base = tree.hash_units(data, tree.NH_FAST_V1, key=key)
        for name, changed in _patterns(data, rng).items():
            assert len(changed) == len(data) and changed != data, name
            other = tree.hash_units(changed, tree.NH_FAST_V1, key=key)
            assert other.digest != base.digest, name
            assert other.unit_digests != base.unit_digests, name


def test_length_is_bound() -> None:
    key = bytes(32)
    # Trailing zeros inside the last leaf pad to the same chunk: only LE64(n) tells them apart.
    a = tree.hash_units(b"abc", tree.NH_FAST_V1, key=key)
    b = tree.hash_units(b"abc\x00", tree.NH_FAST_V1, key=key)
    assert a.unit_digests == b.unit_digests
    assert a.digest != b.digest


def test_host_backend_hashes_nh_fast() -> None:
    data = _data(MIB + 123, 4)
    key = os.urandom(32)
    backend = HostBackend(capacity_bytes=4 * MIB)
    buf = backend.allocate(len(data))
    try:
        buf.write(0, data)
        res = backend.hash(buf, tree.NH_FAST_V1, key=key)
        assert res == tree.hash_units(data, tree.NH_FAST_V1, key=key)
        assert (
            backend.digest(buf, tree.NH_FAST_V1, 4096, key=key) == nhfast.reference_hash(data[:4096], key)[0]
        )
        with pytest.raises(InvalidInput):
            backend.hash(buf, tree.NH_FAST_V1)
    finally:
        buf.close()
        backend.close()


def test_numpy_fallback_when_the_library_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    # The path a machine without a C compiler runs: same bytes, threaded over 16 MiB pieces.
    data, key = _data(33 * MIB + 5, 5), os.urandom(32)
    want = tree.hash_units(data, tree.NH_FAST_V1, key=key)
    want_small = nhfast.reference_hash(data[:5000], key)
    missing = _native.NativeLibrary(Path("/nonexistent/_nhfast.so"), _nhfast_native._bind, "nh-fast-v1")
    monkeypatch.setattr(_nhfast_native, "_LIB", missing)
    assert not _nhfast_native.available()
    assert tree.hash_units(data, tree.NH_FAST_V1, key=key, threads=2) == want
    small = tree.hash_units(data[:5000], tree.NH_FAST_V1, key=key, threads=1)
    assert (small.digest, small.unit_digests) == want_small
