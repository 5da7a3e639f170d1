"""Resource bounds a long-lived worker relies on: how many tensors one header or one model may
list (``max_tensors``), and how many model files a seal holds open at once.

Every file here is real (written to disk and sealed through the public API); the bounds are
crossed by one tensor and met exactly, and a refusal must leave nothing allocated.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vram_residency import ConfigError, InvalidInput, VramManager
from vram_residency.sources import (
    DEFAULT_MAX_TENSORS,
    open_model_file,
    parse_safetensors_header,
    safetensors_header_size,
)

TOKEN = "bounds-test-token-0123456789abcdef"
SMALL = 1000


def write_tiny(path: Path, n: int, *, first: int = 0, fill: int = 1) -> Path:
    """A valid safetensors file of ``n`` one-byte U8 tensors named ``t<first>`` .. (built as text:
    json.dumps of a dict of a million entries would itself take seconds)."""
    body = ",".join(
        f'"t{first + i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(n)
    )
    raw = ("{" + body + "}").encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes([fill]) * n)
    return path


def parse(path: Path, **kw: Any) -> Any:
    data = path.read_bytes()
    return parse_safetensors_header(data, len(data), str(path), **kw)


def manager(**kw: Any) -> VramManager:
    return VramManager(TOKEN, backend="host", capacity_bytes=64 << 20, **kw)


def test_default_bound_covers_the_largest_checkpoints() -> None:
    # DeepSeek-V3 / Kimi-K2 in block-scaled FP8 list about 90k / 140k tensors (weights and
    # scales of every expert); 2**18 leaves room above them.
    assert DEFAULT_MAX_TENSORS == 262_144
    with manager() as m:
        assert m.max_tensors == DEFAULT_MAX_TENSORS


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "10"])
def test_max_tensors_must_be_a_positive_int(bad: Any) -> None:
    with pytest.raises(ConfigError, match="max_tensors"):
        manager(max_tensors=bad)


def test_header_at_the_bound_parses_one_more_is_refused(tmp_path: Path) -> None:
    at = parse(write_tiny(tmp_path / "at.safetensors", SMALL), max_tensors=SMALL)
    assert len(at.entries) == SMALL
    with pytest.raises(InvalidInput, match=f"more than {SMALL} tensors"):
        parse(write_tiny(tmp_path / "over.safetensors", SMALL + 1), max_tensors=SMALL)


def test_header_over_the_default_bound_is_refused(tmp_path: Path) -> None:
    over = write_tiny(tmp_path / "over.safetensors", DEFAULT_MAX_TENSORS + 1)
    with pytest.raises(InvalidInput, match=f"more than {DEFAULT_MAX_TENSORS} tensors"):
        parse(over)


def test_refusal_stops_parsing_at_the_bound(tmp_path: Path) -> None:
    # 100k entries: a full parse builds ~90 MiB of Python objects (measured with tracemalloc).
    # Refused after the first SMALL objects, the peak is the header text and its decoded copy.
    path = write_tiny(tmp_path / "big.safetensors", 100_000)
    data = path.read_bytes()
    head_len = safetensors_header_size(data, len(data), "big")
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match="tensors"):
            parse_safetensors_header(data, len(data), "big", max_tensors=SMALL)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * head_len + (4 << 20), (peak, head_len)


def test_seal_file_over_the_bound_leaves_nothing(tmp_path: Path) -> None:
    over = write_tiny(tmp_path / "over.safetensors", SMALL + 1)
    at = write_tiny(tmp_path / "at.safetensors", SMALL)
    with manager(max_tensors=SMALL) as m:
        free = m.available_vram
        with pytest.raises(InvalidInput, match=f"more than {SMALL} tensors"):
            m.seal_file(over)
        assert m.shards() == [] and m.available_vram == free
        shard = m.seal_file(at)
        m.verify_sealed(shard)
        assert len(m.store.lookup(shard).tensors) == SMALL + 1  # the header's span, then each tensor


def test_gguf_over_the_bound_is_refused(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")

    def write(path: Path, n: int) -> Path:
        w = gguf.GGUFWriter(str(path), "llama")
        for i in range(n):
            w.add_tensor(f"t{i}", np.ones(1, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    with manager(max_tensors=10) as m:
        with pytest.raises(InvalidInput, match="more than 10 tensors"):
            m.seal_file(write(tmp_path / "over.gguf", 11))
        assert m.shards() == []
        m.seal_file(write(tmp_path / "at.gguf", 10))


def test_seal_files_bounds_the_model_total(tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    write_tiny(d / "a.safetensors", SMALL // 2)
    write_tiny(d / "b.safetensors", SMALL // 2 + 1, first=SMALL)
    with manager(max_tensors=SMALL) as m:
        free = m.available_vram
        with pytest.raises(InvalidInput, match=f"more than {SMALL} tensors"):
            m.seal_files(sorted(d.iterdir()))
        assert m.shards() == [] and m.available_vram == free
        (d / "b.safetensors").unlink()
        write_tiny(d / "b.safetensors", SMALL // 2, first=SMALL)
        m.verify_model(m.seal_files(sorted(d.iterdir())))


def test_seal_tensors_bounds_the_count(tmp_path: Path) -> None:
    arena = np.ones(4 * (SMALL + 1), dtype=np.uint8)
    views = {f"t{i}": arena[4 * i : 4 * i + 4] for i in range(SMALL + 1)}
    with manager(max_tensors=SMALL) as m:
        with pytest.raises(InvalidInput, match=f"more than {SMALL} tensors"):
            m.seal_tensors(views)
        assert m.shards() == []
        views.pop(f"t{SMALL}")
        model = m.seal_tensors(views)
        assert len(model.parts) == SMALL
        m.verify_model(model)


# -- descriptors held by seal_files -----------------------------------------------------------


def _fds_under(directory: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory)):
                n += 1
        except OSError:
            pass  # the descriptor listdir itself used, closed meanwhile
    return n


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
def test_seal_files_holds_one_model_file_open_at_a_time(tmp_path: Path) -> None:
    d = tmp_path / "many"
    d.mkdir()
    for i in range(12):
        write_tiny(d / f"part-{i:03d}.safetensors", 3, first=3 * i)
    seen: list[int] = []
    with manager() as m:
        model = m.seal_files(sorted(d.iterdir()), progress=lambda _n: seen.append(_fds_under(d)))
        m.verify_model(model)
    assert seen and max(seen) == 1, seen
    assert _fds_under(d) == 0


_LOW_NOFILE = r"""
import os, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_bounds import manager, write_tiny
d = Path(sys.argv[1])
for i in range(int(sys.argv[3])):
    write_tiny(d / f"part-{i:03d}.safetensors", 2, first=2 * i)
