"""The segment-table plan of the batched digests (backends/cuda/_batch.py), checked without a GPU.

An interpreter here does what the table kernels do with each descriptor (vr_common.cuh): a unit
row hashes one unit into ``cv_out`` (and ``unit_out``), a reduce row reduces ``count`` nodes at
``in`` to one node at ``out``. Run over a plan with the real host hashing of sha256-tree-v1, it
must give hash_units' digests and unit digests for every segment; for blake3, whose chaining
values the blake3 package does not expose, the values are symbolic and the test checks the tree
each root is built from, the ROOT flags, the standalone unit digests and the key addresses.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from vram_residency.backends.cuda import _batch
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1, UNIT_SIZE, hash_units

MiB = UNIT_SIZE
BASE = 1 << 40  # where the "arena" lives; any address works for the interpreter


def _parent(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(left + right + b"\x01").digest()


def _reduce_pairs(nodes: list[Any], parent: Any) -> Any:
    while len(nodes) > 1:
        nxt = [parent(nodes[i], nodes[i + 1]) for i in range(0, len(nodes) - 1, 2)]
        if len(nodes) % 2:
            nxt.append(nodes[-1])
        nodes = nxt
    return nodes[0]


class Interpreter:
    """Device memory as a dict of 32-byte slots; segments' bytes by device address."""

    def __init__(self, data: dict[int, bytes] | None = None) -> None:
        self.data = data or {}
        self.slots: dict[int, Any] = {}
        self.reserved = 0

    def reserve(self, nbytes: int) -> int:
        self.reserved = nbytes
        return BASE

    def run(self, plan: _batch.Plan) -> None:
        for job in plan.unit_launches:
            rows = plan.upload[job.table : job.table + job.count * 48].view(_batch.UNIT_DESC)
            for r in rows:
                self.unit(job.algorithm, job.kernel, r)
        for level in plan.level_launches:
            for job in level:
                rows = plan.upload[job.table : job.table + job.count * 32].view(_batch.REDUCE_DESC)
                for r in rows:
                    nodes = [self.slots[int(r["in"]) + 32 * t] for t in range(int(r["count"]))]
                    self.slots[int(r["out"])] = self.reduce(
                        job.algorithm, nodes, bool(r["root"]), int(r["key"])
                    )

    def unit(self, alg: str, kernel: str, r: Any) -> None:
        n, unit = int(r["n"]), int(r["unit"])
        assert 0 <= unit < max(1, -(-n // MiB))
        if alg == SHA256_TREE_V1:
            chunk = self.data[int(r["data"])][unit * MiB : min(n, (unit + 1) * MiB)]
            self.slots[int(r["cv_out"])] = hash_units(chunk, SHA256_TREE_V1).unit_digests[:32]
            return
        seg, key = int(r["data"]), int(r["key"])
        single = n <= MiB
        self.slots[int(r["cv_out"])] = ("cv", seg, unit, "ROOT" if single else "", key)
        if kernel == "blake3_table_units_standalone":
            assert unit > 0 and not single and r["unit_out"]
            self.slots[int(r["unit_out"])] = ("unit", seg, unit, key)
        elif r["unit_out"]:
            assert unit == 0 and not single  # dual top: unit 0's own digest in the same pass
            self.slots[int(r["unit_out"])] = ("unit", seg, 0, key)

    def reduce(self, alg: str, nodes: list[Any], root: bool, key: int) -> Any:
        if alg == SHA256_TREE_V1:
            assert key == 0
            return _reduce_pairs(nodes, _parent)
        for nd in nodes:  # every node of a keyed tree comes from the same key
            assert nd[-1] == key
        tree = _reduce_pairs(nodes, lambda a, b: ("p", a, b, "", key))
        if root:
            tree = (*tree[:3], "ROOT", key)
        return tree

    def download(self, plan: _batch.Plan) -> bytes:
        out = bytearray(plan.download_bytes)
        for off in range(0, plan.download_bytes, 32):
            v = self.slots.get(BASE + plan.download_offset + off)
            if isinstance(v, bytes):
                out[off : off + 32] = v
        return bytes(out)


def _sha_segments(
    lengths: list[int], seed: int = 0
) -> tuple[list[tuple[int, int, str, None]], dict[int, bytes]]:
    rng = np.random.default_rng(seed)
    segs, data = [], {}
    for i, n in enumerate(lengths):
        ptr = (1 << 32) + i * (64 << 20)
        data[ptr] = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        segs.append((ptr, n, SHA256_TREE_V1, None))
    return segs, data


@pytest.mark.parametrize("want_units", [False, True])
def test_sha256_plan_gives_host_digests(want_units: bool) -> None:
    lengths = [0, 1, 55, 4095, 4096, 4097, MiB - 1, MiB, MiB + 1, 2 * MiB, 3 * MiB + 4097, 5]
    segs, data = _sha_segments(lengths)
    vm = Interpreter(data)
    plan = _batch.build_plan(segs, want_units, vm.reserve)
    assert vm.reserved == plan.arena_bytes
    vm.run(plan)
    digests, hashed = _batch.results(plan, vm.download(plan))
    for (ptr, n, _a, _k), d, i in zip(segs, digests, range(len(segs)), strict=True):
        want = hash_units(data[ptr], SHA256_TREE_V1)
        assert d == want.digest, n
        if want_units:
            assert hashed is not None
            assert hashed[i] == want
    assert (hashed is None) == (not want_units)
    # One launch for all units of all segments, one per tree level.
    assert len(plan.unit_launches) == 1
    assert plan.unit_launches[0].count == sum(max(1, -(-n // MiB)) for n in lengths)
    assert len(plan.level_launches) == 1


def test_thousands_of_small_segments_one_launch() -> None:
    rng = np.random.default_rng(5)
    lengths = [int(x) for x in rng.integers(0, 70_000, size=3000)]
    segs, data = _sha_segments(lengths, seed=1)
    vm = Interpreter(data)
    plan = _batch.build_plan(segs, False, vm.reserve)
    assert [j.count for j in plan.unit_launches] == [3000]
    assert plan.level_launches == []
    vm.run(plan)
    digests, _ = _batch.results(plan, vm.download(plan))
    assert digests == [hash_units(data[p], SHA256_TREE_V1).digest for p, *_ in segs]


def test_a_flip_in_one_segment_changes_only_its_digest() -> None:
    segs, data = _sha_segments([MiB + 7] * 40, seed=3)
    vm = Interpreter(data)
    plan = _batch.build_plan(segs, False, vm.reserve)
    vm.run(plan)
    before = _batch.results(plan, vm.download(plan))[0]
    victim = segs[17][0]
    flipped = bytearray(data[victim])
    flipped[MiB + 3] ^= 0x10
    data[victim] = bytes(flipped)
    vm2 = Interpreter(data)
    plan2 = _batch.build_plan(segs, False, vm2.reserve)
    vm2.run(plan2)
    after = _batch.results(plan2, vm2.download(plan2))[0]
    assert [i for i in range(40) if before[i] != after[i]] == [17]


def _expected_blake3_tree(seg: int, units: int, key: int) -> Any:
    nodes: list[Any] = [("cv", seg, u, "", key) for u in range(units)]
    # Groups of 256 per level, as the kernels reduce; equal to pair-left over all (aligned
    # power-of-two groups are subtrees), which is what the interpreter's reduce computes.
    tree = _reduce_pairs(nodes, lambda a, b: ("p", a, b, "", key))
    return (*tree[:3], "ROOT", key)


@pytest.mark.parametrize("want_units", [False, True])
def test_blake3_plan_structure_mixed_and_keyed(want_units: bool) -> None:
    key_a, key_b = bytes(range(32)), bytes(range(100, 132))
    # Lengths only: nothing reads the data. 300 and 70,000 units give two and three tree levels.
    specs = [
        (0, BLAKE3, None),
        (1, BLAKE3, key_a),
        (MiB, BLAKE3, None),
        (MiB + 1, BLAKE3, key_a),
        (300 * MiB + 5, BLAKE3, key_b),
        (4096, SHA256_TREE_V1, None),
        (70_000 * MiB, BLAKE3, None),
        (3 * MiB, BLAKE3, key_b),
    ]
    segs = [((1 << 36) * (i + 1), n, a, k) for i, (n, a, k) in enumerate(specs)]
    data = {segs[5][0]: bytes(4096)}
    vm = Interpreter(data)
    plan = _batch.build_plan(segs, want_units, vm.reserve)
    vm.run(plan)
    key_at: dict[bytes, int] = {}
    keys = plan.upload[: 32 * 2].tobytes()
    for key in (key_a, key_b):
        key_at[key] = BASE + keys.index(key)
    assert len(plan.level_launches) == 3
    kernels = [j.kernel for j in plan.unit_launches]
    assert "sha256_table_units" in kernels
    assert ("blake3_table_units_standalone" in kernels) == want_units
    for i, (ptr, n, alg, k) in enumerate(segs):
        root = vm.slots[BASE + plan.roots_offset + 32 * i]
        kaddr = key_at[k] if k else 0
        units = max(1, -(-n // MiB))
        if alg == SHA256_TREE_V1:
            assert root == hash_units(bytes(4096), SHA256_TREE_V1).unit_digests
            continue
        if units == 1:
            assert root == ("cv", ptr, 0, "ROOT", kaddr)
        else:
            assert root == _expected_blake3_tree(ptr, units, kaddr)
            if want_units:
                first = int(plan.first_unit[i])
                got = [vm.slots[BASE + plan.udig_offset + 32 * (first + u)] for u in range(units)]
                assert got == [("unit", ptr, u, kaddr) for u in range(units)]


def test_layout_fits_and_download_covers_results() -> None:
    segs, data = _sha_segments([3 * MiB, 1, 0])
    vm = Interpreter(data)
    plan = _batch.build_plan(segs, True, vm.reserve)
    assert plan.upload.nbytes <= plan.roots_offset
    assert plan.download_offset + plan.download_bytes <= plan.arena_bytes
    assert plan.arena_bytes % 256 == 0
    for a in (plan.roots_offset, plan.upload.nbytes):
        assert a % 256 == 0


def test_every_algorithm_has_its_kernels_in_the_source() -> None:
    from vram_residency.backends.cuda import _compile

    for spec in _batch.BATCH_ALGORITHMS.values():
        src = _compile.kernel_source(spec.source).decode()
        names = [spec.units_kernel, spec.reduce_kernel, spec.standalone_kernel, spec.units_kernel_occ4]
        for name in filter(None, names):
            assert f" {name}(const vr_" in src, name


def test_same_plan_run_again_after_a_flip_finalizes_the_changed_root() -> None:
    # A plan is reused run after run (the lane's plan cache) and results() reuses the digests of
    # roots that did not change since the plan's last run: a root that did change must be
    # finalized again, and every digest must still be the host's.
    segs, data = _sha_segments([MiB + 7, 100, 0, 3 * MiB] * 5, seed=9)
    plan = _batch.build_plan(segs, False, Interpreter(data).reserve)

    def run() -> list[bytes]:
        vm = Interpreter(data)
        vm.run(plan)
        return _batch.results(plan, vm.download(plan))[0]

    first = run()
    assert first == [hash_units(data[p], SHA256_TREE_V1).digest for p, *_ in segs]
    assert run() == first
    victim = segs[4][0]
    flipped = bytearray(data[victim])
    flipped[MiB] ^= 0x01
    data[victim] = bytes(flipped)
    after = run()
    assert [i for i in range(len(segs)) if after[i] != first[i]] == [4]
    assert after == [hash_units(data[p], SHA256_TREE_V1).digest for p, *_ in segs]
    data[victim] = bytes(flipped[:MiB]) + bytes([flipped[MiB] ^ 0x01]) + bytes(flipped[MiB + 1 :])
    assert run() == first  # flipped back: the digest is the sealed one again
