"""GPU digests are bit-identical to the host reference (formats.tree) on every length."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vram_residency.backends.base import Segment
from vram_residency.backends.cuda import CudaBackend
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1, UNIT_SIZE, HashResult, hash_units

pytestmark = pytest.mark.gpu

MiB = UNIT_SIZE
ALGS = (SHA256_TREE_V1, BLAKE3)

# Leaf, chunk and unit boundaries, partial last units of every shape the kernels branch on
# (blake3's last unit with 1, 2, 4 and 5 chunks), and a shard of more than one reduce group.
LENGTHS = [
    0,
    1,
    3,
    55,
    56,
    63,
    64,
    65,
    1023,
    1024,
    1025,
    2048,
    3073,
    4095,
    4096,
    4097,
    8191,
    12288,
    20481,
    MiB - 1,
    MiB,
    MiB + 1,
    2 * MiB,
    2 * MiB + 1,
    2 * MiB + 1025,
    2 * MiB + 3073,
    2 * MiB + 4097,
    3 * MiB + 4097,
    5 * MiB + 12345,
    17 * MiB + 1,
]


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def pattern(n: int) -> bytes:
    """The spec's P(n): bytes (i * 31 + 7) mod 256."""
    return ((np.arange(n, dtype=np.uint64) * 31 + 7) % 256).astype(np.uint8).tobytes()


def _gpu(backend: CudaBackend, data: bytes, alg: str) -> tuple[bytes, bytes, bytes]:
    buf = backend.allocate(max(1, len(data)))
    try:
        sealed = backend.write_and_hash(buf, data, alg)
        again = backend.hash(buf, alg, len(data))
        assert again == sealed
        return sealed.digest, sealed.unit_digests, backend.digest(buf, alg, len(data))
    finally:
        buf.close()


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("n", LENGTHS)
def test_bit_identical_to_host(cuda_backend: CudaBackend, alg: str, n: int) -> None:
    data = random_bytes(n, seed=n)
    want = hash_units(data, alg)
    digest, units, verify_digest = _gpu(cuda_backend, data, alg)
    assert units == want.unit_digests
    assert digest == want.digest
    assert verify_digest == want.digest


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize(
    "n", [0, 1, 4095, 4096, 4097, 131073, MiB - 1, MiB, MiB + 1, 3 * MiB + 4097, 17 * MiB + 1]
)
def test_sha256_both_unit_layouts(cuda_backend: CudaBackend, n: int, split: bool) -> None:
    """Small shards run eight 32-leaf blocks per unit, large ones one 256-leaf block: both, always."""
    data = random_bytes(n, seed=n + 11)
    saved = cuda_backend.split_max_units
    cuda_backend.split_max_units = 1 << 30 if split else 0
    try:
        digest, units, verify_digest = _gpu(cuda_backend, data, SHA256_TREE_V1)
    finally:
        cuda_backend.split_max_units = saved
    want = hash_units(data, SHA256_TREE_V1)
    assert (digest, units, verify_digest) == (want.digest, want.unit_digests, want.digest)


KiB = 1 << 10
# blake3_units_split's edges: one piece (a lone chunk takes ROOT; 1025 bytes: the block's final
# parent does), 128 KiB pieces with a partial last one (one chunk; one byte), one unit exactly,
# a unit and a piece, odd tails, and 66 / 67 units (the H200's default threshold and one past it;
# forced here, so split or not regardless of the device).
B3_SPLIT_LENGTHS = [
    0,
    1,
    1023,
    1024,
    1025,
    3073,
    128 * KiB - 1,
    128 * KiB,
    128 * KiB + 1,
    129 * KiB,
    129 * KiB + 1,
    MiB - 1,
    MiB,
    MiB + 1,
    MiB + 128 * KiB,
    2 * MiB + 4097,
    5 * MiB + 12345,
    66 * MiB,
    66 * MiB + 1,
    67 * MiB + 1025,
]


