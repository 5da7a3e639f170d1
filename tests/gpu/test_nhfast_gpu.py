"""nh-fast-v1 on the GPU: the kernels equal the host paths (and the pure-Python reference) at every
edge length, and detection holds over fresh keys: 10^6 random single-bit flips, each under its own
key, and every structured change of the spec's security section under 10^4 keys each."""

from __future__ import annotations

import os

import numpy as np
import pytest

from vram_residency.backends.base import Priority
from vram_residency.backends.cuda import CudaBackend, _nh_fast, open_backend
from vram_residency.backends.cuda._nh_fast import key_trials, nh_fast_digest, nh_fast_hash
from vram_residency.errors import InvalidInput
from vram_residency.formats import nhfast, tree

pytestmark = pytest.mark.gpu

MIB = 1 << 20
LENGTHS = [
    0,
    1,
    7,
    8,
    15,
    16,
    17,
    4095,
    4096,
    4097,
    8191,
    12288 + 5,
    MIB - 1,
    MIB,
    MIB + 1,
    2 * MIB + 4097,
    5 * MIB + 12345,
    17 * MIB + 1,
]


def _bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def _gpu_hash(backend: CudaBackend, data: bytes, key: bytes) -> tree.HashResult:
    buf = backend.allocate(max(1, len(data)))
    try:
        if data:
            buf.write(0, data)
        got = nh_fast_hash(backend, buf.device_pointer, len(data), key)
        # The verify path finishes the digest on the device (nhf_finalize): the same bytes.
        assert nh_fast_digest(backend, buf.device_pointer, len(data), key) == got.digest
        return got
    finally:
        buf.close()


@pytest.mark.parametrize("n", LENGTHS)
def test_kernels_equal_host(cuda_backend: CudaBackend, n: int, device_finish_always: None) -> None:
    data, key = _bytes(n, n + 1), os.urandom(32)
    got = _gpu_hash(cuda_backend, data, key)
    assert got == tree.hash_units(data, tree.NH_FAST_V1, key=key)
    if n <= 3 * 4096:
        assert (got.digest, got.unit_digests) == nhfast.reference_hash(data, key)


def test_spec_known_answer(cuda_backend: CudaBackend) -> None:
    data = bytes((i * 31 + 7) % 256 for i in range(4097))
    got = _gpu_hash(cuda_backend, data, bytes(range(32)))
    assert got.digest.hex() == "b1db44a3ca5d6f9d7bf7c610195cd2f8efcf041a161be4cfe72c224b01a8ff67"


@pytest.mark.parametrize(
    "defines",
    [
        {"NHF_INFLIGHT": "1"},
        {"NHF_INFLIGHT": "3", "NHF_MIN_BLOCKS": "1"},
        {"NHF_INFLIGHT": "4"},
        {"NHF_PIPELINE": "1"},
        {"NHF_PIPELINE": "1", "NHF_MIN_BLOCKS": "1"},
    ],
)
def test_tuning_variants_agree(defines: dict[str, str]) -> None:
    data, key = _bytes(3 * MIB + 4097, 9), os.urandom(32)
    with open_backend(0, kernel_defines={"nh_fast": defines}) as backend:
        assert _gpu_hash(backend, data, key) == tree.hash_units(data, tree.NH_FAST_V1, key=key)


def test_rejects_bad_keys_and_alignment(cuda_backend: CudaBackend) -> None:
    from vram_residency.errors import InvalidInput

    buf = cuda_backend.allocate(4096)
    try:
        with pytest.raises(InvalidInput):
            nh_fast_hash(cuda_backend, buf.device_pointer, 4096, b"short")
        with pytest.raises(InvalidInput, match="aligned"):
            nh_fast_hash(cuda_backend, buf.device_pointer + 4, 100, bytes(32))
    finally:
        buf.close()


