"""Drive every kernel path over small shards, for compute-sanitizer (memcheck, racecheck, ...).

Shards are exact-size driver allocations adopted by the backend, so a read one byte past the end
of a message is a read past the end of its allocation, which memcheck reports. Exits non-zero on
any digest mismatch. Used by scripts/gpu-check; not a pytest module.
"""

from __future__ import annotations

import sys

import numpy as np
from cuda.bindings import driver

from vram_residency.backends.base import Segment
from vram_residency.backends.cuda import open_backend
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1, hash_units

MiB = 1 << 20
LENGTHS = [1, 63, 1025, 4097, MiB - 1, MiB + 1, 2 * MiB + 1025, 2 * MiB + 4097, 3 * MiB + 16]


KEY = bytes(range(32))


def tables(backend: object) -> int:
    """The segment-table kernels (units, standalone, reduce; keyed and not; both lanes) over
    exact-size adopted allocations, one pass for all of them. (Two-level trees, over 256 MiB, are
    left to tests/gpu/test_cuda_gpu_batch.py: under racecheck they would take minutes.)"""
    from vram_residency.backends.cuda import CudaBackend

    assert isinstance(backend, CudaBackend)
    lengths = LENGTHS
    ptrs, segs, datas = [], [], []
    bad = 0
    try:
        for i, n in enumerate(lengths):
            data = np.random.default_rng(n + 1).integers(0, 256, size=n, dtype=np.uint8).tobytes()
            err, dptr = driver.cuMemAlloc(n)
            assert err == driver.CUresult.CUDA_SUCCESS
            ptrs.append(dptr)
            view = backend.adopt_pointer(int(dptr), n)
            view.write(0, data)
            for alg, key in ((SHA256_TREE_V1, None), (BLAKE3, None), (BLAKE3, KEY if i % 2 else None)):
                segs.append(Segment(view, n, alg, key))
                datas.append(data)
        for priority in ("normal", "low"):
            got = backend.hash_many(segs, priority=priority)
            digests = backend.digest_many(segs, priority=priority)
            # Again: from the third call on each table is a CUDA graph launch (_backend.GRAPHS).
            for _ in range(3):
                if backend.digest_many(segs, priority=priority) != digests:
                    bad += 1
                    print(f"table {priority:6s}: a repeated (graph) run differs")
            for s, data, h, d in zip(segs, datas, got, digests, strict=True):
                want = hash_units(data, s.algorithm, key=s.key)
                ok = h == want and d == want.digest
                bad += not ok
                keyed = "keyed" if s.key else "plain"
                print(
                    f"table {priority:6s} {s.algorithm:15s} {keyed} {s.length:10d}: {'ok' if ok else 'MISMATCH'}"
                )
        for s in segs:
            s.buf.close()
    finally:
        for p in ptrs:
            driver.cuMemFree(p)
    return bad


def nh_fast(backend: object) -> int:
    """nh-fast-v1's kernels (leaf tags, unit chunks and parents, the device finish) over
    exact-size allocations, by both result paths and the overlapped seal path, with the fused
    unit digests (nhf_leaf_tags_units) and with the two-launch path."""
    from vram_residency.backends.cuda import CudaBackend, _nh_fast
    from vram_residency.formats.tree import NH_FAST_V1

    assert isinstance(backend, CudaBackend)
    bad = 0
    finish_at = _nh_fast.DEVICE_FINISH_UNITS
    _nh_fast.DEVICE_FINISH_UNITS = 1  # the device finish at every size, as in the GPU tests
    try:
        for fused, n in [(f, n) for f in (True, False) for n in LENGTHS]:
            _nh_fast.FUSED_UNITS = fused
            data = np.random.default_rng(n + 7).integers(0, 256, size=n, dtype=np.uint8).tobytes()
            err, dptr = driver.cuMemAlloc(n)
            assert err == driver.CUresult.CUDA_SUCCESS
            try:
                view = backend.adopt_pointer(int(dptr), n)
                want = hash_units(data, NH_FAST_V1, key=KEY)
                got = backend.write_and_hash(view, data, NH_FAST_V1, key=KEY)
                ok = got == want
                ok = ok and backend.hash(view, NH_FAST_V1, key=KEY) == want
                # Again and again: the third digest of the same shard is captured into a CUDA
                # graph and the later ones are its launches (_graphs.GraphCache).
                ok = ok and all(backend.digest(view, NH_FAST_V1, key=KEY) == want.digest for _ in range(4))
                bad += not ok
                path = "fused" if fused else "unfused"
                print(f"{NH_FAST_V1:15s} {path:7s} {n:9d} bytes: {'ok' if ok else 'MISMATCH'}", flush=True)
                view.close()
            finally:
                driver.cuMemFree(dptr)
    finally:
        _nh_fast.DEVICE_FINISH_UNITS = finish_at
        _nh_fast.FUSED_UNITS = False  # the default
    return bad


def main() -> int:
    backend = open_backend(0)
    if sys.argv[1:] == ["nh_fast"]:  # that section alone
        return 1 if nh_fast(backend) else 0
    bad = tables(backend)
    bad += nh_fast(backend)
    # Both unit layouts of both tree digests: split (sha256_tree_units_split; blake3_units_split
    # for digests, and for hashes of one-unit shards) and one block per unit. 128 KiB + 1 is two
    # blake3 pieces, the second one chunk of one byte.
    split_lengths = [*LENGTHS, (128 << 10) + 1]
    for n, split in [(n, False) for n in split_lengths] + [(n, True) for n in split_lengths]:
        backend.split_max_units = 1 << 30 if split else 0
        backend.blake3_split_max_units = 1 << 30 if split else 0
        data = np.random.default_rng(n).integers(0, 256, size=n, dtype=np.uint8).tobytes()
        err, dptr = driver.cuMemAlloc(n)
        assert err == driver.CUresult.CUDA_SUCCESS
        try:
            view = backend.adopt_pointer(int(dptr), n)
            for alg in (SHA256_TREE_V1, BLAKE3):
                got = backend.write_and_hash(view, data, alg)
                ok = got == hash_units(data, alg) and backend.digest(view, alg) == got.digest
                # Again and again: from the third call on, the digest, the hash and the seal's
                # tail run as CUDA graph launches (_backend.GRAPHS, _graphs.GraphCache).
                ok = ok and all(backend.digest(view, alg) == got.digest for _ in range(3))
                ok = ok and all(backend.hash(view, alg) == got for _ in range(4))
                ok = ok and all(backend.write_and_hash(view, data, alg) == got for _ in range(3))
                bad += not ok
                layout = "split" if split else "plain"
                print(f"{alg:15s} {layout} {n:9d} bytes: {'ok' if ok else 'MISMATCH'}", flush=True)
            view.close()
        finally:
            driver.cuMemFree(dptr)
    nodes = np.random.default_rng(0).integers(0, 256, size=32 * 300, dtype=np.uint8).tobytes()
    for alg in (SHA256_TREE_V1, BLAKE3):
        backend._reduce_nodes(alg, nodes)
    msgs = [bytes(range(i % 256)) * (1 + i // 256) for i in range(130)]
    import hashlib

    bad += sum(
        g != hashlib.sha256(m).digest() for g, m in zip(backend.sha256_messages(msgs), msgs, strict=True)
    )
    backend.close()
    print("sanitize run:", "FAILED" if bad else "all digests match", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
