"""Segment tables: the digests of many segments in one pass over the device (issue 11).

A verify of a real model touches hundreds of tensors. Hashing them one after another pays a
launch and a synchronization per tensor (about 0.2 ms on an H200), which made ``verify_model`` of
a 1.9 GB Llama 10 to 20 times slower than one shard of the same size. Here the host lays out the
whole computation first:

- one *unit descriptor* per 1 MiB unit of every segment (``vr_unit_desc`` in vr_common.cuh):
  block b of a table launch hashes unit ``table[b]``, whatever segment it belongs to;
- one *reduce descriptor* per 256-node group of every tree level of every multi-unit segment
  (``vr_reduce_desc``): level L of all segments is one launch;
- keys (BLAKE3 keyed mode) as 32-byte records the descriptors point at.

All tables go to the device in one copy, then come one launch per (algorithm, kernel) for the
units and one per tree level, then one copy back of the roots (and unit digests) and one
synchronization. The plan is pure host arithmetic (numpy, no Python loop per unit), so it can be
checked without a GPU; :func:`execute` runs it.

Arena layout (device, one growing allocation per lane), all offsets 256-byte aligned:

    keys | unit descriptors | reduce descriptors  <- uploaded       (host image: ``upload``)
    roots (32 B per segment) | unit values | unit digests   <- copied back (hash_many) or roots only
    tree levels (internal nodes above the units)

Adding an algorithm (nh-fast-v1, issue 15): one entry in :data:`BATCH_ALGORITHMS`, naming the
kernel source and its table kernels, which take the same descriptor tables.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1, UNIT_SIZE, HashResult

__all__ = [
    "BATCH_ALGORITHMS",
    "REDUCE_DESC",
    "UNIT_DESC",
    "Launch",
    "Plan",
    "TableAlgorithm",
    "build_plan",
    "build_plan_columns",
    "results",
]

#: numpy mirrors of vr_unit_desc and vr_reduce_desc (vr_common.cuh): same order, little endian.
UNIT_DESC: Final = np.dtype(
    [("data", "<u8"), ("n", "<u8"), ("unit", "<u8"), ("cv_out", "<u8"), ("unit_out", "<u8"), ("key", "<u8")]
)
REDUCE_DESC: Final = np.dtype(
    [("in", "<u8"), ("out", "<u8"), ("key", "<u8"), ("count", "<u4"), ("root", "<u4")]
)
assert UNIT_DESC.itemsize == 48
assert REDUCE_DESC.itemsize == 32

_GROUP: Final = 256  # nodes per reduce block (the kernels' block size)
_ALIGN: Final = 256
_TREE_NAME: Final = SHA256_TREE_V1.encode("ascii")


def _finalize_sha256_tree(root: bytes, n: int) -> bytes:
    # Spec step 5: D = SHA-256(R || LE64(n) || "sha256-tree-v1" || 0x02).
    return hashlib.sha256(root + n.to_bytes(8, "little") + _TREE_NAME + b"\x02").digest()


def _identity(root: bytes, n: int) -> bytes:
    return root


@dataclass(frozen=True, slots=True)
class TableAlgorithm:
    """How one digest algorithm runs over segment tables.

    ``units_kernel`` hashes one unit per block into its tree value (a single-unit segment's value
    is its root); ``units_kernel_occ4`` is the same at 4 blocks per SM, picked by occupancy like
    the single-segment path. ``standalone_kernel`` is for algorithms whose unit digests are not
    the tree values (blake3: units >= 1 need a second set of chunk counters); None where the tree
    value *is* the unit digest (sha256-tree-v1). ``finalize`` turns the root node into the digest.
    """

    source: str
    units_kernel: str
    reduce_kernel: str
    finalize: Callable[[bytes, int], bytes]
    keyed: bool
    standalone_kernel: str | None = None
    units_kernel_occ4: str | None = None


#: The dispatch point, keyed by algorithm name. nh-fast-v1 (issue 15) adds its entry here (its
#: source to _compile.KERNELS, its kernels taking ``const vr_unit_desc*`` / ``const
#: vr_reduce_desc*``); nothing else in the batched path names an algorithm.
BATCH_ALGORITHMS: dict[str, TableAlgorithm] = {
    SHA256_TREE_V1: TableAlgorithm(
        source="sha256_tree",
        units_kernel="sha256_table_units",
        units_kernel_occ4="sha256_table_units_occ4",
        reduce_kernel="sha256_table_reduce",
        finalize=_finalize_sha256_tree,
        keyed=False,
    ),
    BLAKE3: TableAlgorithm(
        source="blake3",
        units_kernel="blake3_table_units",
        standalone_kernel="blake3_table_units_standalone",
        reduce_kernel="blake3_table_reduce",
        finalize=_identity,
        keyed=True,
    ),
}


@dataclass(frozen=True, slots=True)
class Launch:
    """One kernel launch over a contiguous run of a descriptor table: ``count`` blocks."""

    algorithm: str
    kernel: str
    table: int  # arena offset of the first descriptor
    count: int


@dataclass(slots=True)
class Plan:
    """Everything one batched digest does, as arena offsets (add the arena's base address)."""

    upload: npt.NDArray[np.uint8]  # host image of [0, upload_bytes)
    arena_bytes: int
    download_offset: int
    download_bytes: int
    unit_launches: list[Launch]
    level_launches: list[list[Launch]]  # tree level by tree level
    # Per segment: unit count, first unit index, algorithm, length; and where results sit.
    units: npt.NDArray[np.int64]
    first_unit: npt.NDArray[np.int64]
    algorithms: list[str]
    lengths: list[int]
    want_units: bool
    roots_offset: int
    vals_offset: int
    udig_offset: int
    total_units: int
    #: The roots of this plan's last run and the digests they finalize to (see :func:`results`),
    #: set as one tuple so that two threads running the same plan never see half of each.
    last: tuple[bytes, tuple[bytes, ...]] | None = None
    #: Bytes of key records leading ``upload`` (32 per distinct key; 0 for unkeyed tables): key
    #: material, zeroed in the host images once the device has read it (``_Lane.run``).
    key_bytes: int = 0

    def signature(self) -> tuple[object, ...]:
        """What the device work of this plan depends on besides the arena's and the pinned
        buffer's addresses: the upload and download sizes and offsets and every launch (kernel,
        grid, descriptor offset). A CUDA graph of a run (``_Lane.run``) is valid for any plan of
        the same signature at the same addresses: the descriptors and keys themselves are
        uploaded by the graph's first copy, read from the pinned buffer when the graph runs."""
        return (
            int(self.upload.nbytes),
            self.download_offset,
            self.download_bytes,
            tuple((j.algorithm, j.kernel, j.table, j.count) for j in self.unit_launches),
            tuple(
                tuple((j.algorithm, j.kernel, j.table, j.count) for j in lvl) for lvl in self.level_launches
            ),
        )


def _up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def build_plan(
    segments: Sequence[tuple[int, int, str, bytes | None]],
    want_units: bool,
    reserve: Callable[[int], int],
    pick_units_kernel: Callable[[TableAlgorithm, int], str] | None = None,
) -> Plan:
    """Plan the digests of ``segments`` = (device address, length, algorithm, key or None).

    ``reserve(nbytes)`` is called once, when the arena's size is known, and returns its device
    address (descriptors hold absolute addresses). ``pick_units_kernel(spec, units)`` chooses
    between a units kernel's register budgets. Inputs are trusted here: the backend checked them
    (lengths within their buffers, algorithms in BATCH_ALGORITHMS, 32-byte keys)."""
    # Columns in one C-level transpose: a verify plans every tensor of a model, and a Python
    # step per segment and column was most of the planning time of a 1,000-segment table.
    if segments:
        ptrs, lens, algs, keys = zip(*segments, strict=True)
    else:
        ptrs, lens, algs, keys = (), (), (), ()
    return build_plan_columns(ptrs, lens, algs, keys, want_units, reserve, pick_units_kernel)


def build_plan_columns(
    ptrs: Sequence[int],
    lens: Sequence[int],
    algs: Sequence[str],
    keys: Sequence[bytes | None],
    want_units: bool,
    reserve: Callable[[int], int],
    pick_units_kernel: Callable[[TableAlgorithm, int], str] | None = None,
) -> Plan:
    """:func:`build_plan` of the segments given as four equally long columns (device addresses,
    lengths, algorithms, keys), as the backend gathers them while checking the table."""
    s_count = len(ptrs)
    if not len(lens) == len(algs) == len(keys) == s_count:
        raise ValueError("segment table columns differ in length")
    ptr = np.array(ptrs, dtype=np.uint64)
    n = np.array(lens, dtype=np.int64)
    algorithms = list(algs)
    units = np.maximum(1, -(-n // UNIT_SIZE)).astype(np.int64)
    first_unit = np.zeros(s_count, dtype=np.int64)
    if s_count > 1:
        np.cumsum(units[:-1], out=first_unit[1:])
    total_units = int(units.sum())

    # Keys: one record per distinct key (unkeyed tables, the verify path, skip the loop).
    key_index: dict[bytes, int] = {}
    seg_key = np.full(s_count, -1, dtype=np.int64)
    if keys.count(None) != s_count:
        for i, k in enumerate(keys):
            if k is not None:
                seg_key[i] = key_index.setdefault(k, len(key_index))

    # Reduction schedule sizes: per multi-unit segment, ceil(c / 256) blocks per level until one
    # node is left; the last level writes the segment's root slot, earlier ones a level region.
    # A segment of 2 to 256 units (up to 256 MiB: nearly every tensor) reduces in one block of
    # one level, straight to its root: those are planned as arrays. Larger ones, few, loop.
    multi_idx = np.flatnonzero(units > 1)
    one_level = multi_idx[units[multi_idx] <= _GROUP]
    multi = multi_idx[units[multi_idx] > _GROUP].tolist()
    level_bytes = 0
    rdesc_count = len(one_level)
    for i in multi:
        c = int(units[i])
        while c > 1:
            g = -(-c // _GROUP)
            rdesc_count += g
            if g > 1:
                level_bytes += 32 * g
            c = g

    # Fixed layout.
    keys_off = 0
    udesc_off = _up(32 * len(key_index))
    rdesc_off = udesc_off + _up(UNIT_DESC.itemsize * total_units)
    upload_bytes = rdesc_off + _up(REDUCE_DESC.itemsize * rdesc_count)
    roots_off = upload_bytes
    vals_off = roots_off + 32 * s_count
    udig_off = vals_off + 32 * total_units
    want_udig = want_units and any(BATCH_ALGORITHMS[a].standalone_kernel for a in algorithms)
    end_results = udig_off + (32 * total_units if want_udig else 0)
    levels_off = _up(end_results)
    arena_bytes = _up(levels_off + level_bytes) or _ALIGN
    base = reserve(arena_bytes)

    upload = np.zeros(upload_bytes, dtype=np.uint8)
    for k, idx in key_index.items():
        upload[keys_off + 32 * idx : keys_off + 32 * idx + 32] = np.frombuffer(k, dtype=np.uint8)
    key_addr = np.where(seg_key >= 0, base + keys_off + 32 * seg_key, 0).astype(np.uint64)

    # Unit descriptors, vectorized: one row per unit of every segment, grouped by kernel.
    seg_of = np.repeat(np.arange(s_count, dtype=np.int64), units)
    gidx = np.arange(total_units, dtype=np.int64)
    unit = gidx - first_unit[seg_of]
    single = (units == 1)[seg_of]
    rows = np.zeros(total_units, dtype=UNIT_DESC)
    rows["data"] = ptr[seg_of]
    rows["n"] = n[seg_of].astype(np.uint64)
    rows["unit"] = unit.astype(np.uint64)
    rows["cv_out"] = np.where(single, base + roots_off + 32 * seg_of, base + vals_off + 32 * gidx).astype(
        np.uint64
    )
    rows["key"] = key_addr[seg_of]
    if s_count and algorithms.count(algorithms[0]) == s_count:
        # The usual table: one algorithm, code 0 everywhere (count is one C loop; building the
        # dict of distinct names was a Python step per segment).
        alg_codes = {algorithms[0]: 0}
        seg_alg = np.zeros(s_count, dtype=np.int64)
    else:
        alg_codes = {a: j for j, a in enumerate(dict.fromkeys(algorithms))}
        seg_alg = np.fromiter(map(alg_codes.__getitem__, algorithms), dtype=np.int64, count=s_count)
    unit_alg = seg_alg[seg_of]
    kind = np.zeros(total_units, dtype=np.int64)  # 0: units kernel, 1: standalone kernel
    if want_udig:
        has_standalone = np.array(
            [BATCH_ALGORITHMS[a].standalone_kernel is not None for a in alg_codes], dtype=bool
        )[unit_alg]
        needs = has_standalone & ~single
        rows["unit_out"] = np.where(needs, base + udig_off + 32 * gidx, 0).astype(np.uint64)
        kind = np.where(needs & (unit > 0), 1, 0)
    # Order rows by (algorithm, kernel), keeping unit order inside: each group is one launch.
    if len(alg_codes) == 1 and not kind.any():
        # One algorithm, one kernel: the rows are in launch order already (the sort would be
        # the identity; it and the copy it makes were a sixth of the planning time).
        sorted_alg, sorted_kind = unit_alg, kind
    else:
        order = np.lexsort((gidx, kind, unit_alg))
        rows = rows[order]
        sorted_alg, sorted_kind = unit_alg[order], kind[order]
    upload[udesc_off : udesc_off + rows.nbytes] = rows.view(np.uint8)
    unit_launches: list[Launch] = []
    start = 0
    names = list(alg_codes)
    run_key = sorted_alg * 2 + sorted_kind  # nondecreasing after the sort: one run per launch
    while start < total_units:
        a, k = sorted_alg[start], sorted_kind[start]
        end = int(np.searchsorted(run_key, a * 2 + k, side="right"))
        spec = BATCH_ALGORITHMS[names[int(a)]]
        count = end - start
        if k == 1:
            assert spec.standalone_kernel is not None
            kernel = spec.standalone_kernel
        else:
            kernel = pick_units_kernel(spec, count) if pick_units_kernel else spec.units_kernel
        unit_launches.append(Launch(names[int(a)], kernel, udesc_off + UNIT_DESC.itemsize * start, count))
        start = end

    # Reduce descriptors, level by level; within a level, per algorithm in the order the
    # algorithms first appear, rows in segment order (the one-level segments merged in).
    level_launches: list[list[Launch]] = []
    # Per level, per algorithm: (segment index, in, out, key, count, root) rows.
    per_level: list[dict[str, list[tuple[int, int, int, int, int, int]]]] = []
    next_level = levels_off
    for i in multi:
        c = int(units[i])
        src = vals_off + 32 * int(first_unit[i])
        lvl = 0
        kaddr = int(key_addr[i])
        while c > 1:
            g = -(-c // _GROUP)
            final = g == 1
            if final:
                out = roots_off + 32 * i
            else:
                out, next_level = next_level, next_level + 32 * g
            while len(per_level) <= lvl:
                per_level.append({})
            bucket = per_level[lvl].setdefault(algorithms[i], [])  # (segment index first)
            for j in range(g):
                cnt = min(_GROUP, c - _GROUP * j)
                bucket.append(
                    (i, base + src + 32 * _GROUP * j, base + out + 32 * j, kaddr, cnt, 1 if final else 0)
                )
            src, c, lvl = out, g, lvl + 1
    level0: dict[str, npt.NDArray[np.uint64]] = {}
    if len(one_level):
        small = np.empty((len(one_level), 6), dtype=np.uint64)
        small[:, 0] = one_level
        small[:, 1] = base + vals_off + 32 * first_unit[one_level]
        small[:, 2] = base + roots_off + 32 * one_level
        small[:, 3] = key_addr[one_level]
        small[:, 4] = units[one_level]
        small[:, 5] = 1
        small_alg = seg_alg[one_level]
        for a, code in alg_codes.items():
            level0[a] = small[small_alg == code] if len(alg_codes) > 1 else small
        if not per_level:
            per_level.append({})
    r_at = rdesc_off
    for lvl, lvl_rows in enumerate(per_level):
        tables: dict[str, npt.NDArray[np.uint64]] = {}
        for alg, entries in lvl_rows.items():
            tables[alg] = np.array(entries, dtype=np.uint64).reshape(-1, 6)
        if lvl == 0:
            for alg, arr in level0.items():
                if len(arr):
                    both = np.concatenate([tables[alg], arr]) if alg in tables else arr
                    tables[alg] = both[np.argsort(both[:, 0], kind="stable")]
        launches = []
        for alg in sorted(tables, key=lambda a: int(tables[a][0, 0])):
            arr = tables[alg]
            rd = np.zeros(len(arr), dtype=REDUCE_DESC)
            rd["in"], rd["out"], rd["key"] = arr[:, 1], arr[:, 2], arr[:, 3]
            rd["count"], rd["root"] = arr[:, 4].astype(np.uint32), arr[:, 5].astype(np.uint32)
            upload[r_at : r_at + rd.nbytes] = rd.view(np.uint8)
            launches.append(Launch(alg, BATCH_ALGORITHMS[alg].reduce_kernel, r_at, len(arr)))
            r_at += rd.nbytes
        level_launches.append(launches)
    assert r_at <= upload_bytes
    assert next_level <= arena_bytes

    download_bytes = (end_results - roots_off) if want_units else 32 * s_count
    return Plan(
        upload=upload,
        arena_bytes=arena_bytes,
        download_offset=roots_off,
        download_bytes=download_bytes,
        unit_launches=unit_launches,
        level_launches=level_launches,
        units=units,
        first_unit=first_unit,
        algorithms=algorithms,
        lengths=list(map(int, lens)),
        want_units=want_units,
        roots_offset=roots_off,
        vals_offset=vals_off,
        udig_offset=udig_off,
        total_units=total_units,
        key_bytes=32 * len(key_index),
    )


def results(plan: Plan, out: bytes) -> tuple[list[bytes], list[HashResult] | None]:
    """Digests (and with ``want_units`` the HashResults) from the downloaded bytes ``out``
    (``plan.download_bytes`` from ``plan.download_offset``)."""
    digests = _digests(plan, out)
    if not plan.want_units:
        return digests, None
    hashed: list[HashResult] = []
    vals = plan.vals_offset - plan.roots_offset
    udig = plan.udig_offset - plan.roots_offset
    for i, alg in enumerate(plan.algorithms):
        spec = BATCH_ALGORITHMS[alg]
        u, f = int(plan.units[i]), int(plan.first_unit[i])
        if u == 1:
            # One unit: the unit digest is the unit's root node (sha256-tree-v1: R) or, for
            # blake3, the digest itself (the unit is the whole message).
            ud = out[32 * i : 32 * i + 32]
        else:
            region = udig if spec.standalone_kernel is not None else vals
            ud = out[region + 32 * f : region + 32 * (f + u)]
        hashed.append(HashResult(digests[i], ud))
    return digests, hashed


def _digests(plan: Plan, out: bytes) -> list[bytes]:
    """Each segment's digest from its root in ``out``.

    Finalizing is a Python call per segment (for sha256-tree-v1 a SHA-256 of its root, about
    0.5 us), the largest host cost of a table of 1,000 small segments. A plan is run again and
    again on the same model, and the roots then come back unchanged: a digest is a function of
    the root and the segment's length (fixed by the plan) alone, so those of roots equal to the
    last run's are taken from it; only roots that changed are finalized again."""
    s_count = len(plan.algorithms)
    roots = bytes(out[: 32 * s_count])
    last = plan.last
    if last is not None and last[0] == roots:
        return list(last[1])
    if last is None:
        todo: Sequence[int] = range(s_count)
        digests: list[bytes] = [b""] * s_count
    else:
        now = np.frombuffer(roots, dtype=np.uint8).reshape(s_count, 32)
        before = np.frombuffer(last[0], dtype=np.uint8).reshape(s_count, 32)
        todo = np.flatnonzero((now != before).any(axis=1)).tolist()
        digests = list(last[1])
    for i in todo:
        spec = BATCH_ALGORITHMS[plan.algorithms[i]]
        digests[i] = spec.finalize(roots[32 * i : 32 * i + 32], plan.lengths[i])
    plan.last = (roots, tuple(digests))
    return digests