def _nh_keys(count: int) -> bytes:
    # Fresh keys through the real key schedule: each trial's NH key is BLAKE3-XOF output of a new
    # random 32-byte key, exactly as a shard key would give.
    return b"".join(nhfast.key_schedule(os.urandom(32)).nh_key for _ in range(count))


def _host_tags(msg: bytes, nh_key: bytes) -> bytes:
    return (
        nhfast._numpy_tags(memoryview(msg), nh_key)
        if len(msg) <= 4096
        else b"".join(
            nhfast._numpy_tags(memoryview(msg[i : i + 4096]), nh_key) for i in range(0, len(msg), 4096)
        )
    )


def test_million_single_bit_flips_each_with_a_fresh_key(cuda_backend: CudaBackend) -> None:
    batch, batches = 50_000, 20
    rng = np.random.default_rng(15)
    total = 0
    for i in range(batches):
        leaf = _bytes(4096, 100 + i)
        keys = _nh_keys(batch)
        flips = rng.integers(0, 8 * 4096, size=batch, dtype=np.uint32)
        ta_raw, tb_raw = key_trials(cuda_backend, leaf, keys, flips=flips.astype("<u4").tobytes())
        ta = np.frombuffer(ta_raw, dtype="<u8").reshape(batch, 3)
        tb = np.frombuffer(tb_raw, dtype="<u8").reshape(batch, 3)
        undetected = int(np.all(ta == tb, axis=1).sum())
        assert undetected == 0, f"batch {i}: {undetected} flips not detected"
        # The trial kernel computes real tags: spot-check against the host path.
        for j in rng.integers(0, batch, size=50):
            k = keys[5120 * int(j) : 5120 * (int(j) + 1)]
            flipped = bytearray(leaf)
            flipped[int(flips[j]) >> 3] ^= 1 << (int(flips[j]) & 7)
            assert ta_raw[24 * int(j) : 24 * int(j) + 24] == _host_tags(leaf, k)
            assert tb_raw[24 * int(j) : 24 * int(j) + 24] == _host_tags(bytes(flipped), k)
        total += batch
    assert total == 10**6


def _structured(data: bytes) -> dict[str, bytes]:
    arr = np.frombuffer(data, dtype=np.uint8)
    out: dict[str, bytes] = {}
    one = arr.copy()
    one[5000] ^= 0x10
    out["single flip"] = one.tobytes()
    opp = arr.copy()
    i = int(np.flatnonzero((arr[:4096] & 1) == 0)[0])
    j = 3 * 4096 + int(np.flatnonzero((arr[3 * 4096 : 4 * 4096] & 1) == 1)[0])
    opp[i] |= 1
    opp[j] &= 0xFE
    out["two opposite flips in two leaves"] = opp.tobytes()
    leaves = arr.reshape(-1, 4096).copy()
    leaves[[1, 6]] = leaves[[6, 1]]
    out["swapped leaves"] = leaves.tobytes()
    out["shifted range (1 byte)"] = data[:8192] + data[8193:20000] + data[8192:8193] + data[20000:]
    out["shifted range (16 bytes)"] = data[:4096] + data[4112:16384] + data[4096:4112] + data[16384:]
    zero = arr.copy()
    zero[2 * 4096 : 3 * 4096] = 0
    out["zeroed page"] = zero.tobytes()
    return out


def test_structured_changes_over_ten_thousand_keys(cuda_backend: CudaBackend) -> None:
    data = _bytes(8 * 4096, 77)
    count = 10_000
    for name, changed in _structured(data).items():
        keys = _nh_keys(count)
        ta_raw, tb_raw = key_trials(cuda_backend, data, keys, b=changed)
        ta = np.frombuffer(ta_raw, dtype="<u8").reshape(count, 8, 3)
        tb = np.frombuffer(tb_raw, dtype="<u8").reshape(count, 8, 3)
        undetected = int(np.all(ta == tb, axis=(1, 2)).sum())
        assert undetected == 0, f"{name}: {undetected} of {count} keys missed it"
        # Unchanged leaves keep their tags (positions that differ are exactly the changed leaves).
        same = np.all(ta == tb, axis=2)
        changed_leaves = [
            k for k in range(8) if data[4096 * k : 4096 * (k + 1)] != changed[4096 * k : 4096 * (k + 1)]
        ]
        assert not same[:, changed_leaves].any(), name
        assert same[:, [k for k in range(8) if k not in changed_leaves]].all(), name


