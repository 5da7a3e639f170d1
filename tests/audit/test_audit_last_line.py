"""``_last_line``, which an ``AuditLog`` opened on an existing file uses to find where its chain
ends: against a plain split of the whole file, for any bytes, across the backwards-reading
chunk's boundaries (a small chunk makes them frequent)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_residency.audit import log as audit_log


def reference(data: bytes) -> tuple[bytes | None, bytes, int]:
    last_nl = data.rfind(b"\n")
    if last_nl < 0:
        return None, data, 0
    start = data.rfind(b"\n", 0, last_nl) + 1
    return data[start:last_nl], data[last_nl + 1 :], last_nl + 1


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.sampled_from([b"\n", b"a", b"{}", b"xyz" * 3]), max_size=60).map(b"".join))
def test_last_line_equals_a_plain_split(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("tail") / "audit.jsonl"
    path.write_bytes(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(audit_log, "_TAIL_CHUNK", 4)
        assert audit_log._last_line(path, len(data)) == reference(data)
    assert audit_log._last_line(path, len(data)) == reference(data)


def test_a_huge_last_line_is_read_in_one_pass(tmp_path: Path) -> None:
    # 8 MiB without a newline after a short record, in 64 KiB chunks: the same answer as a split.
    data = b'{"seq":0}\n' + b"x" * (8 << 20)
    path = tmp_path / "audit.jsonl"
    path.write_bytes(data)
    assert audit_log._last_line(path, len(data)) == reference(data)
