"""The nh-fast-v1 launcher's arithmetic and argument checks, which run before any driver call
(no GPU needed). The launches themselves are tested in tests/gpu/test_nhfast_gpu.py."""

from __future__ import annotations

import pytest

from vram_residency.backends.cuda import _nh_fast
from vram_residency.errors import InvalidInput
from vram_residency.formats import nhfast

MIB = 1 << 20


@pytest.mark.parametrize("n", [0, 1, 4096, 4097, MIB, MIB + 1, 16 << 30])
def test_scratch_layout_fits_and_stays_small(n: int) -> None:
    leaves = max(1, -(-n // 4096))
    units = max(1, -(-n // MIB))
    need = _nh_fast.scratch_bytes(n)
    assert need >= 5376 + 24 * leaves + (6 * 32 + 32) * units
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
