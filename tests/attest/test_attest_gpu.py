"""attest-v1 on the GPU: the keyed-BLAKE3 probe kernel against the ``blake3`` package at edge
lengths, batched attestations of several shards, and a flipped byte caught. Run on the H200 with
``VRAM_RESIDENCY_REQUIRE_GPU=1``; skipped without a GPU."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import blake3
import numpy as np
import pytest

from vram_residency import VramManager
from vram_residency.attest import check_attestation
from vram_residency.backends.base import Segment
from vram_residency.errors import AttestationMismatch
from vram_residency.formats.attest import attest_key, probe_key

pytestmark = pytest.mark.gpu

TOKEN = "attest-gpu-test-token-0123456789abcdef"
KIB, MIB = 1024, 1 << 20
EDGE_LENGTHS = [
    1,
    63,
    64,
    65,
    1023,
    1024,
    1025,
    2047,
    2048,
    2049,
    3072,
    4096,
    4097,
    8191,
    65535,
    65536,
    65537,
    MIB - 1,
    MIB,
    MIB + 1,
    16 * MIB + 3,
    64 * MIB + 1024,
    256 * MIB + 1,
]


def _bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, size=n, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def mgr() -> Iterator[VramManager]:
    with VramManager(TOKEN, backend="cuda", worker_id="gpu-attest") as m:
        yield m


@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_probe_kernel_matches_blake3_package(mgr: VramManager, n: int) -> None:
    data = _bytes(n, n)
    shard = mgr.seal_model(data)
    try:
        nonce = os.urandom(32)
        kp = probe_key(attest_key(TOKEN), nonce)
        expected = blake3.blake3(data, key=kp).hexdigest()
        doc = mgr.attest(nonce, [shard], probe=True)
        assert doc["shards"][0]["probe"] == expected
        # The backend's segment table directly, keyed and unkeyed side by side in one batch.
        buf = mgr.device_buffer(shard)
        keyed, plain = mgr.store.backend.digest_many(
            [Segment(buf, n, "blake3", key=kp), Segment(buf, n, "blake3")]
        )
        assert keyed.hex() == expected and plain.hex() == blake3.blake3(data).hexdigest()
    finally:
        mgr.deallocate(shard)


def test_batched_attestation_of_several_shards_is_accepted(mgr: VramManager) -> None:
    datas = [_bytes(n, i) for i, n in enumerate([4097, 3 * MIB + 5, 65 * MIB])]
    shards = [
        mgr.seal_model(d, digest_algorithm=a)
        for d, a in zip(datas, ["sha256-tree-v1", "blake3", "sha256-tree-v1"], strict=True)
    ]
    try:
        nonce, t0 = os.urandom(48), time.time_ns()
        doc = mgr.attest(nonce, probe=True)
        kp = probe_key(attest_key(TOKEN), nonce)
        assert [s["probe"] for s in doc["shards"]] == [blake3.blake3(d, key=kp).hexdigest() for d in datas]
        check_attestation(doc, TOKEN, nonce, [s.record() for s in shards], t0, 60 * 10**9, probe=True)
    finally:
        for s in shards:
            mgr.deallocate(s)


def test_flipped_byte_in_vram_gives_mismatch(mgr: VramManager) -> None:
    shard = mgr.seal_model(_bytes(8 * MIB, 99))
    try:
        mgr.device_buffer(shard).write(5 * MIB + 3, b"\x00")
        with pytest.raises(AttestationMismatch) as ei:
            mgr.attest(os.urandom(16))
        assert ei.value.attestation["verdict"] == "mismatch"
        assert ei.value.shard_id == shard.shard_id
    finally:
        mgr.deallocate(shard)
