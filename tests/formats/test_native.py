"""The native sha256-tree-v1 accelerator (formats/_treehash.c) against the pure-Python path."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vram_residency.formats import _native, tree
from vram_residency.formats.tree import SHA256_TREE_V1, UNIT_SIZE, HashResult, hash_units

MiB = 1 << 20


def _have_compiler() -> bool:
    return bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"))


# Skip only where the build hook could not have built the library; with a compiler present a
# missing library is a build bug and must fail loudly rather than silently test the fallback.
if not _native.available():
    if _have_compiler():
        pytest.fail(
            f"native library unavailable although a C compiler exists: {_native.unavailable_reason()}",
            pytrace=False,
        )
    pytestmark = pytest.mark.skip(reason=f"no C compiler: {_native.unavailable_reason()}")


def P(n: int) -> bytes:
    return bytes((i * 31 + 7) % 256 for i in range(n))


def _rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1_000_003 + n).randbytes(n)


def _pure_hash(data: bytes) -> HashResult:
    """hash_units through its pure-Python fallback path."""
    orig = _native.available
    _native.available = lambda: False
    try:
        return hash_units(data, SHA256_TREE_V1, threads=1)
    finally:
        _native.available = orig


def _spec_digest(m: bytes) -> bytes:
    """The spec's definition, written out independently of tree.py (no units)."""
    leaves = [m[i : i + 4096] for i in range(0, len(m), 4096)] or [b""]
    nodes = [hashlib.sha256(c + b"\x00").digest() for c in leaves]
    while len(nodes) > 1:
        nxt = [
            hashlib.sha256(nodes[i] + nodes[i + 1] + b"\x01").digest() for i in range(0, len(nodes) - 1, 2)
        ]
        if len(nodes) % 2:
            nxt.append(nodes[-1])
        nodes = nxt
    return hashlib.sha256(nodes[0] + len(m).to_bytes(8, "little") + b"sha256-tree-v1\x02").digest()


LENGTHS = [0, 1, 3, 4095, 4096, 4097, 12288, 20481, MiB - 1, MiB, MiB + 1, 3 * MiB + 17]


@pytest.mark.parametrize("n", LENGTHS)
def test_native_matches_pure_python(n: int) -> None:
    data = _rand(n)
    expected = _pure_hash(data)
    assert expected.digest == _spec_digest(data)
    for threads in range(1, 9):
        got = hash_units(data, SHA256_TREE_V1, threads=threads)
        assert got == expected, f"n={n} threads={threads}"
        raw = _native.sha256_tree_units(memoryview(data), threads)
        assert raw == expected.unit_digests
        assert len(raw) == 32 * tree.unit_count(n)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.one_of(
        st.integers(0, 3 * 4096),
        st.integers(0, 5 * MiB),
        st.sampled_from([k * MiB + d for k in range(1, 5) for d in (-4097, -4096, -1, 0, 1, 4096, 4097)]),
    ),
    threads=st.integers(1, 8),
    seed=st.integers(0, 2**32),
)
def test_native_matches_pure_python_random(n: int, threads: int, seed: int) -> None:
    data = _rand(n, seed)
    assert hash_units(data, SHA256_TREE_V1, threads=threads) == _pure_hash(data)


SPEC_VECTORS = [
    (b"", "37e2f51ed116754f5bccd9726e3adb0b4c84af27df70df0fe0684b022975db58"),
    (b"abc", "16889f98eeb0e2e16ee2e640cb6eea840349415a15a1c2a69d6766f0b0b3d896"),
    (P(4096), "2ef4a69a251c059b70d2e2b7aab99bf8bcb0a1822d208604dcc0b1dd501c2d23"),
    (P(4097), "5e1fd3dc2db57d1b502c092c8851726417dea5bda061ba6b8987bb7f885580b5"),
    (P(12288), "4ce8a6713e2cbf90adb1a8b539c84b1512c7450fe7895619e8bcdd5bb805803f"),
    (P(20481), "ffcdcd1f12bcb420959af918506ad32aebd2bea01e69c08e48065db574fa6833"),
    (P(1048576), "34bc5f0978eec0aeccac1445e6a9adda7494a3ee898ee4ee94ce128e91970c16"),
]


@pytest.mark.parametrize(
    ("message", "expected"), SPEC_VECTORS, ids=lambda v: str(len(v)) if isinstance(v, bytes) else ""
)
@pytest.mark.parametrize("threads", [1, 2, 8])
def test_spec_known_answers_native(message: bytes, expected: str, threads: int) -> None:
    units = _native.sha256_tree_units(memoryview(message), threads)
    assert tree.reduce_sha256_tree(units, len(message)).hex() == expected
    assert hash_units(message, SHA256_TREE_V1, threads=threads).digest.hex() == expected


def test_empty_message_is_one_unit_of_sha256_of_zero_byte() -> None:
    assert _native.sha256_tree_units(memoryview(b""), 4) == hashlib.sha256(b"\x00").digest()