def test_structured_changes_end_to_end(cuda_backend: CudaBackend) -> None:
    # The whole path (leaf kernel, unit kernel, host finalize) on a multi-unit shard.
    base = _bytes(2 * MIB + 8 * 4096, 78)
    for _ in range(10):
        key = os.urandom(32)
        ref = _gpu_hash(cuda_backend, base, key)
        for name, changed_head in _structured(base[: 8 * 4096]).items():
            changed = changed_head + base[8 * 4096 :]
            got = _gpu_hash(cuda_backend, changed, key)
            assert got.digest != ref.digest, name
            assert got.unit(0) != ref.unit(0) and got.unit_digests[32:] == ref.unit_digests[32:], name


# -- the launcher on the backend's kernel session (cuda.core streams and events) ----------------


def test_kernel_session_is_the_locked_compute_lane_and_ends_with_its_block(cuda_backend: CudaBackend) -> None:
    import threading

    from vram_residency.backends.cuda._nh_fast import module_for
    from vram_residency.errors import IntegrityViolation

    entered = threading.Event()

    def other() -> None:
        with cuda_backend.kernel_session():
            entered.set()

    with cuda_backend.kernel_session() as ks:
        # The backend's lock is held: another thread's session waits for this block to end.
        t = threading.Thread(target=other)
        t.start()
        assert not entered.wait(0.3)
        assert ks.multiprocessors == cuda_backend.multiprocessors
        assert ks.blocks_per_sm(module_for(ks), "nhf_leaf_tags", 256) >= 1
        assert ks.scratch(4096) % 256 == 0
        with ks.temporary(1000) as p:
            assert p % 256 == 0 and p != ks.scratch(4096)
    t.join(10)
    assert entered.is_set()
    for use in (lambda: ks.stream, lambda: ks.scratch(1), lambda: ks.result_buffer(1)):
        with pytest.raises(IntegrityViolation, match="after its with block"):
            use()
    cuda_backend.last_device_seconds = 0.0
    data, key = _bytes(3 * MIB + 5, 9), os.urandom(32)
    assert _gpu_hash(cuda_backend, data, key) == tree.hash_units(data, tree.NH_FAST_V1, key=key)
    assert cuda_backend.last_device_seconds > 0.0  # Event arithmetic around the kernels
    assert cuda_backend.last_units_kernel == _nh_fast.UNFUSED_KERNEL  # FUSED_UNITS is off by default


# -- nh-fast-v1 through the CUDA backend's dispatch and the seal core (issue 15 items 1 and 4) -----

_TOKEN = "nh-fast-gpu-manager-token-0123456789"


def test_backend_tables_mix_nh_fast_with_the_batched_algorithms(cuda_backend: CudaBackend) -> None:
    from vram_residency.backends.base import Segment

    lengths = [1, 4097, MIB, 3 * MIB + 5]
    payloads = [_bytes(n, 100 + n) for n in lengths]
    bufs = [cuda_backend.allocate(n) for n in lengths]
    try:
        for b, p in zip(bufs, payloads, strict=True):
            b.write(0, p)
        segs, want = [], []
        for b, p in zip(bufs, payloads, strict=True):
            key = os.urandom(32)
            for alg, k in ((tree.SHA256_TREE_V1, None), (tree.NH_FAST_V1, key), (tree.BLAKE3, None)):
                segs.append(Segment(b, len(p), alg, k))
                want.append(tree.hash_units(p, alg, key=k))
        assert cuda_backend.hash_many(segs) == want
        assert cuda_backend.digest_many(segs) == [w.digest for w in want]
        assert cuda_backend.digest_many(segs, priority="low") == [w.digest for w in want]
        one = segs[1]
        assert cuda_backend.hash(one.buf, one.algorithm, one.length, key=one.key) == want[1]
        assert cuda_backend.digest(one.buf, one.algorithm, one.length, key=one.key) == want[1].digest
    finally:
        for b in bufs:
            b.close()


