"""One safetensors parser: what sealing refuses, the in-place executor views refuse too.

The views parse the header out of the sealed shard's own memory. A file sealed as ``raw`` (no
header check at seal time) is how a malformed header reaches them in a real worker; each case
below is sealed that way on the host backend, then opened as the worker opens it
(``VramManager.device_buffer`` + ``open_view``). The error must be the one ``open_model_file``
raises for the same bytes, message included, since both go through
``vram_residency.sources.parse_safetensors_header``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from vram_residency import ConfigError, InvalidInput, VramManager
from vram_residency.service.executor import DeviceMemory
from vram_residency.service.executors.decoder import ByteLMConfig
from vram_residency.service.executors.example_model import (
    _check_written_model,
    _write_atomic,
    ensure_example,
    file_image,
)
from vram_residency.service.executors.safetensors_view import SafetensorsView, open_view, parse_header
from vram_residency.sources import open_model_file, parse_safetensors_header

TOKEN = "safetensors-view-test-token-0123456789"
_F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _blob(header: bytes | object, data: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


# Each case: a whole file the strict parser refuses, and words its error must contain.
BAD: list[tuple[str, bytes, str]] = [
    ("duplicate key", _blob(b'{"a": {}, "a": {}}', b""), "duplicate key"),
    (
        "duplicate tensor",
        _blob(f'{{"a": {json.dumps(_F32x2)}, "a": {json.dumps(_F32x2)}}}'.encode(), b"\0" * 8),
        "duplicate key",
    ),
    (
        "overlapping tensors",
        _blob({"a": _F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
        "overlaps",
    ),
    (
        "aliased tensors",
        _blob({"a": _F32x2, "b": _F32x2}, b"\0" * 8),
        "overlaps",
    ),
    ("offsets past the end", _blob({"a": _F32x2}, b"\0" * 4), "outside the data section"),
    (
        "offsets reversed",
        _blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8),
        "outside",
    ),
    (
        "unknown dtype",
        _blob({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16),
        "unknown dtype",
    ),
    (
        "size not matching shape",
        _blob({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        "cannot take",
    ),
    ("trailing garbage", _blob({"a": _F32x2}, b"\0" * 8 + b"garbage!"), "truncated or padded"),
    (
        "gap between tensors",
        _blob(
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 12,
        ),
        "gap",
    ),
    ("metadata not strings", _blob({"__metadata__": {"k": 1}}, b""), "__metadata__"),
    ("not JSON", _blob(b"{not json", b""), "corrupt safetensors header"),
    ("header length past the end", struct.pack("<Q", 100) + b"{}", "runs past the end"),
    ("header length absurd", struct.pack("<Q", 1 << 40) + b"{}", "corrupt safetensors header length"),
    ("shorter than the length field", b"\x01\x02\x03", "truncated"),
]


def _error(fn: Any, *args: Any) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        fn(*args)
    return info.value


def _reason(exc: Exception) -> str:
    """The message without its leading ``<what>: `` (a path at seal time, the shard here)."""
    return str(exc).split(": ", 1)[1]


@pytest.fixture(scope="module")
def mgr() -> Iterator[VramManager]:
    with VramManager(TOKEN, backend="host") as m:
        yield m


@pytest.mark.parametrize(("case", "blob", "why"), BAD, ids=[c[0] for c in BAD])
def test_what_sealing_refuses_the_executor_view_refuses(
    tmp_path: Path, mgr: VramManager, case: str, blob: bytes, why: str
) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    at_seal = _error(open_model_file, path)
    assert why in str(at_seal), case
    at_parse = _error(parse_header, blob, len(blob))
    assert _reason(at_parse) == _reason(at_seal)
    shard = mgr.seal_file(path, format="raw")
    try:
        at_view = _error(open_view, mgr.device_buffer(shard).host_view(), None)
        assert type(at_view) is type(at_seal)
        assert _reason(at_view) == _reason(at_seal)
        assert str(at_view).startswith("sealed shard: ")
    finally:
        mgr.deallocate(shard)


_VALID = save(
    {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.ones(3, dtype=np.int64),
        "z": np.zeros(0, np.int8),
    },
    metadata={"format": "np"},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(st.integers(min_value=0, max_value=len(_VALID) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=3,
    ),
    cut=st.integers(min_value=0, max_value=8),
)
def test_the_view_and_sealing_accept_and_refuse_the_same_files(
    tmp_path: Path, edits: list[tuple[int, int]], cut: int
) -> None:
    blob = bytearray(_VALID)
    for pos, value in edits:
        blob[pos] = value
    data = bytes(blob[: len(blob) - cut])
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        with open_model_file(path) as f:
            layout = f.layout
    except InvalidInput as exc:
        at_seal: InvalidInput | None = exc
    else:
        at_seal = None
    if at_seal is not None:
        assert _reason(_error(SafetensorsView, memoryview(bytearray(data)))) == _reason(at_seal)
        return
    view = SafetensorsView(memoryview(bytearray(data)))
    assert set(view) == layout.tensor_names
    spans = {t.name: (t.start, t.end) for t in layout.tensors}
    for name, info in view.tensors.items():
        if info.end > info.start:
            assert spans[name] == (info.start, info.end)
    view.close()


def test_a_valid_file_views_in_place_and_non_viewable_dtypes_are_refused_by_name(tmp_path: Path) -> None:
    w = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    header = {
        "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "bf": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    }
    blob = _blob(header, w.tobytes() + b"\x80\x3f" * 4)
    (tmp_path / "m.safetensors").write_bytes(blob)
    with open_model_file(tmp_path / "m.safetensors") as f:  # sealing accepts BF16
        assert f.layout.tensor_names == {"w", "bf"}
    memory = bytearray(blob)
    view = SafetensorsView(memoryview(memory))
    arr = view.array("w")
    np.testing.assert_array_equal(arr, w)
    assert not arr.flags.writeable
    memory[view.tensors["w"].start + 3] ^= 0x80  # a view, not a copy: the sign bit of w[0, 0]
    assert arr[0, 0] == -w[0, 0] and arr[0, 1] == w[0, 1]
    assert view.tensors["bf"].dtype == "BF16" and view.tensors["bf"].shape == (4,)
    with pytest.raises(InvalidInput, match=r"'bf' has dtype BF16, which the executors cannot view"):
        view.array("bf")
    del arr
    view.close()


def test_parse_header_gives_absolute_offsets_and_metadata() -> None:
    header = parse_safetensors_header(_VALID, len(_VALID), "valid")
    (n,) = struct.unpack("<Q", _VALID[:8])
    assert header.data_start == 8 + n
    assert dict(header.metadata) == {"format": "np"}
    assert [e.start for e in header.entries] == sorted(e.start for e in header.entries)  # file order
    base, tensors = parse_header(_VALID, len(_VALID))
    assert base == header.data_start and tensors == header.by_name()
    got = np.frombuffer(_VALID, "<f4", 12, tensors["w"].start).reshape(tensors["w"].shape)
    np.testing.assert_array_equal(got, np.arange(12, dtype=np.float32).reshape(3, 4))
    with pytest.raises(InvalidInput, match="header is truncated"):
        parse_safetensors_header(_VALID[:20], len(_VALID), "valid")


TINY = ByteLMConfig(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)


def test_the_example_writer_checks_its_header_with_the_same_parser(tmp_path: Path) -> None:
    model = ensure_example(tmp_path / "example", "small", "sha256-tree-v1")
    raw = (model.directory / "model.safetensors").read_bytes()
    names = parse_safetensors_header(raw, len(raw), "example").names
    assert names == set(json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])) - {"__metadata__"}

    # A header that does not describe the preset is refused before the rename: nothing in place,
    # no temporary file left behind.
    target = tmp_path / "other.safetensors"
    wrong = ByteLMConfig(hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16)
    with pytest.raises(ConfigError, match="other tensors than the preset"):
        _write_atomic(target, file_image(TINY), check=lambda fd: _check_written_model(fd, wrong))
    assert os.listdir(tmp_path) == ["example"]

    # And a file the strict parser refuses (one byte of padding after the data) is refused there.
    with pytest.raises(InvalidInput, match="truncated or padded"):
        _write_atomic(target, file_image(TINY) + b"\0", check=lambda fd: _check_written_model(fd, TINY))
    assert os.listdir(tmp_path) == ["example"]
    _write_atomic(target, file_image(TINY), check=lambda fd: _check_written_model(fd, TINY))
    assert target.read_bytes() == file_image(TINY)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed")
@pytest.mark.parametrize(("case", "blob", "why"), BAD, ids=[c[0] for c in BAD])
def test_the_cupy_view_refuses_what_sealing_refuses(tmp_path: Path, case: str, blob: bytes, why: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    at_seal = _error(open_model_file, path)
    with VramManager(TOKEN, backend="cuda") as gpu:
        shard = gpu.seal_file(path, format="raw")
        buf = gpu.device_buffer(shard)
        memory = DeviceMemory(ptr=buf.device_pointer, size=shard.vram_bytes, device=gpu.device, owner=buf)
        at_view = _error(open_view, None, memory)
        assert _reason(at_view) == _reason(at_seal), case