def _b3_paths(
    backend: CudaBackend, data: bytes, split: bool
) -> tuple[HashResult, str, HashResult, bytes, str]:
    """Seal (write_and_hash), hash and digest (verify) of ``data`` as blake3 with the split layout
    forced on or off, and the unit kernel that the seal and the verify ran."""
    n = len(data)
    saved = backend.blake3_split_max_units
    backend.blake3_split_max_units = 1 << 30 if split else 0
    buf = backend.allocate(max(1, n))
    try:
        sealed = backend.write_and_hash(buf, data, BLAKE3)
        seal_kernel = backend.last_units_kernel
        hashed = backend.hash(buf, BLAKE3, n)
        verified = backend.digest(buf, BLAKE3, n)
        verify_kernel = backend.last_units_kernel
    finally:
        buf.close()
        backend.blake3_split_max_units = saved
    return sealed, seal_kernel, hashed, verified, verify_kernel


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("n", B3_SPLIT_LENGTHS)
def test_blake3_both_unit_layouts(cuda_backend: CudaBackend, n: int, split: bool) -> None:
    """blake3 digests by 128 KiB pieces (blake3_units_split) and by 1 MiB units, both, always:
    bit-identical to the host reference, and the kernel the layout says."""
    data = random_bytes(n, seed=n + 13)
    want = hash_units(data, BLAKE3)
    sealed, seal_kernel, hashed, verified, verify_kernel = _b3_paths(cuda_backend, data, split)
    assert sealed == want
    assert hashed == want
    assert verified == want.digest
    assert verify_kernel == ("blake3_units_split" if split else "blake3_units")
    if n <= MiB:  # one unit: its unit digest is the digest, so the seal splits too
        assert seal_kernel == ("blake3_units_split" if split else "blake3_units")
    else:  # unit digests of units >= 1 need their own counters: never split
        assert seal_kernel == "blake3_units_standalone"


def test_blake3_split_default_threshold(cuda_backend: CudaBackend) -> None:
    """By default a verify splits up to half the SMs' count of units (66 on an H200) and runs one
    block per unit from one unit more."""
    t = cuda_backend.blake3_split_max_units
    assert t == max(1, cuda_backend.multiprocessors // 2)
    for n, kernel in ((t * MiB, "blake3_units_split"), (t * MiB + 1, "blake3_units")):
        data = random_bytes(n, seed=t)
        buf = cuda_backend.allocate(n)
        try:
            buf.write(0, data)
            assert cuda_backend.digest(buf, BLAKE3, n) == hash_units(data, BLAKE3).digest
            assert cuda_backend.last_units_kernel == kernel
            # A table of one unkeyed segment takes the same single-segment path.
            assert cuda_backend.digest_many([Segment(buf, n, BLAKE3)]) == [hash_units(data, BLAKE3).digest]
        finally:
            buf.close()


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("n", [0, 1, 1025, 128 * KiB + 1, MiB, MiB + 128 * KiB, 3 * MiB + 4097])
def test_blake3_split_leaves_keyed_and_table_paths(cuda_backend: CudaBackend, n: int, split: bool) -> None:
    """Keyed BLAKE3 and segment tables of several segments run the table kernels whatever the
    split threshold says; a single-segment verify in between (split or not) leaves them exact."""
    key = bytes(range(32))
    data = random_bytes(n, seed=n + 17)
    plain, keyed = hash_units(data, BLAKE3), hash_units(data, BLAKE3, key=key)
    saved = cuda_backend.blake3_split_max_units
    cuda_backend.blake3_split_max_units = 1 << 30 if split else 0
    buf = cuda_backend.allocate(max(1, n))
    try:
        buf.write(0, data)
        segs = [Segment(buf, n, BLAKE3, key), Segment(buf, n, BLAKE3)]
        assert cuda_backend.digest(buf, BLAKE3, n) == plain.digest
        assert cuda_backend.hash_many(segs) == [keyed, plain]
        assert cuda_backend.digest_many(segs) == [keyed.digest, plain.digest]
        assert cuda_backend.hash(buf, BLAKE3, n, key=key) == keyed
        assert cuda_backend.digest(buf, BLAKE3, n, key=key) == keyed.digest
        assert cuda_backend.write_and_hash(buf, data, BLAKE3, key=key) == keyed
    finally:
        buf.close()
        cuda_backend.blake3_split_max_units = saved


@pytest.mark.parametrize(
    ("n", "hexdigest"),
    [
        (4096, "2ef4a69a251c059b70d2e2b7aab99bf8bcb0a1822d208604dcc0b1dd501c2d23"),
        (4097, "5e1fd3dc2db57d1b502c092c8851726417dea5bda061ba6b8987bb7f885580b5"),
        (12288, "4ce8a6713e2cbf90adb1a8b539c84b1512c7450fe7895619e8bcdd5bb805803f"),
        (20481, "ffcdcd1f12bcb420959af918506ad32aebd2bea01e69c08e48065db574fa6833"),
        (1048576, "34bc5f0978eec0aeccac1445e6a9adda7494a3ee898ee4ee94ce128e91970c16"),
    ],
)
def test_spec_known_answers(cuda_backend: CudaBackend, n: int, hexdigest: str) -> None:
    digest, _, verify_digest = _gpu(cuda_backend, pattern(n), SHA256_TREE_V1)
    assert digest.hex() == hexdigest
    assert verify_digest.hex() == hexdigest


@pytest.mark.parametrize(
    ("data", "hexdigest"),
    [
        (b"", "37e2f51ed116754f5bccd9726e3adb0b4c84af27df70df0fe0684b022975db58"),
        (b"abc", "16889f98eeb0e2e16ee2e640cb6eea840349415a15a1c2a69d6766f0b0b3d896"),
    ],
)
def test_spec_small_answers(cuda_backend: CudaBackend, data: bytes, hexdigest: str) -> None:
    assert _gpu(cuda_backend, data, SHA256_TREE_V1)[0].hex() == hexdigest


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(min_value=0, max_value=3 * MiB + 5000), seed=st.integers(0, 2**32 - 1))
def test_random_lengths(cuda_backend: CudaBackend, n: int, seed: int) -> None:
    data = random_bytes(n, seed)
    for alg in ALGS:
        want = hash_units(data, alg)
        digest, units, verify_digest = _gpu(cuda_backend, data, alg)
        assert (digest, units, verify_digest) == (want.digest, want.unit_digests, want.digest)


