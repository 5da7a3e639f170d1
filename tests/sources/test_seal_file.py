"""seal_file on the host backend: digests, localization by tensor name, all-or-nothing errors."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from vram_residency import InsufficientVram, InvalidInput, SealVerificationFailed, VramManager
from vram_residency.formats import digest
from vram_residency.formats.tree import UNIT_SIZE
from vram_residency.sources.files import FileSource
from vram_residency.sources.layout import HEADER_SPAN
from vram_residency.testing import flip_bit

ALGS = ["sha256-tree-v1", "blake3"]


def spans(mgr: VramManager, shard: Any) -> dict[str, tuple[int, int]]:
    return {t.name: (t.start, t.end) for t in mgr._entry(shard).tensors}


def middle_bit(span: tuple[int, int]) -> int:
    return 8 * ((span[0] + span[1]) // 2) + 3


@pytest.mark.parametrize("algorithm", ALGS)
def test_seal_safetensors_file(
    mgr: VramManager, st_file: tuple[Path, dict[str, Any]], algorithm: str, audit: Any
) -> None:
    path, tensors = st_file
    raw = path.read_bytes()
    shard = mgr.seal_file(path, model_ref="tiny@1", digest_algorithm=algorithm)
    assert shard.vram_bytes == len(raw)
    assert shard.digest == digest(raw, algorithm).hex()
    assert shard.model_ref == "tiny@1"
    mgr.verify_sealed(shard)
    assert set(spans(mgr, shard)) == {*tensors, HEADER_SPAN}
    entry = mgr._entry(shard)
    assert isinstance(entry.source, FileSource)
    assert entry.source.path == str(path.resolve()) and entry.source.length == len(raw)
    assert audit.names()[:3] == ["VramAllocated", "VramSealed", "SealVerified"]


@pytest.mark.parametrize("name", ["blk.0.weight", "blk.1.weight"])
def test_flipped_bit_is_reported_by_tensor_name(
    mgr: VramManager, st_file: tuple[Path, dict[str, Any]], name: str
) -> None:
    path, _ = st_file
    shard = mgr.seal_file(path)
    span = spans(mgr, shard)[name]
    bit = middle_bit(span)
    flip_bit(mgr, shard, bit)
    with pytest.raises(SealVerificationFailed) as exc:
        mgr.verify_sealed(shard)
    err = exc.value
    # The unit around the middle of a >3 MiB tensor lies inside it: the name is exact.
    assert err.corrupted_tensors == [name]
    ((start, end),) = err.corrupted_ranges
    assert start <= bit // 8 < end and end - start <= UNIT_SIZE
    assert span[0] <= start and end <= span[1]


def test_flip_in_header_is_reported(mgr: VramManager, st_file: tuple[Path, dict[str, Any]]) -> None:
    path, _ = st_file
    shard = mgr.seal_file(path)
    flip_bit(mgr, shard, 8 * 20)
    with pytest.raises(SealVerificationFailed) as exc:
        mgr.verify_sealed(shard)
    assert HEADER_SPAN in exc.value.corrupted_tensors


def test_seal_gguf_file_and_localize(mgr: VramManager, tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_tensor(
        "token_embd.weight", np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    )
    w.add_tensor("output_norm.weight", np.ones(1024, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    raw = path.read_bytes()
    shard = mgr.seal_file(path)
    assert shard.digest == digest(raw).hex()
    sp = spans(mgr, shard)
    assert raw[slice(*sp["output_norm.weight"])] == np.ones(1024, dtype=np.float32).tobytes()
    flip_bit(mgr, shard, middle_bit(sp["token_embd.weight"]))
    with pytest.raises(SealVerificationFailed) as exc:
        mgr.verify_sealed(shard)
    assert exc.value.corrupted_tensors == ["token_embd.weight"]


def test_raw_file_and_forced_format(mgr: VramManager, tmp_path: Path) -> None:
    data = os.urandom(3 * UNIT_SIZE + 17)
    p = tmp_path / "weights.bin"
    p.write_bytes(data)
    shard = mgr.seal_file(p, digest_algorithm="blake3")
    assert shard.digest == digest(data, "blake3").hex()
    assert spans(mgr, shard) == {}
    # A safetensors file sealed as raw bytes has the same digest but no tensor names.
    st = tmp_path / "x.safetensors"
    save_file({"a": np.zeros(10, dtype=np.float32)}, str(st))
    s2 = mgr.seal_file(st, format="raw")
    assert spans(mgr, s2) == {}
    with pytest.raises(InvalidInput, match="format must be"):
        mgr.seal_file(st, format="pickle")  # type: ignore[arg-type]


def test_many_chunks_several_readers(mgr: VramManager, tmp_path: Path) -> None:
    data = os.urandom(9 * UNIT_SIZE + 4321)
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    seen: list[int] = []
    shard = mgr.seal_file(p, staging_bytes=4 << 20, staging_buffers=4, progress=seen.append)
    assert shard.digest == digest(data).hex()
    assert sum(seen) == len(data) and len(seen) >= 9  # 1 MiB chunks, in whatever order they came
    mgr.verify_sealed(shard)


def assert_nothing_allocated(mgr: VramManager, audit: Any, free: int) -> None:
    assert mgr.available_vram() == free
    assert mgr.shards() == []
    assert "VramSealed" not in audit.names()


@pytest.mark.parametrize("algorithm", ALGS)
def test_expected_digest_mismatch_leaves_nothing(
    mgr: VramManager, st_file: tuple[Path, dict[str, Any]], audit: Any, algorithm: str
) -> None:
    path, _ = st_file
    free = mgr.available_vram()
    with pytest.raises(InvalidInput, match="does not match expected_digest"):
        mgr.seal_file(path, expected_digest="0" * 64, digest_algorithm=algorithm)
    assert_nothing_allocated(mgr, audit, free)
    good = digest(path.read_bytes(), algorithm).hex()
    shard = mgr.seal_file(path, expected_digest=good.upper(), digest_algorithm=algorithm)
    assert shard.digest == good


def _fifo(tmp_path: Path) -> Path:
    p = tmp_path / "fifo.safetensors"
    os.mkfifo(p)
    return p


def _dangling(tmp_path: Path) -> Path:
    p = tmp_path / "link.safetensors"
    p.symlink_to(tmp_path / "gone")
    return p


def _under_file(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_bytes(b"x")
    return tmp_path / "afile" / "model.safetensors"


def _empty(tmp_path: Path) -> Path:
    p = tmp_path / "empty.bin"
    p.write_bytes(b"")
    return p


def _truncated(tmp_path: Path) -> Path:
    p = tmp_path / "t.safetensors"
    save_file({"w": np.arange(100_000, dtype=np.float32)}, str(p))
    p.write_bytes(p.read_bytes()[:-1000])
    return p


def _corrupt_header(tmp_path: Path) -> Path:
    p = tmp_path / "c.safetensors"
    save_file({"w": np.arange(1000, dtype=np.float32)}, str(p))
    raw = bytearray(p.read_bytes())
    raw[9] = ord("!")  # inside the JSON header
    p.write_bytes(raw)
    return p


def _proc_dir(tmp_path: Path) -> Path:
    return Path("/proc/self")


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda t: t / "missing.safetensors", "no such file"),
        (lambda t: t, "directory"),
        (_proc_dir, "directory"),
        (_fifo, "not a regular file"),
        (_dangling, "no such file"),
        (_under_file, "not a directory"),
        (_empty, "empty"),
        (_truncated, "truncated|outside the data section"),
        (_corrupt_header, "corrupt safetensors header"),
    ],
)
def test_bad_files_give_invalid_input_and_allocate_nothing(
    mgr: VramManager, audit: Any, tmp_path: Path, make: Callable[[Path], Path], why: str
) -> None:
    free = mgr.available_vram()
    with pytest.raises(InvalidInput, match=why):
        mgr.seal_file(make(tmp_path))
    assert_nothing_allocated(mgr, audit, free)
    assert "VramAllocated" not in audit.names()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(mgr: VramManager, audit: Any, tmp_path: Path) -> None:
    p = tmp_path / "secret.bin"
    p.write_bytes(b"x" * 100)
    p.chmod(0)
    with pytest.raises(InvalidInput, match="cannot open"):
        mgr.seal_file(p)
    assert mgr.shards() == []


def test_file_that_changes_while_streaming_is_refused(mgr: VramManager, audit: Any, tmp_path: Path) -> None:
    p = tmp_path / "moving.bin"
    p.write_bytes(os.urandom(6 * UNIT_SIZE))
    free = mgr.available_vram()

    def grow(_n: int) -> None:
        with p.open("ab") as f:
            f.write(b"more")

    with pytest.raises(InvalidInput, match="changed while it was being read"):
        mgr.seal_file(p, staging_bytes=2 << 20, progress=grow)
    assert mgr.available_vram() == free and mgr.shards() == []

    def shrink(_n: int) -> None:
        os.truncate(p, UNIT_SIZE)

    p.write_bytes(os.urandom(6 * UNIT_SIZE))
    with pytest.raises(InvalidInput, match=r"truncated|changed"):
        mgr.seal_file(p, staging_bytes=2 << 20, progress=shrink)
    assert mgr.available_vram() == free and mgr.shards() == []


def test_capacity_and_limits(tmp_path: Path, audit: Any) -> None:
    p = tmp_path / "m.bin"
    p.write_bytes(os.urandom(3 * UNIT_SIZE))
    with VramManager("t" * 32, backend="host", capacity_bytes=2 * UNIT_SIZE, audit=audit) as m:
        with pytest.raises(InsufficientVram):
            m.seal_file(p)
        assert m.available_vram() == 2 * UNIT_SIZE
    with VramManager("t" * 32, backend="host", max_model_bytes=UNIT_SIZE) as m:
        with pytest.raises(InvalidInput, match="max_model_bytes"):
            m.seal_file(p)
    with VramManager("t" * 32, backend="host") as m:
        with pytest.raises(InvalidInput, match="staging_bytes"):
            m.seal_file(p, staging_bytes=1 << 30)
        with pytest.raises(InvalidInput, match="digest algorithm"):
            m.seal_file(p, digest_algorithm="md5")


def test_paths_with_nul_bytes_are_invalid_input(tmp_path: Path) -> None:
    good = tmp_path / "m.bin"
    good.write_bytes(b"y" * 64)
    with VramManager("t" * 32, backend="host", capacity_bytes=16 << 20) as mgr:
        start = mgr.available_vram()
        with pytest.raises(InvalidInput):
            mgr.seal_file("model\x00.bin")
        with pytest.raises(InvalidInput):
            mgr.seal_files(["a.bin", "b\x00.bin"])
        with pytest.raises(InvalidInput):
            mgr.seal_file(good, manifest="manifest\x00.json")
        assert mgr.available_vram() == start


def test_file_rewritten_with_its_mtime_restored_is_refused(
    mgr: VramManager, audit: Any, tmp_path: Path
) -> None:
    """A safetensors file rewritten in place (same size, another layout) while it streams, its
    mtime then set back: size and mtime alone say nothing changed, and the shard would hold a
    mix of the old bytes and the new, which no file ever held. The inode change time cannot be
    set back: refused, nothing kept."""
    nx, ny = 4 * 300_000, 4 * 500_000

    def st_bytes(order: list[tuple[str, int]]) -> bytes:
        entries, off = {}, 0
        for name, n in order:
            entries[name] = {"dtype": "F32", "shape": [n // 4], "data_offsets": [off, off + n]}
            off += n
        header = json.dumps(entries).encode().ljust(256)  # both headers 256 bytes long
        return len(header).to_bytes(8, "little") + header + os.urandom(off)

    p = tmp_path / "m.safetensors"
    p.write_bytes(st_bytes([("x", nx), ("y", ny)]))
    # Same names and file length, the tensors in the other order: another layout.
    raw_q = st_bytes([("y", ny), ("x", nx)])
    st0 = p.stat()
    assert len(raw_q) == st0.st_size
    free = mgr.available_vram()
    done = False

    def rewrite(_n: int) -> None:
        nonlocal done
        if not done:
            done = True
            fd = os.open(p, os.O_WRONLY)
            try:
                os.pwrite(fd, raw_q, 0)
            finally:
                os.close(fd)
            os.utime(p, ns=(st0.st_atime_ns, st0.st_mtime_ns))

    with pytest.raises(InvalidInput, match="changed while it was being read"):
        mgr.seal_file(p, staging_bytes=2 << 20, progress=rewrite)
    assert mgr.available_vram() == free and mgr.shards() == []
    assert audit.names()[-2:] == ["SealFailed", "VramDeallocated"]