m = manager()  # imported and started before the limit: only the seal itself is measured
open_now = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 12, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
model = m.seal_files(sorted(d.iterdir()))
m.verify_model(model)
print(len(model.parts), open_now)
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
def test_seal_files_of_more_files_than_free_descriptors(tmp_path: Path) -> None:
    # 64 files under a descriptor limit that leaves 12 free: holding every file open would hit
    # EMFILE after 12 of them.
    d = tmp_path / "model"
    d.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", _LOW_NOFILE, str(d), str(Path(__file__).parent), "64"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[0] == "64"


@pytest.mark.parametrize("how", ["in_place", "rename_over"])
def test_a_file_rewritten_before_its_turn_is_refused(tmp_path: Path, how: str) -> None:
    # The files are parsed (and checked against each other) first, then streamed one at a time:
    # a later file rewritten meanwhile, in place or by a rename over its path, must not be sealed
    # with the layout parsed from its old bytes.
    d = tmp_path / "model"
    d.mkdir()
    write_tiny(d / "a.safetensors", 4)
    target = write_tiny(d / "b.safetensors", 4, first=4)
    done: list[bool] = []

    def rewrite(_n: int) -> None:
        if done:
            return
        done.append(True)
        if how == "in_place":
            with open(target, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                f.write(b"\x07")
        else:
            other = write_tiny(tmp_path / "other.safetensors", 4, first=4, fill=9)
            other.replace(target)

    with manager() as m:
        free = m.available_vram
        with pytest.raises(InvalidInput, match="changed"):
            m.seal_files(sorted(d.iterdir()), progress=rewrite)
        assert done and m.shards() == [] and m.available_vram == free


def test_records_stay_json(tmp_path: Path) -> None:
    # The tensor index is kept with the shard, not written into its seal record: a file at the
    # bound still has a small record.
    with manager(max_tensors=SMALL) as m:
        shard = m.seal_file(write_tiny(tmp_path / "at.safetensors", SMALL))
        assert len(json.dumps(shard.record())) < 2000


def test_check_header_compares_the_copied_header_bytes(tmp_path: Path) -> None:
    # The exact check behind reopen's timestamps: header bytes that differ from those parsed are
    # refused, the same ones (with any data after them) pass.
    path = write_tiny(tmp_path / "a.safetensors", 4)
    other = write_tiny(tmp_path / "b.safetensors", 4, first=1)
    with open_model_file(path) as opened:
        opened.check_header(path.read_bytes())
        with pytest.raises(InvalidInput, match="header differs"):
            opened.check_header(other.read_bytes())
    with opened.reopen() as again:
        assert again.layout == opened.layout and again.fd >= 0
    # The same bytes written again: only the ctime moves (on a clock of coarse ticks, once a tick
    # has passed since the file was parsed: written again until it shows).
    was = os.stat(path).st_ctime_ns
    for _ in range(200):
        path.write_bytes(path.read_bytes())
        if os.stat(path).st_ctime_ns != was:
            break
        time.sleep(0.005)
    with pytest.raises(InvalidInput, match="changed between its check and its copy"):
        opened.reopen()


def test_index_listing_more_tensors_than_the_bound_is_refused_first(tmp_path: Path) -> None:
    # A 53 MB index of 2,000,000 weight_map entries took 7 s and 0.5 GiB to read (measured); one
    # past the bound is refused before any file it names is opened (none exists here).
    d = tmp_path / "model"
    d.mkdir()
    weight_map = {f"t{i}": f"model-{i % 3:05d}.safetensors" for i in range(SMALL + 1)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with manager(max_tensors=SMALL) as m:
        with pytest.raises(InvalidInput, match=f"more than {SMALL} tensors"):
            m.seal_files(d)
        assert m.shards() == []