@pytest.mark.parametrize("alg", ALGS)
def test_length_shorter_than_buffer(cuda_backend: CudaBackend, alg: str) -> None:
    data = random_bytes(3 * MiB + 999, seed=7)
    buf = cuda_backend.allocate(len(data))
    try:
        buf.write(0, data)
        for n in (0, 1, 4097, MiB, 2 * MiB + 5, len(data)):
            assert cuda_backend.hash(buf, alg, n) == hash_units(data[:n], alg)
        assert cuda_backend.hash(buf, alg) == hash_units(data, alg)
    finally:
        buf.close()


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("split", [False, True])
def test_multi_level_reduction(cuda_backend: CudaBackend, alg: str, split: bool) -> None:
    """301 units: two reduce launches above the unit kernel (groups of 256)."""
    data = random_bytes(300 * MiB + 4097, seed=301)
    want = hash_units(data, alg)
    saved = cuda_backend.split_max_units
    cuda_backend.split_max_units = 1 << 30 if split else 0
    try:
        digest, units, verify_digest = _gpu(cuda_backend, data, alg)
    finally:
        cuda_backend.split_max_units = saved
    assert units == want.unit_digests
    assert digest == verify_digest == want.digest


def _sha_reduce(nodes: list[bytes]) -> bytes:
    while len(nodes) > 1:
        nxt = [
            hashlib.sha256(nodes[i] + nodes[i + 1] + b"\x01").digest() for i in range(0, len(nodes) - 1, 2)
        ]
        if len(nodes) % 2:
            nxt.append(nodes[-1])
        nodes = nxt
    return nodes[0]


_B3_IV = np.array(
    [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19],
    dtype=np.uint32,
)
_B3_PERM = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8]


def _b3_parents(left: np.ndarray, right: np.ndarray, flags: int) -> np.ndarray:
    """BLAKE3 compressions of many 64-byte blocks (left || right, arrays of shape (k, 8)) with key IV,
    counter 0 and block length 64: parent nodes when flags hold PARENT."""
    k = left.shape[0]

    def rotr(x: np.ndarray, n: int) -> np.ndarray:
        return (x >> np.uint32(n)) | (x << np.uint32(32 - n))

    m = [c for c in np.concatenate([left, right], axis=1).T.copy()]
    v = [np.full(k, w, dtype=np.uint32) for w in _B3_IV] + [
        np.full(k, w, dtype=np.uint32) for w in _B3_IV[:4]
    ]
    v += [
        np.zeros(k, np.uint32),
        np.zeros(k, np.uint32),
        np.full(k, 64, np.uint32),
        np.full(k, flags, np.uint32),
    ]

    def g(a: int, b: int, c: int, d: int, x: np.ndarray, y: np.ndarray) -> None:
        v[a] = v[a] + v[b] + x
        v[d] = rotr(v[d] ^ v[a], 16)
        v[c] = v[c] + v[d]
        v[b] = rotr(v[b] ^ v[c], 12)
        v[a] = v[a] + v[b] + y
        v[d] = rotr(v[d] ^ v[a], 8)
        v[c] = v[c] + v[d]
        v[b] = rotr(v[b] ^ v[c], 7)

    for r in range(7):
        g(0, 4, 8, 12, m[0], m[1])
        g(1, 5, 9, 13, m[2], m[3])
        g(2, 6, 10, 14, m[4], m[5])
        g(3, 7, 11, 15, m[6], m[7])
        g(0, 5, 10, 15, m[8], m[9])
        g(1, 6, 11, 12, m[10], m[11])
        g(2, 7, 8, 13, m[12], m[13])
        g(3, 4, 9, 14, m[14], m[15])
        if r < 6:
            m = [m[p] for p in _B3_PERM]
    return np.stack([v[i] ^ v[i + 8] for i in range(8)], axis=1)