def _inputs(data: bytes, tmp_path: Path) -> Iterator[tuple[str, object]]:
    yield "bytes", data
    yield "bytearray", bytearray(data)
    yield "memoryview(bytearray)", memoryview(bytearray(data))
    yield "memoryview(bytes)", memoryview(data)
    yield "numpy uint8", np.frombuffer(bytearray(data), dtype=np.uint8)
    yield "numpy uint8 read-only", np.frombuffer(data, dtype=np.uint8)
    if len(data) % 4 == 0:
        yield "numpy float32", np.frombuffer(bytearray(data), dtype=np.float32)
    f = tmp_path / "blob"
    f.write_bytes(data)
    if data:  # a zero-length file cannot be mapped
        with open(f, "rb") as fh:
            yield "read-only mmap", mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


@pytest.mark.parametrize("n", [0, 3, 4096, MiB + 12, 2 * MiB])
def test_buffer_kinds(n: int, tmp_path: Path) -> None:
    data = _rand(n, 7)
    expected = _pure_hash(data)
    for kind, obj in _inputs(data, tmp_path):
        got = hash_units(obj, SHA256_TREE_V1, threads=2)  # type: ignore[arg-type]
        assert got == expected, kind
        if isinstance(obj, mmap.mmap):
            obj.close()


def test_slices_at_odd_offsets() -> None:
    # Sub-views start at addresses that are not 16-byte aligned; the C side must not care.
    data = _rand(2 * MiB + 100, 3)
    for start in (1, 3, 4095, MiB + 1):
        view = memoryview(data)[start : start + MiB + 5]
        assert hash_units(view, SHA256_TREE_V1, threads=3) == _pure_hash(bytes(view))


def test_non_contiguous_input_is_rejected() -> None:
    arr = np.zeros((64, 64), dtype=np.uint8)[:, ::2]
    with pytest.raises((TypeError, ValueError, BufferError)):
        hash_units(arr, SHA256_TREE_V1)  # type: ignore[arg-type]


def test_gil_is_released_during_the_call() -> None:
    # A Python thread keeps counting while the main thread sits in one native call; with the GIL
    # held for the whole call the counter could not move.
    data = _rand(48 * MiB, 5)
    ticks = 0
    stop = threading.Event()
    started = threading.Event()

    def spin() -> None:
        nonlocal ticks
        started.set()
        while not stop.is_set():
            ticks += 1

    t = threading.Thread(target=spin)
    t.start()
    started.wait()
    try:
        before = ticks
        _native.sha256_tree_units(memoryview(data), 1)
        during = ticks - before
    finally:
        stop.set()
        t.join()
    assert during > 0


def test_threads_beyond_units_and_nonpositive() -> None:
    data = _rand(2 * MiB + 1, 9)
    expected = _pure_hash(data).unit_digests
    for threads in (0, -3, 3, 64, 1000):
        assert _native.sha256_tree_units(memoryview(data), threads) == expected


def test_unit_digests_are_unit_subtree_roots() -> None:
    # Each unit digest is the tree of that unit alone (before the length-binding root step).
    data = _rand(3 * MiB + 17, 11)
    units = _native.sha256_tree_units(memoryview(data), 2)
    for i in range(tree.unit_count(len(data))):
        chunk = data[i * UNIT_SIZE : (i + 1) * UNIT_SIZE]
        assert units[32 * i : 32 * i + 32] == tree._sha256_unit(memoryview(chunk))


def test_missing_library_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(
        _native, "_LIB", _native.NativeLibrary(tmp_path / _native.LIBRARY_NAME, _native._bind, "x")
    )
    assert not _native.available()
    assert "not built" in (_native.unavailable_reason() or "")
    with pytest.raises(RuntimeError):
        _native.sha256_tree_units(memoryview(b"abc"), 1)
    # hash_units still answers, through the pure-Python path.
    assert hash_units(b"abc", SHA256_TREE_V1).digest.hex() == SPEC_VECTORS[1][1]


def test_compile_without_compiler_reports_instead_of_raising(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    err = _native.compile_library(tmp_path / "x.c", tmp_path / "x.so")
    assert err is not None
    assert "no C compiler" in err
    err = _native.compile_library(tmp_path / "x.c", tmp_path / "x.so", cc=str(tmp_path / "no-such-cc"))
    assert err is not None
    assert not (tmp_path / "x.so").exists()


def test_compile_library_builds_a_loadable_library(tmp_path: Path) -> None:
    if not _have_compiler():
        pytest.skip("no C compiler")
    src = Path(_native.__file__).with_name(_native.SOURCE_NAME)
    err = _native.compile_library(src, tmp_path / _native.LIBRARY_NAME)
    assert err is None
    assert (tmp_path / _native.LIBRARY_NAME).stat().st_size > 0
    assert not list(tmp_path.glob(".*.tmp"))