@pytest.mark.parametrize("n", [1, 4097, MIB + 1, 300 * MIB + 12345])
def test_write_and_hash_nh_fast_overlapped(cuda_backend: CudaBackend, n: int) -> None:
    data, key = _bytes(n, n), os.urandom(32)
    buf = cuda_backend.allocate(n)
    try:
        got = cuda_backend.write_and_hash(buf, data, tree.NH_FAST_V1, key=key)
        assert got == tree.hash_units(data, tree.NH_FAST_V1, key=key)
        assert buf.read(n - 1, 1) == data[-1:]
    finally:
        buf.close()


def test_manager_seal_verify_flip_with_nh_fast_equals_host() -> None:
    from vram_residency import VramManager
    from vram_residency.errors import SealVerificationFailed
    from vram_residency.formats import keys

    worker = nhfast.manager_key(keys.token_bytes(_TOKEN))
    with VramManager(_TOKEN, backend="cuda") as m:
        assert m.store.fast_check  # on by default on a real device
        payloads = [_bytes(5 * MIB + 3, 1), _bytes(2 * MIB, 2), _bytes(4096 * 3 + 1, 3)]
        s_nh = m.seal_model(payloads[0], digest_algorithm=tree.NH_FAST_V1)
        s_sha = m.seal_model(payloads[1])
        s_b3 = m.seal_model(payloads[2], digest_algorithm=tree.BLAKE3)
        shards = [s_nh, s_sha, s_b3]
        # The host backend's digest for the same token and shard id (the orchestrator's too).
        for s, p in zip(shards, payloads, strict=True):
            want = tree.hash_units(p, tree.NH_FAST_V1, key=nhfast.shard_key(worker, s.shard_id))
            assert m.store.lookup(s).fast_digest == want.digest
        assert (
            s_nh.digest
            == tree.hash_units(
                payloads[0], tree.NH_FAST_V1, key=nhfast.shard_key(worker, s_nh.shard_id)
            ).digest.hex()
        )
        m.verify_sealed(s_nh)
        m.verify_many(shards)
        m.verify_many(shards, check="fast")
        buf = m.device_buffer(s_nh)
        at = 4 * MIB + 99
        buf.write(at, bytes([buf.read(at, 1)[0] ^ 0x10]))
        with pytest.raises(SealVerificationFailed) as info:
            m.verify_many(shards)
        assert info.value.shard_ids == [s_nh.shard_id]
        assert list(info.value.corrupted_ranges) == [(4 * MIB, 5 * MIB)]
        buf2 = m.device_buffer(s_sha)
        buf2.write(7, bytes([buf2.read(7, 1)[0] ^ 0x01]))
        with pytest.raises(SealVerificationFailed) as info:
            m.verify_many([s_sha, s_b3], check="fast")
        assert info.value.shard_ids == [s_sha.shard_id]
        assert list(info.value.corrupted_ranges) == [(0, MIB)]


def test_unaligned_device_memory_is_refused_before_any_digest(cuda_backend: CudaBackend) -> None:
    # Every kernel loads 16 bytes at a time: the backend refuses to adopt memory that is not
    # 16-byte aligned at the door, so no digest (nh-fast-v1's included) ever runs on it. (This
    # test first expected the adoption to succeed and only the nh-fast digest to refuse; the H200
    # run showed the earlier, stricter refusal, which is the policy.)
    buf = cuda_backend.allocate(MIB + 64)
    try:
        with pytest.raises(InvalidInput, match="16-byte aligned"):
            cuda_backend.adopt_pointer(buf.device_pointer + 4, MIB)
    finally:
        buf.close()