def _b3_reduce(nodes: np.ndarray) -> bytes:
    with np.errstate(over="ignore"):
        while nodes.shape[0] > 1:
            pairs = nodes.shape[0] // 2
            flags = 4 | (8 if nodes.shape[0] == 2 else 0)
            up = _b3_parents(nodes[0 : 2 * pairs : 2], nodes[1 : 2 * pairs : 2], flags)
            nodes = np.concatenate([up, nodes[2 * pairs :]]) if nodes.shape[0] % 2 else up
    out: bytes = nodes[0].astype("<u4").tobytes()
    return out


@pytest.mark.parametrize("count", [2, 3, 255, 256, 257, 65536 + 300])
def test_reduce_kernels(cuda_backend: CudaBackend, count: int) -> None:
    """The kernels' reduction above the units, with three levels of groups at the largest count
    (a 64 GiB shard's worth of unit values, without the 64 GiB)."""
    raw = random_bytes(32 * count, seed=count)
    nodes = [raw[i : i + 32] for i in range(0, len(raw), 32)]
    assert cuda_backend._reduce_nodes(SHA256_TREE_V1, raw) == _sha_reduce(nodes)
    words = np.frombuffer(raw, dtype="<u4").reshape(count, 8).astype(np.uint32)
    assert cuda_backend._reduce_nodes(BLAKE3, raw) == _b3_reduce(words)


def test_numpy_blake3_compression_matches_package() -> None:
    """The NumPy compression used as the reference above is BLAKE3's: with the flags of a
    one-block message (CHUNK_START | CHUNK_END | ROOT) it gives the blake3 package's digest."""
    import blake3

    data = random_bytes(64 * 5, seed=3)
    words = np.frombuffer(data, dtype="<u4").reshape(5, 16).astype(np.uint32)
    with np.errstate(over="ignore"):
        out = _b3_parents(words[:, :8], words[:, 8:], flags=1 | 2 | 8)
    for i in range(5):
        assert out[i].astype("<u4").tobytes() == blake3.blake3(data[64 * i : 64 * i + 64]).digest()


@pytest.mark.parametrize("alg", ALGS)
def test_seal_from_pinned_memory(cuda_backend: CudaBackend, alg: str) -> None:
    n = 130 * MiB + 77  # three staging-sized chunks, copied directly from pinned memory
    data = random_bytes(n, seed=130)
    with cuda_backend.pinned_host_buffer(n) as pinned:
        pinned.array[:] = np.frombuffer(data, dtype=np.uint8)
        buf = cuda_backend.allocate(n)
        try:
            got = cuda_backend.write_and_hash(buf, pinned.view, alg)
            assert got == hash_units(data, alg)
            assert buf.read(n - 100, 100) == data[-100:]
        finally:
            buf.close()


def test_staged_write_round_trip(cuda_backend: CudaBackend) -> None:
    n = 200 * MiB + 5  # pageable source: several 64 MiB staging rounds, both buffers reused
    data = bytearray(random_bytes(n, seed=200))
    buf = cuda_backend.allocate(n + 3)
    try:
        buf.write(3, data)
        assert buf.read(0, 3) == b"\x00\x00\x00"
        for off in (0, 64 * MiB - 1, 64 * MiB, 128 * MiB + 12345, n - 64):
            assert buf.read(3 + off, 64) == bytes(data[off : off + 64])
        assert cuda_backend.hash(buf, SHA256_TREE_V1, n + 3) == hash_units(b"\x00" * 3 + data, SHA256_TREE_V1)
    finally:
        buf.close()


def test_concurrent_hashing(cuda_backend: CudaBackend) -> None:
    datas = [random_bytes(3 * MiB + i * 4097, seed=i) for i in range(4)]
    bufs = [cuda_backend.allocate(len(d)) for d in datas]
    errors: list[BaseException] = []
    try:
        for b, d in zip(bufs, datas, strict=True):
            b.write(0, d)
        wants = [{a: hash_units(d, a) for a in ALGS} for d in datas]

        def work(i: int) -> None:
            try:
                for _ in range(5):
                    for a in ALGS:
                        assert cuda_backend.hash(bufs[i], a) == wants[i][a]
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    finally:
        for b in bufs:
            b.close()
