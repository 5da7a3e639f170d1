"""Opening and parsing model files: spans are file offsets; anything malformed is InvalidInput."""

from __future__ import annotations

import itertools
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save, save_file

from vram_residency import InvalidInput
from vram_residency.sources.layout import HEADER_SPAN, open_model_file
from vram_residency.sources.stream import MAX_STAGING_BYTES, plan_staging


def spans_of(path: Path, fmt: str = "auto") -> dict[str, tuple[int, int]]:
    with open_model_file(path, fmt) as f:
        return {t.name: (t.start, t.end) for t in f.layout.tensors}


def test_safetensors_spans_are_file_offsets(st_file: tuple[Path, dict[str, Any]]) -> None:
    path, tensors = st_file
    raw = path.read_bytes()
    spans = spans_of(path)
    assert set(spans) == {*tensors, HEADER_SPAN}
    (n,) = struct.unpack("<Q", raw[:8])
    assert spans[HEADER_SPAN] == (0, 8 + n)
    for name, arr in tensors.items():
        s, e = spans[name]
        assert raw[s:e] == arr.tobytes()
    with open_model_file(path) as f:
        assert f.layout.format == "safetensors"
        assert f.layout.tensor_names == frozenset(tensors)


def write_gguf(path: Path, tensors: dict[str, np.ndarray[Any, Any]]) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_spans_are_file_offsets(tmp_path: Path) -> None:
    tensors: dict[str, np.ndarray[Any, Any]] = {
        "token_embd.weight": np.arange(300_000, dtype=np.float32).reshape(1000, 300),
        "output_norm.weight": np.ones(300, dtype=np.float16),
    }
    path = tmp_path / "m.gguf"
    write_gguf(path, tensors)
    raw = path.read_bytes()
    spans = spans_of(path)
    assert set(spans) == {*tensors, HEADER_SPAN}
    for name, arr in tensors.items():
        s, e = spans[name]
        assert raw[s:e] == arr.tobytes()
    # The magic, not the name, makes a GGUF file.
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(raw)
    assert spans_of(renamed) == spans


def test_unknown_extension_is_raw(tmp_path: Path) -> None:
    p = tmp_path / "blob.bin"
    p.write_bytes(os.urandom(1000))
    with open_model_file(p) as f:
        assert f.layout.format == "raw"
        assert f.layout.tensors == ()


def _header_file(tmp_path: Path, header: object, data: bytes = b"", raw_header: bytes | None = None) -> Path:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return p


@pytest.mark.parametrize(
    ("header", "data", "why"),
    [
        ([1, 2], b"", "not a JSON object"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 4,
            "outside the data section",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "truncated or padded"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "cannot take"),
        ({"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "no dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "outside"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, "invalid data_offsets"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlaps",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 12,
            "gap",
        ),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
        ({"a": "x"}, b"", "not an object"),
        # The name reports use for the header's own bytes: "(header) changed" must mean one thing.
        ({"(header)": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "reserved"),
    ],
)
def test_corrupt_safetensors_headers(tmp_path: Path, header: object, data: bytes, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        open_model_file(_header_file(tmp_path, header, data))


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"{not json", "corrupt safetensors header"),
        (b"\xff\xfe{}", "corrupt safetensors header"),
        (b'{"a": {}, "a": {}}', "duplicate key"),
        # A lone surrogate (which the safetensors library's JSON parser refuses) has no UTF-8
        # form: as a tensor name it would later break every record of that name, e.g. the
        # critical SealVerificationFailed audit event naming the corrupted tensor.
        (b'{"\\ud800": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}', "lone surrogate"),
        (b'{"__metadata__": {"\\udfff": "v"}}', "lone surrogate"),
        (b'{"__metadata__": {"k": "a\\ud800b"}}', "lone surrogate"),
    ],
)
def test_unparseable_safetensors_headers(tmp_path: Path, raw: bytes, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        open_model_file(_header_file(tmp_path, None, raw_header=raw))


def test_error_messages_cut_names_from_the_header(tmp_path: Path) -> None:
    # A header may be 100 MB: a name, dtype or shape from it goes into the message (and so into
    # logs and HTTP answers) cut short, with its length.
    name = "n" * (1 << 20)
    header = {name: {"dtype": "X" * 5000, "shape": [1], "data_offsets": [0, 4]}}
    with pytest.raises(InvalidInput) as err:
        open_model_file(_header_file(tmp_path, header, b"\0" * 4))
    msg = str(err.value)
    assert len(msg) < len(str(tmp_path)) + 400, len(msg)
    assert "unknown dtype" in msg and f"({len(name) + 2} characters)" in msg and "(5002 characters)" in msg


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (b"", "truncated"),
        (b"\x01\x02\x03", "truncated"),
        (struct.pack("<Q", 1 << 40) + b"{}", "corrupt safetensors header length"),
        (struct.pack("<Q", 100) + b"{}", "runs past the end"),
    ],
)
def test_truncated_safetensors(tmp_path: Path, blob: bytes, why: str) -> None:
    p = tmp_path / "t.safetensors"
    p.write_bytes(blob)
    with pytest.raises(InvalidInput, match=why):
        open_model_file(p)


