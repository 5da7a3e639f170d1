"""The on-disk kernel cache (backends/cuda/_kcache.py) with real NVRTC compilations (no GPU needed):
hits across "processes" (the in-memory cache cleared), and every bad entry refused and replaced
without an exception: corrupt, truncated, foreign, wrong permissions, symlinks, unusable
directories."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vram_residency.backends.cuda import _compile, _kcache

try:
    from cuda.bindings import nvrtc  # noqa: F401

    HAVE_NVRTC = True
except ImportError:
    HAVE_NVRTC = False

needs_nvrtc = pytest.mark.skipif(not HAVE_NVRTC, reason="cuda.bindings.nvrtc is not installed")

SRC = "sha256_tree"
ARCH = "sm_90"
DRIVER = 12080


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "kernels"
    monkeypatch.setenv(_kcache.ENV, str(d))
    _compile._cache.clear()
    yield d
    _compile._cache.clear()


def _fresh(opts: tuple[str, ...] = ()) -> bytes:
    """A compile as a new process would do it: nothing in memory."""
    _compile._cache.clear()
    return _compile.compile_cubin(SRC, ARCH, opts, driver_version=DRIVER)


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if p.suffix == ".cubin" and not p.name.startswith(".tmp")]
    return entry


@needs_nvrtc
def test_second_process_loads_from_disk(cache: Path) -> None:
    first = _fresh()
    assert _compile.last_source == "nvrtc"
    entry = _entry(cache)
    assert cache.stat().st_mode & 0o777 == 0o700
    assert entry.stat().st_mode & 0o777 == 0o600
    raw = entry.read_bytes()
    assert raw.startswith(_kcache.MAGIC)
    assert raw.endswith(first)
    again = _fresh()
    assert _compile.last_source == "disk"
    assert again == first
    assert _compile.compile_cubin(SRC, ARCH, (), driver_version=DRIVER) is again
    assert _compile.last_source == "memory"


@pytest.fixture(scope="module")
def real_entry(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(key, file bytes) of one real entry, written by a real NVRTC compilation."""
    d = tmp_path_factory.mktemp("real") / "kernels"
    old = os.environ.get(_kcache.ENV)
    os.environ[_kcache.ENV] = str(d)
    try:
        _fresh()
    finally:
        if old is None:
            del os.environ[_kcache.ENV]
        else:
            os.environ[_kcache.ENV] = old
        _compile._cache.clear()
    entry = _entry(d)
    return bytes.fromhex(entry.stem), entry.read_bytes()


def _refused(
    d: Path, key: bytes, raw: bytes, caplog: pytest.LogCaptureFixture, why: str, mode: int = 0o600
) -> None:
    d.mkdir(mode=0o700, exist_ok=True)
    entry = d / f"{key.hex()}.cubin"
    entry.write_bytes(raw)
    entry.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="vram_residency.kernel_cache"):
        assert _kcache.load(d, key) is None
    assert why in caplog.text


@needs_nvrtc
def test_the_real_entry_loads(tmp_path: Path, real_entry: tuple[bytes, bytes]) -> None:
    key, raw = real_entry
    d = tmp_path / "k"
    d.mkdir(mode=0o700)
    (d / f"{key.hex()}.cubin").write_bytes(raw)
    (d / f"{key.hex()}.cubin").chmod(0o600)
    payload = _kcache.load(d, key)
    assert payload is not None
    assert payload[:4] == b"\x7fELF"
    assert raw.endswith(payload)