@pytest.fixture
def device_finish_always(monkeypatch: pytest.MonkeyPatch) -> None:
    # The verify path finishes on the device only from DEVICE_FINISH_UNITS units on (4 GiB);
    # the tests make it do so at every size.
    monkeypatch.setattr(_nh_fast, "DEVICE_FINISH_UNITS", 1)


@pytest.mark.parametrize("units", [1, 31, 32, 33, 97, 600])
def test_device_finalize_over_many_units(
    cuda_backend: CudaBackend, units: int, device_finish_always: None
) -> None:
    # nhf_finalize's top-level tree beyond one 1 KiB chunk of unit digests (31 units and the
    # length fit one; 600 give 19 chunks and five levels) equals the host's finish.
    n = (units - 1) * tree.UNIT_SIZE + 4097
    key = os.urandom(32)
    buf = cuda_backend.allocate(n)
    try:
        buf.write(0, _bytes(n, units))
        got = nh_fast_hash(cuda_backend, buf.device_pointer, n, key)
        assert nh_fast_digest(cuda_backend, buf.device_pointer, n, key) == got.digest
        assert got.digest == nhfast.finalize(nhfast.key_schedule(key), got.unit_digests, n)
    finally:
        buf.close()


# -- the fused unit digests (nhf_leaf_tags_units) against the two-launch path and the host ------

FUSE_LENGTHS = [
    0,
    1,
    15,
    16,
    4095,
    4096,
    4097,
    MIB - 1,
    MIB,
    MIB + 1,
    255 * 4096,
    256 * 4096,
    257 * 4096,
    2 * MIB + 1,  # two units and one leaf
    7 * MIB + 3 * 4096 + 77,  # an odd multi-unit length
]


