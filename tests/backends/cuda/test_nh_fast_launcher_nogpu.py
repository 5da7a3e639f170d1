"""The nh-fast-v1 launcher's arithmetic and argument checks, which run before any driver call
(no GPU needed). The launches themselves are tested in tests/gpu/test_nhfast_gpu.py."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_residency.backends.cuda import _nh_fast
from vram_residency.errors import InvalidInput
from vram_residency.formats import nhfast

MIB = 1 << 20


@pytest.mark.parametrize("n", [0, 1, 4096, 4097, MIB, MIB + 1, 16 << 30])
def test_scratch_layout_fits_and_stays_small(n: int) -> None:
    leaves = max(1, -(-n // 4096))
    units = max(1, -(-n // MIB))
    need = _nh_fast.scratch_bytes(n)
    assert need >= 5376 + 24 * leaves + (6 * 32 + 32 + 4) * units
    if n >= 64 * MIB:
        assert need / n < 0.01  # the backend's scratch budget: under 1% of the shard


def test_rejects_misaligned_pointers_and_bad_keys_before_touching_the_driver() -> None:
    with pytest.raises(InvalidInput, match="aligned"):
        _nh_fast.NhFastJob(None, None, 8, 100, bytes(32), 0, leaf_blocks=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="32 bytes"):
        _nh_fast.NhFastJob(None, None, 16, 100, b"k" * 31, 0, leaf_blocks=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        _nh_fast.NhFastJob(None, None, 16, -1, bytes(32), 0, leaf_blocks=1)  # type: ignore[arg-type]


def test_layout_constants_match_the_spec() -> None:
    assert _nh_fast._UNIT_KEY_OFF == nhfast.NH_KEY_BYTES == 4096 + 512 * 2
    assert _nh_fast._TAGS_OFF % 256 == 0 and _nh_fast._TAGS_OFF >= nhfast.NH_KEY_BYTES + 32


def _fin_chunks(units: int) -> int:
    return -(-(32 * units + 8) // 1024)


@given(st.integers(0, 1 << 46))
@settings(max_examples=500, deadline=None)
def test_job_regions_are_disjoint_and_inside_the_scratch(n: int) -> None:
    """Leaf tags, chunk chaining values, unit digests, the LE64 length slot nhf_finalize writes
    after them, the digest, and the fused kernel's u32 leaf counters (one per unit, cleared by
    the job's memset, untouched by nhf_finalize's work area): in order, disjoint, aligned, and
    inside scratch_bytes(n)."""
    units = max(1, -(-n // MIB))
    leaves = max(1, -(-n // 4096))
    tags, cvs, unit_out, digest_out, counters = _nh_fast._job_layout(n)
    assert tags >= _nh_fast._KEY_BLOB and tags % 256 == 0
    assert cvs >= tags + 24 * leaves and cvs % 256 == 0
    assert unit_out >= cvs + 192 * units and unit_out % 16 == 0
    assert digest_out >= unit_out + 32 * units + 8 and digest_out % 16 == 0  # past the length slot
    assert counters >= digest_out + 32 and counters % 16 == 0
    assert counters + 4 * units <= _nh_fast.scratch_bytes(n)


@pytest.mark.parametrize("units", [*range(1, 70), 1 << 10, 4095, 4096, 4097, 1 << 14, 1 << 20, (1 << 34) + 1])
def test_finalize_work_area_fits_in_the_chunk_values(units: int) -> None:
    """nhf_finalize's work area (two levels of 32-byte values per 1 KiB chunk of the 32u + 8 byte
    message, none for a single chunk) fits in the 192 bytes per unit of chunk values before the
    unit digests. Proof for every u >= 1: 64 * ceil((32u + 8) / 1024) <= 64 * (32u + 1031) / 1024
    = 2u + 64.4 < 192u. The parametrized sizes check the formula against the bound directly."""
    _tags, cvs, unit_out, _, _ = _nh_fast._job_layout(units * MIB)
    need = _nh_fast._finalize_work_bytes(units)
    assert need == (0 if _fin_chunks(units) == 1 else 64 * _fin_chunks(units))
    assert cvs + need <= unit_out
    assert 64 * _fin_chunks(units) <= 2 * units + 64.5 < 192 * units


@given(st.lists(st.tuples(st.integers(0, 1 << 40), st.booleans()), min_size=1, max_size=40))
@settings(max_examples=300, deadline=None)
def test_key_stages_never_overlap_the_copies_back(rows: list[tuple[int, bool]]) -> None:
    """_run_rows' pinned buffer: every row's copy back (its unit digests, or 32 bytes when the
    device finishes it) and every row's key stage are disjoint and inside the buffer."""
    ns = [n for n, _ in rows]
    down = [32 if on_device else 32 * max(1, -(-n // MIB)) for n, on_device in rows]
    stage_at, total = _nh_fast._host_layout(down, len(ns))
    spans = []
    off = 0
    for d in down:
        spans.append((off, off + d))
        off += d
    spans += [
        (stage_at + k * _nh_fast.KEY_STAGE_BYTES, stage_at + (k + 1) * _nh_fast.KEY_STAGE_BYTES)
        for k in range(len(ns))
    ]
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert spans[-1][1] <= total
    assert _nh_fast.KEY_STAGE_BYTES >= _nh_fast._KEY_BLOB


def test_two_launch_path_is_the_default_and_kernels_are_named() -> None:
    # The switch (module constant; the fused path measured slower on the H200) and the names
    # backend.last_units_kernel reports.
    assert _nh_fast.FUSED_UNITS is False
    assert _nh_fast.FUSED_KERNEL == "nhf_leaf_tags_units"
    assert _nh_fast.UNFUSED_KERNEL == "nhf_units"