_VALID = save({"w": np.arange(64, dtype=np.float32), "b": np.ones(3, dtype=np.int64)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=len(_VALID) - 1))
def test_every_truncation_of_a_safetensors_file_is_refused(tmp_path: Path, cut: int) -> None:
    p = tmp_path / "cut.safetensors"
    p.write_bytes(_VALID[:cut])
    with pytest.raises(InvalidInput):
        open_model_file(p)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=0, max_value=len(_VALID) - 1), value=st.integers(0, 255))
def test_a_corrupted_byte_gives_invalid_input_or_a_consistent_layout(
    tmp_path: Path, pos: int, value: int
) -> None:
    blob = bytearray(_VALID)
    blob[pos] = value
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(blob)
    try:
        with open_model_file(p) as f:
            layout = f.layout
    except InvalidInput:
        return
    # Whatever parses must describe the file it came from: spans inside it, in order, disjoint.
    spans = sorted((t.start, t.end) for t in layout.tensors)
    assert spans[0][0] == 0
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert spans[-1][1] <= len(blob)


def test_gguf_truncated_or_corrupt(tmp_path: Path) -> None:
    good = tmp_path / "g.gguf"
    write_gguf(good, {"t": np.arange(50_000, dtype=np.float32)})
    raw = good.read_bytes()
    for cut in (0, 3, 10, 30, 100, len(raw) // 2, len(raw) - 40):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(raw[:cut])
        with pytest.raises(InvalidInput):
            open_model_file(p)
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUX" + raw[4:])
    with pytest.raises(InvalidInput, match="bad magic"):
        open_model_file(bad)
    wrong_version = bytearray(raw)
    wrong_version[4:8] = struct.pack("<I", 99)
    p = tmp_path / "version.gguf"
    p.write_bytes(wrong_version)
    with pytest.raises(InvalidInput, match="corrupt GGUF"):
        open_model_file(p)


def _gguf_kv(key: bytes, vtype: int, value: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + value


@pytest.mark.parametrize(
    "case",
    [
        "array of 2**62 uint8",
        "array of 2**40 arrays",
        "array of 2**60 float64",
        "2**62 tensors",
        "2**62 keys",
    ],
)
def test_gguf_absurd_counts_fail_fast_without_allocating(tmp_path: Path, case: str) -> None:
    """A GGUF file of a few dozen bytes whose header claims 2**62 array elements: gguf's reader
    loops once per claimed element (an element past the end of the file reads as empty, so
    nothing stops it), growing a list until the process is killed for memory (24 GB in a minute
    here). Counts are checked against the bytes the file holds first: InvalidInput at once.

    Parsed in a child process under a 2 GiB address-space limit and a time limit, so that the
    unfixed behaviour fails the test instead of taking the machine's memory."""
    u8, f64, arr = 0, 12, 9
    header = {
        "array of 2**62 uint8": (0, 1, _gguf_kv(b"k", arr, struct.pack("<IQ", u8, 2**62))),
        "array of 2**40 arrays": (0, 1, _gguf_kv(b"k", arr, struct.pack("<IQ", arr, 2**40))),
        "array of 2**60 float64": (0, 1, _gguf_kv(b"k", arr, struct.pack("<IQ", f64, 2**60))),
        "2**62 tensors": (2**62, 0, b""),
        "2**62 keys": (0, 2**62, b""),
    }[case]
    n_tensors, n_kv, body = header
    path = tmp_path / "absurd.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body + bytes(64))
    code = textwrap.dedent(
        f"""
        import resource, time
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from vram_residency import InvalidInput
        from vram_residency.sources.layout import open_model_file
        t0 = time.monotonic()
        try:
            open_model_file({str(path)!r})
        except InvalidInput as exc:
            print("REFUSED", round(time.monotonic() - t0, 3), "MemoryError" in str(exc))
        """
    )
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("parsing a 100-byte GGUF file ran for a minute")
    words = res.stdout.split()
    assert words[:1] == ["REFUSED"], res.stdout + res.stderr[-2000:]
    assert float(words[1]) < 2.0 and words[2] == "False", res.stdout


def test_gguf_tensors_over_the_same_bytes_or_named_as_the_header_are_refused(tmp_path: Path) -> None:
    # b's tensor info says it starts where a does (offset 0 of the data section), as no GGUF
    # writer would: llama.cpp refuses such a file, and so do we.
    good = tmp_path / "g.gguf"
    write_gguf(good, {"a": np.arange(1000, dtype=np.float32), "b": np.ones(10, dtype=np.float32)})
    raw = bytearray(good.read_bytes())
    name_end = raw.index(struct.pack("<Q", 1) + b"b") + 9
    # name, then n_dims (u32, 1 here), the dims (u64 each), the type (u32), then the offset (u64).
    (n_dims,) = struct.unpack_from("<I", raw, name_end)
    at = name_end + 4 + 8 * n_dims + 4
    assert struct.unpack_from("<Q", raw, at)[0] > 0
    struct.pack_into("<Q", raw, at, 0)
    bad = tmp_path / "overlap.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(InvalidInput, match="'a' and 'b' overlap"):
        open_model_file(bad)
    assert set(spans_of(good)) == {"a", "b", HEADER_SPAN}
    # Nor may a tensor take the name reports give the header's bytes.
    reserved = tmp_path / "reserved.gguf"
    write_gguf(reserved, {HEADER_SPAN: np.ones(10, dtype=np.float32)})
    with pytest.raises(InvalidInput, match="reserved for the header"):
        open_model_file(reserved)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_gguf_header_fuzz(tmp_path: Path, data: st.DataObject) -> None:
    good = tmp_path / "base.gguf"
    if not good.exists():
        write_gguf(good, {"a": np.arange(1000, dtype=np.float32), "b": np.ones(10, dtype=np.float32)})
    blob = bytearray(good.read_bytes())
    header_end = spans_of(good)[HEADER_SPAN][1]
    pos = data.draw(st.integers(4, header_end - 1))
    blob[pos] = data.draw(st.integers(0, 255))
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(blob)
    try:
        spans = spans_of(p)
    except InvalidInput:
        return
    assert all(0 <= s <= e <= len(blob) for s, e in spans.values())


def test_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no such file"):
        open_model_file(tmp_path / "missing.safetensors")
    with pytest.raises(InvalidInput, match="directory"):
        open_model_file(tmp_path)
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInput, match="not a regular file"):
        open_model_file(fifo)  # must not block waiting for a writer
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    with pytest.raises(InvalidInput, match="not a directory"):
        open_model_file(plain / "model.safetensors")
    with pytest.raises(InvalidInput):
        open_model_file("")
    with pytest.raises(InvalidInput):
        open_model_file(42)  # type: ignore[arg-type]


def test_staging_plan_is_bounded() -> None:
    for length in (1, 4096, 63 << 20, 64 << 20, (64 << 20) + 1, 16 << 30, 1 << 40):
        plan = plan_staging(length)
        assert plan.bytes <= MAX_STAGING_BYTES
        assert plan.bytes <= max(length, 1 << 20) + plan.buffers * 4096
    assert plan_staging(1 << 40, MAX_STAGING_BYTES, 4).bytes <= MAX_STAGING_BYTES
    with pytest.raises(InvalidInput):
        plan_staging(1 << 30, MAX_STAGING_BYTES + 1)
    with pytest.raises(InvalidInput):
        plan_staging(1 << 30, 64 << 20, 1)
    with pytest.raises(InvalidInput):
        plan_staging(1 << 30, 300 << 20, 300)


def test_save_file_roundtrip_fixture_is_real(tmp_path: Path) -> None:
    # The fixtures write with the safetensors package itself; check one reads back with it.
    from safetensors.numpy import load_file

    p = tmp_path / "x.safetensors"
    save_file({"x": np.arange(5, dtype=np.int32)}, str(p))
    assert load_file(str(p))["x"].tolist() == [0, 1, 2, 3, 4]
