"""Sharded checkpoints as one vram-model-v1 model: missing, swapped and extra files are caught."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from vram_residency import InsufficientVram, InvalidInput, SealVerificationFailed, VramManager
from vram_residency.formats import digest
from vram_residency.sources import (
    SealedModel,
    build_manifest,
    check_model_record,
    model_digest,
    write_manifest,
)
from vram_residency.sources.model import parse_model_ref
from vram_residency.testing import flip_bit

SHARDS = [
    {"embed.weight": 700_000, "layers.0.w": 300_000},
    {"layers.1.w": 400_000, "layers.1.b": 300},
    {"head.weight": 800_000},
]


@pytest.fixture
def ckpt(tmp_path: Path, tensors_for: Any, write_sharded: Any) -> tuple[Path, list[Path]]:
    d = tmp_path / "tiny-llm"
    paths = write_sharded(d, [tensors_for(i, s) for i, s in enumerate(SHARDS)])
    return d, paths


def test_checkpoint_seals_as_one_bound_model(
    mgr: VramManager, ckpt: tuple[Path, list[Path]], token: str
) -> None:
    d, paths = ckpt
    model = mgr.seal_files(d)
    assert isinstance(model, SealedModel)
    assert model.names == tuple(p.name for p in paths)
    assert model.name == "tiny-llm"
    name, m = parse_model_ref(model.model_ref)
    assert (name, m) == ("tiny-llm", model.model_digest)
    for i, (p, shard) in enumerate(zip(paths, model.shards, strict=True)):
        assert shard.digest == digest(p.read_bytes()).hex()
        assert (shard.shard_index, shard.total_shards, shard.model_ref) == (i, 3, model.model_ref)
    want = model_digest(
        [
            (p.name, p.stat().st_size, "sha256-tree-v1", s.digest)
            for p, s in zip(paths, model.shards, strict=True)
        ]
    )
    assert want == model.model_digest
    mgr.verify_model(model)
    again = check_model_record(json.loads(json.dumps(model.record())), token)
    assert again.model_ref == model.model_ref and again.names == model.names
    # The index file itself, or the list of files in order, name the same model.
    assert mgr.seal_files(d / "model.safetensors.index.json").model_digest == model.model_digest
    assert mgr.seal_files(paths, model_name="tiny-llm").model_digest == model.model_digest


def test_flip_in_one_file_names_its_tensor(mgr: VramManager, ckpt: tuple[Path, list[Path]]) -> None:
    d, _ = ckpt
    model = mgr.seal_files(d)
    shard = model.shard("model-00003-of-00003.safetensors")
    span = next(t for t in mgr._entry(shard).tensors if t.name == "head.weight")
    flip_bit(mgr, shard, 8 * ((span.start + span.end) // 2))
    with pytest.raises(SealVerificationFailed) as exc:
        mgr.verify_model(model)
    assert exc.value.corrupted_tensors == ["head.weight"]
    assert exc.value.shard_id == shard.shard_id


def test_swapped_files_on_disk_are_refused(
    mgr: VramManager, ckpt: tuple[Path, list[Path]], audit: Any
) -> None:
    d, paths = ckpt
    tmp = d / "tmp"
    paths[0].rename(tmp)
    paths[1].rename(paths[0])
    tmp.rename(paths[1])
    free = mgr.available_vram()
    with pytest.raises(InvalidInput, match="swapped"):
        mgr.seal_files(d)
    assert mgr.available_vram() == free and mgr.shards() == []
    assert "VramAllocated" not in audit.names()


def test_missing_file_is_refused(mgr: VramManager, ckpt: tuple[Path, list[Path]]) -> None:
    d, paths = ckpt
    paths[1].unlink()
    free = mgr.available_vram()
    with pytest.raises(InvalidInput, match="no such file"):
        mgr.seal_files(d)
    assert mgr.available_vram() == free and mgr.shards() == []


def test_manifest_catches_extra_missing_and_reordered_files(
    mgr: VramManager, ckpt: tuple[Path, list[Path]], tmp_path: Path, audit: Any
) -> None:
    d, paths = ckpt
    man = tmp_path / "manifest.json"
    write_manifest(build_manifest(d), man)
    extra = d / "model-00004-of-00003.safetensors"
    shutil.copy(paths[0], extra)
    free = mgr.available_vram()
    for files, why in [
        ([*paths, extra], "not in the manifest"),
        (paths[:2], "missing"),
        ([paths[1], paths[0], paths[2]], "order differs"),
    ]:
        with pytest.raises(InvalidInput, match=why):
            mgr.seal_files(files, manifest=man)
        assert mgr.available_vram() == free and mgr.shards() == []
    assert "VramAllocated" not in audit.names()
    model = mgr.seal_files(paths, manifest=man)
    assert model.model_digest == json.loads(man.read_text())["model"]["sha256-tree-v1"]


def test_content_swap_under_the_same_names_fails_against_the_manifest(
    mgr: VramManager, ckpt: tuple[Path, list[Path]], tmp_path: Path, audit: Any
) -> None:
    d, paths = ckpt
    man = tmp_path / "manifest.json"
    write_manifest(build_manifest(paths), man)
    # Replace the last file with other bytes holding the same tensor names: the index is
    # satisfied, the manifest's per-file digest is not. Files before it were already copied.
    shutil.copy(paths[2], tmp_path / "keep")
    save_file({"head.weight": np.zeros(800_000, dtype=np.float32)}, str(paths[2]))
    free = mgr.available_vram()
    with pytest.raises(InvalidInput, match="does not match the expected digest"):
        mgr.seal_files(d, manifest=man)
    assert mgr.available_vram() == free and mgr.shards() == []
    # Everything copied before the mismatch was freed again.
    assert audit.names().count("VramAllocated") == 3
    assert "VramSealed" not in audit.names()


def _tamper(record: dict[str, Any], how: str) -> dict[str, Any]:
    r = copy.deepcopy(record)
    parts = r["parts"]
    if how == "drop_last":
        parts.pop()
    elif how == "drop_first":
        parts.pop(0)
    elif how == "swap":
        parts[0], parts[1] = parts[1], parts[0]
    elif how == "rename":
        parts[0]["name"] = "model-00009-of-00003.safetensors"
    elif how == "duplicate":
        parts.append(copy.deepcopy(parts[0]))
    elif how == "model_digest":
        r["model_digest"] = "0" * 64
    elif how == "digest_algorithm":
        # Untagged, like model_digest: an accepted record must not say another algorithm.
        r["digest_algorithm"] = "blake3"
    return r


@pytest.mark.parametrize(
    "how", ["drop_last", "drop_first", "swap", "rename", "duplicate", "model_digest", "digest_algorithm"]
)
def test_record_tampering_is_detected(
    mgr: VramManager, ckpt: tuple[Path, list[Path]], token: str, how: str
) -> None:
    model = mgr.seal_files(ckpt[0])
    with pytest.raises(SealVerificationFailed):
        check_model_record(_tamper(model.record(), how), token)


def test_part_seal_given_as_json_text_is_refused(
    mgr: VramManager, ckpt: tuple[Path, list[Path]], token: str
) -> None:
    """A part's seal is the JSON object the record holds; its text (a second spelling of the same
    record, nested JSON inside JSON) is refused, as is any other non-object."""
    record = mgr.seal_files(ckpt[0]).record()
    for seal in (json.dumps(record["parts"][0]["seal"]), None, ["x"]):
        bad = copy.deepcopy(record)
        bad["parts"][0]["seal"] = seal
        with pytest.raises(InvalidInput, match="needs a name and a seal"):
            check_model_record(bad, token)
    check_model_record(record, token)


def test_part_from_another_model_is_detected(
    mgr: VramManager,
    ckpt: tuple[Path, list[Path]],
    token: str,
    tmp_path: Path,
    tensors_for: Any,
    write_sharded: Any,
) -> None:
    a = mgr.seal_files(ckpt[0])
    other = write_sharded(tmp_path / "other", [tensors_for(10 + i, s) for i, s in enumerate(SHARDS)])
    b = mgr.seal_files(other, model_name="tiny-llm")
    mixed = a.record()
    mixed["parts"][1] = b.record()["parts"][1]
    with pytest.raises(SealVerificationFailed, match="belongs to model_ref"):
        check_model_record(mixed, token)
    with pytest.raises(SealVerificationFailed):
        check_model_record(a.record(), "another-token-0123456789abcdef")


@settings(max_examples=25, deadline=None)
@given(order=st.permutations(range(3)))
def test_any_reordering_of_records_fails_unless_identity(order: list[int]) -> None:
    # Pure check on the binding (no files): M depends on the order of the parts.
    parts = [(f"f{i}", 10 * (i + 1), "sha256-tree-v1", f"{i:064x}") for i in range(3)]
    reordered = [parts[i] for i in order]
    same = model_digest(reordered) == model_digest(parts)
    assert same == (list(order) == [0, 1, 2])


def test_resolution_errors(mgr: VramManager, tmp_path: Path, ckpt: tuple[Path, list[Path]]) -> None:
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(InvalidInput, match="index"):
        mgr.seal_files(empty)
    bad = tmp_path / "bad.safetensors.index.json"
    bad.write_text('{"weight_map": {"a": "../../etc/passwd"}}')
    with pytest.raises(InvalidInput, match="leaves the model directory"):
        mgr.seal_files(bad)
    bad.write_text("not json")
    with pytest.raises(InvalidInput, match="corrupt index"):
        mgr.seal_files(bad)
    with pytest.raises(InvalidInput):
        mgr.seal_files([])
    _, paths = ckpt
    with pytest.raises(InvalidInput, match="distinct"):
        mgr.seal_files([paths[0], paths[0]])


def test_hostile_index_files_are_invalid_input(mgr: VramManager, tmp_path: Path) -> None:
    """An index that is a FIFO hung seal_files forever (a plain open waits for a writer); deep
    nesting was a RecursionError and a lone-surrogate file name a UnicodeEncodeError."""
    free = mgr.available_vram()
    fifo = tmp_path / "fifo.safetensors.index.json"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInput, match="not a regular file"):
        mgr.seal_files(fifo)
    bad = tmp_path / "bad.safetensors.index.json"
    for text in ('{"weight_map":' + "[" * 100_000, '{"weight_map": {"a": "\\ud800.safetensors"}}'):
        bad.write_text(text)
        with pytest.raises(InvalidInput, match=r"corrupt index|not valid Unicode"):
            mgr.seal_files(bad)
    bad.write_text('{"weight_map": {"a": "x.safetensors"}, "weight_map": {"a": "y.safetensors"}}')
    with pytest.raises(InvalidInput, match="duplicate key 'weight_map'"):
        mgr.seal_files(bad)
    assert mgr.available_vram() == free and mgr.shards() == []


def test_model_larger_than_free_memory_is_refused_up_front(
    ckpt: tuple[Path, list[Path]], audit: Any, token: str
) -> None:
    d, paths = ckpt
    total = sum(p.stat().st_size for p in paths)
    with VramManager(token, backend="host", capacity_bytes=total - 4096, audit=audit) as m:
        with pytest.raises(InsufficientVram):
            m.seal_files(d)
        assert m.shards() == [] and m.available_vram() == total - 4096
    assert audit.names() == ["VramAllocationFailed"]


def test_model_digest_is_the_module_doc_formula() -> None:
    # M written out from the module doc, byte by byte, for a few parts (one with a non-ASCII
    # name); model_digest joins the parts' bytes into one update and must give the same M.
    import hashlib

    parts = [
        ("model-00001.safetensors", 5, "blake3", "ab" * 32),
        ("schöne-Gewichte", 0, "blake3", "00" * 32),
        ("x", (1 << 64) - 1, "blake3", "ff" * 32),
    ]
    h = hashlib.sha256(b"vram-residency-model-v1" + len(parts).to_bytes(4, "little"))
    for name, size, alg, dig in parts:
        nb, ab = name.encode("utf-8"), alg.encode("ascii")
        h.update(len(nb).to_bytes(4, "little") + nb + len(ab).to_bytes(4, "little") + ab)
        h.update(size.to_bytes(8, "little") + bytes.fromhex(dig))
    assert model_digest(parts) == h.hexdigest()
    with pytest.raises(InvalidInput):
        model_digest([("a", 1, "blake3", "ab" * 32), ("b", 1, "no-such-algorithm", "ab" * 32)])
    with pytest.raises(InvalidInput):
        model_digest([("a", True, "blake3", "ab" * 32)])
    # Digests: exactly 64 lower-case hex characters (no upper case, no spaces fromhex would skip).
    for bad in ("AB" * 32, "ab" * 31 + "a ", "ab" * 30 + " abc", "ab" * 33, "ab" * 31 + "zz", b"ab" * 32):
        with pytest.raises(InvalidInput, match="64 lower-case hex"):
            model_digest([("a", 1, "blake3", bad)])  # type: ignore[list-item]