@needs_nvrtc
def test_corrupt_entry_is_refused(
    tmp_path: Path, real_entry: tuple[bytes, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    key, raw = real_entry
    bad = bytearray(raw)
    bad[-100] ^= 1
    _refused(tmp_path / "k", key, bytes(bad), caplog, "checksum")


@needs_nvrtc
def test_truncated_entry_is_refused(
    tmp_path: Path, real_entry: tuple[bytes, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    key, raw = real_entry
    _refused(tmp_path / "k", key, raw[:-1000], caplog, "truncated")
    _refused(tmp_path / "k2", key, raw[:20], caplog, "bad magic")
    _refused(tmp_path / "k3", key, b"", caplog, "bad magic")


@needs_nvrtc
def test_foreign_entry_is_refused(
    tmp_path: Path, real_entry: tuple[bytes, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """A valid entry of another key, renamed onto this key's name, is not loaded."""
    _key, raw = real_entry
    other = bytes(32)
    _refused(tmp_path / "k", other, raw, caplog, "another key")


@needs_nvrtc
def test_valid_checksum_but_not_elf_is_refused(
    tmp_path: Path, real_entry: tuple[bytes, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    import hashlib

    key, raw = real_entry
    at = len(_kcache.MAGIC)
    payload = b"not a cubin" * 10
    forged = raw[: at + 32] + hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "little") + payload
    _refused(tmp_path / "k", key, forged, caplog, "not a CUBIN")


@needs_nvrtc
def test_entry_readable_by_others_is_refused(
    tmp_path: Path, real_entry: tuple[bytes, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    key, raw = real_entry
    _refused(tmp_path / "k", key, raw, caplog, "private regular file", mode=0o644)
    _refused(tmp_path / "k2", key, raw, caplog, "private regular file", mode=0o620)


@needs_nvrtc
def test_symlinked_entry_is_not_followed(
    tmp_path: Path, real_entry: tuple[bytes, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    key, raw = real_entry
    target = tmp_path / "elsewhere.cubin"
    target.write_bytes(raw)
    target.chmod(0o600)
    d = tmp_path / "k"
    d.mkdir(mode=0o700)
    (d / f"{key.hex()}.cubin").symlink_to(target)
    with caplog.at_level(logging.WARNING, logger="vram_residency.kernel_cache"):
        assert _kcache.load(d, key) is None
    assert "unreadable" in caplog.text


@needs_nvrtc
def test_group_writable_directory_is_not_used(
    tmp_path: Path, real_entry: tuple[bytes, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    key, raw = real_entry
    d = tmp_path / "k"
    d.mkdir()
    (d / f"{key.hex()}.cubin").write_bytes(raw)
    (d / f"{key.hex()}.cubin").chmod(0o600)
    d.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="vram_residency.kernel_cache"):
        assert _kcache.load(d, key) is None
        assert _kcache.store(d, key, raw) is False
    assert "writable by others" in caplog.text


@needs_nvrtc
def test_a_refused_entry_is_recompiled_and_replaced(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    """End to end through compile_cubin: a corrupt entry costs one compilation, no exception,
    and the next process finds a good entry again."""
    good = _fresh()
    entry = _entry(cache)
    bad = bytearray(entry.read_bytes())
    bad[-7] ^= 0x80
    entry.write_bytes(bytes(bad))
    with caplog.at_level(logging.WARNING, logger="vram_residency.kernel_cache"):
        assert _fresh() == good
    assert _compile.last_source == "nvrtc"
    assert "checksum" in caplog.text
    _fresh()
    assert _compile.last_source == "disk"


def test_cache_path_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"x")
    key = os.urandom(32)
    assert _kcache.store(f, key, b"\x7fELF") is False
    assert _kcache.load(f, key) is None
    assert f.read_bytes() == b"x"


@pytest.mark.skipif(os.getuid() == 0, reason="root bypasses the permission bits")
def test_read_only_directory_is_not_written(tmp_path: Path) -> None:
    d = tmp_path / "k"
    d.mkdir(mode=0o500)
    try:
        assert _kcache.store(d, os.urandom(32), b"\x7fELF") is False
        assert list(d.iterdir()) == []
    finally:
        d.chmod(0o700)


def test_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for off in ("off", "0", "", "false"):
        monkeypatch.setenv(_kcache.ENV, off)
        assert _kcache.cache_dir() is None


def test_default_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(_kcache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _kcache.cache_dir() == tmp_path / "vram-residency" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: absolute paths only
    assert _kcache.cache_dir() == Path.home() / ".cache" / "vram-residency" / "kernels"


def test_key_covers_everything_that_changes_the_code() -> None:
    base = ([b"src", b"hdr"], ("-DX=1",), "sm_90", (12, 8), 12080)
    k0 = _kcache.entry_key(*base)
    variants = [
        ([b"src!", b"hdr"], *base[1:]),
        ([b"src", b"hdr!"], *base[1:]),
        ([b"srch", b"dr"], *base[1:]),  # boundaries between sources matter
        (base[0], ("-DX=2",), *base[2:]),
        (*base[:2], "sm_100", *base[3:]),
        (*base[:3], (12, 9), base[4]),
        (*base[:4], 12090),
        (*base[:4], None),
    ]
    keys = {_kcache.entry_key(*v) for v in variants}
    assert k0 not in keys
    assert len(keys) == len(variants)


def test_concurrent_writers_leave_one_valid_entry(tmp_path: Path) -> None:
    import threading

    payload = b"\x7fELF" + os.urandom(5000)
    key = os.urandom(32)
    threads = [threading.Thread(target=_kcache.store, args=(tmp_path / "k", key, payload)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _kcache.load(tmp_path / "k", key) == payload
    assert [p.name for p in (tmp_path / "k").iterdir()] == [f"{key.hex()}.cubin"]