@pytest.fixture(params=[True, False], ids=["fused", "unfused"])
def fused(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(_nh_fast, "FUSED_UNITS", request.param)
    return bool(request.param)


@pytest.mark.parametrize("n", FUSE_LENGTHS)
def test_fused_and_unfused_equal_host(
    cuda_backend: CudaBackend, n: int, fused: bool, device_finish_always: None
) -> None:
    data, key = _bytes(n, n + 3), os.urandom(32)
    got = _gpu_hash(cuda_backend, data, key)
    assert got == tree.hash_units(data, tree.NH_FAST_V1, key=key)
    assert cuda_backend.last_units_kernel == (_nh_fast.FUSED_KERNEL if fused else _nh_fast.UNFUSED_KERNEL)


def test_fused_equals_unfused_and_host_at_one_gib(cuda_backend: CudaBackend) -> None:
    n = 1 << 30
    data, key = _bytes(n, 30), os.urandom(32)
    want = tree.hash_units(data, tree.NH_FAST_V1, key=key)
    buf = cuda_backend.allocate(n)
    try:
        buf.write(0, data)
        for on in (True, False):
            _nh_fast.FUSED_UNITS = on
            try:
                assert nh_fast_hash(cuda_backend, buf.device_pointer, n, key) == want
                assert nh_fast_digest(cuda_backend, buf.device_pointer, n, key) == want.digest
            finally:
                _nh_fast.FUSED_UNITS = False  # the default
    finally:
        buf.close()


def test_fused_counters_are_cleared_whatever_the_scratch_held(cuda_backend: CudaBackend) -> None:
    # The scratch buffer is shared with the other digests: fill all of it with 0xFF (as an aborted
    # launch or another digest might leave it), then hash twice; the job's memset must clear the
    # counters each time (stale counts would finish units early, or never).
    from cuda.bindings import driver as drv

    n = 3 * MIB + 4097
    data, key = _bytes(n, 5), os.urandom(32)
    want = tree.hash_units(data, tree.NH_FAST_V1, key=key)
    buf = cuda_backend.allocate(n)
    try:
        buf.write(0, data)
        for _ in range(2):
            with cuda_backend.kernel_session() as ks:
                size = _nh_fast.scratch_bytes(n)
                (err,) = drv.cuMemsetD8(ks.scratch(size), 0xFF, size)
                assert err == drv.CUresult.CUDA_SUCCESS
            assert nh_fast_hash(cuda_backend, buf.device_pointer, n, key) == want
    finally:
        buf.close()


@pytest.mark.parametrize("n", [1, 4097, MIB, MIB + 1, 2 * MIB + 4096 + 1, 37 * MIB + 12345])
def test_seal_path_chunked_launches(cuda_backend: CudaBackend, n: int, fused: bool) -> None:
    # write_and_hash queues each landed unit's leaves as the copy stream lands them (several
    # leaf launches per shard, each of whole units); fused, each launch also finishes its units.
    data, key = _bytes(n, n + 11), os.urandom(32)
    buf = cuda_backend.allocate(n)
    try:
        got = cuda_backend.write_and_hash(buf, data, tree.NH_FAST_V1, key=key)
        assert got == tree.hash_units(data, tree.NH_FAST_V1, key=key)
        assert cuda_backend.last_units_kernel == (_nh_fast.FUSED_KERNEL if fused else _nh_fast.UNFUSED_KERNEL)
    finally:
        buf.close()


def test_tables_of_mixed_lengths(cuda_backend: CudaBackend, fused: bool, device_finish_always: None) -> None:
    from vram_residency.backends.base import Segment

    lengths = [0, 1, 4095, 4097, 255 * 4096, 257 * 4096, MIB, 2 * MIB + 1, 5 * MIB + 12345]
    payloads = [_bytes(n, 200 + n) for n in lengths]
    bufs = [cuda_backend.allocate(max(1, n)) for n in lengths]
    try:
        segs, want = [], []
        for b, p in zip(bufs, payloads, strict=True):
            if p:
                b.write(0, p)
            key = os.urandom(32)
            segs.append(Segment(b, len(p), tree.NH_FAST_V1, key))
            want.append(tree.hash_units(p, tree.NH_FAST_V1, key=key))
        assert cuda_backend.hash_many(segs) == want
        assert cuda_backend.digest_many(segs) == [w.digest for w in want]
        assert cuda_backend.digest_many(segs, priority="low") == [w.digest for w in want]
    finally:
        for b in bufs:
            b.close()


# -- background verification: nh-fast-v1 on the low lane -----------------------------------------


def test_low_priority_runs_on_the_low_lane_beside_a_held_backend_lock(cuda_backend: CudaBackend) -> None:
    """``priority="low"`` (the scrubber's fast check) gives the normal digests, on the low lane's
    stream, buffers and lock: a thread holding the backend's lock (a foreground verify) does not
    hold it up, and it runs on a share of the SMs (``_LOW_SM_DIVISOR``)."""
    import threading

    from vram_residency.backends.base import Segment
    from vram_residency.backends.cuda._backend import _LOW_SM_DIVISOR

    sizes = [5 * MIB + 3, 4097, 1]
    bufs = [cuda_backend.allocate(n) for n in sizes]
    try:
        segs = []
        for i, (buf, n) in enumerate(zip(bufs, sizes, strict=True)):
            buf.write(0, _bytes(n, 40 + i))
            segs.append(Segment(buf, n, tree.NH_FAST_V1, os.urandom(32)))
        want = cuda_backend.digest_many(segs)
        assert cuda_backend.digest_many(segs, priority="low") == want  # loads what it needs once
        assert [r.digest for r in cuda_backend.hash_many(segs, priority="low")] == want
        with cuda_backend.kernel_session("low") as ks:
            assert ks.multiprocessors == max(1, cuda_backend.multiprocessors // _LOW_SM_DIVISOR)
            assert ks.stream is not cuda_backend._stream
        got: list[list[bytes]] = []
        with cuda_backend._lock:  # a foreground verify in progress
            t = threading.Thread(target=lambda: got.append(cuda_backend.digest_many(segs, priority="low")))
            t.start()
            t.join(60)
            assert not t.is_alive(), "the low lane waited for the backend's lock"
        assert got == [want]
        # A corrupted byte changes exactly its segment's digest on the low lane too.
        bufs[0].write(MIB + 7, bytes([bufs[0].read(MIB + 7, 1)[0] ^ 0x10]))
        low = cuda_backend.digest_many(segs, priority="low")
        assert low[0] != want[0] and low[1:] == want[1:]
    finally:
        for buf in bufs:
            buf.close()


# -- CUDA graphs of repeated calls (_graphs.GraphCache) ---------------------------------------------


@pytest.mark.parametrize("priority", ["normal", "low"])
def test_repeated_tables_run_as_graphs_and_read_the_live_bytes(
    cuda_backend: CudaBackend, priority: Priority, device_finish_always: None
) -> None:
    """The same table verified again and again: the first calls enqueue directly, a later one is
    captured, and the rest are one graph launch each; every result equals the host path's. The
    graph reads the data when it runs: after a flipped bit the replay gives the new digest."""
    from vram_residency.backends.base import Segment

    sizes = [3 * MIB + 4097, 4096, 17, 2 * MIB]
    bufs = [cuda_backend.allocate(n) for n in sizes]
    try:
        payloads = [bytearray(_bytes(n, 70 + i)) for i, n in enumerate(sizes)]
        keys = [os.urandom(32) for _ in sizes]
        for b, p in zip(bufs, payloads, strict=True):
            b.write(0, bytes(p))
        segs = [Segment(b, len(p), tree.NH_FAST_V1, k) for b, p, k in zip(bufs, payloads, keys, strict=True)]

        def want() -> list[bytes]:
            return [
                tree.hash_units(bytes(p), tree.NH_FAST_V1, key=k).digest
                for p, k in zip(payloads, keys, strict=True)
            ]

        with cuda_backend.kernel_session(priority) as ks:
            graphs = ks.graphs
            launched0, captured0 = graphs.launched, graphs.captured
        expected = want()
        for _ in range(6):
            assert cuda_backend.digest_many(segs, priority=priority) == expected
        assert graphs.captured == captured0 + 1
        assert graphs.launched >= launched0 + 4
        payloads[0][MIB + 5] ^= 0x10
        bufs[0].write(MIB + 5, bytes([payloads[0][MIB + 5]]))
        expected2 = want()
        assert expected2[0] != expected[0]
        launched = graphs.launched
        assert cuda_backend.digest_many(segs, priority=priority) == expected2
        assert graphs.launched == launched + 1  # the replay, not a new capture
        # With the keys changed (fresh keys, same addresses): the same graph, the new keys' digests.
        keys[:] = [os.urandom(32) for _ in sizes]
        segs = [Segment(b, len(p), tree.NH_FAST_V1, k) for b, p, k in zip(bufs, payloads, keys, strict=True)]
        assert cuda_backend.digest_many(segs, priority=priority) == want()
        assert graphs.launched == launched + 2
    finally:
        for b in bufs:
            b.close()


def test_single_shard_verify_path_as_a_graph_equals_the_direct_path(
    cuda_backend: CudaBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 64 * MIB + 12345
    data, key = _bytes(n, 5), os.urandom(32)
    buf = cuda_backend.allocate(n)
    try:
        buf.write(0, data)
        want = tree.hash_units(data, tree.NH_FAST_V1, key=key).digest
        for finish in (1, 1 << 30):  # the device finish, and the host finish of the unit digests
            monkeypatch.setattr(_nh_fast, "DEVICE_FINISH_UNITS", finish)
            assert [nh_fast_digest(cuda_backend, buf.device_pointer, n, key) for _ in range(5)] == [want] * 5
        monkeypatch.setattr(_nh_fast, "GRAPHS", False)
        assert nh_fast_digest(cuda_backend, buf.device_pointer, n, key) == want
    finally:
        buf.close()
