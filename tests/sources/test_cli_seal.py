"""``vram-residency seal``, ``manifest`` and ``digest --manifest``, run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from vram_residency import check_seal_record
from vram_residency.formats import digest
from vram_residency.sources import check_model_record

CLI = [sys.executable, "-m", "vram_residency.cli.main"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "WORKER_API_TOKEN_FILE"}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, env={**base, **(env or {})}
    )


def token_file(tmp_path: Path, token: str) -> Path:
    p = tmp_path / "worker.token"
    p.write_text(token + "\n")
    p.chmod(0o600)
    return p


def test_seal_one_file_with_token_file(
    tmp_path: Path, st_file: tuple[Path, dict[str, Any]], token: str
) -> None:
    path, _ = st_file
    tf = token_file(tmp_path, token)
    out = run("seal", "--backend", "host", "--token-file", str(tf), "--worker-id", "w-9", str(path))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["backend"] == "host" and "EMULATION" in doc["backend_description"]
    assert doc["verified"] is True and doc["ephemeral_token"] is False and doc["model"] is None
    (record,) = doc["records"]
    shard = check_seal_record(record, token)
    assert shard.digest == digest(path.read_bytes()).hex() and shard.worker_id == "w-9"
    assert "GiB/s" in out.stderr and "ephemeral" not in out.stderr
    # The same through the environment variable.
    out = run("seal", "--backend", "host", str(path), env={"WORKER_API_TOKEN_FILE": str(tf)})
    assert out.returncode == 0, out.stderr
    check_seal_record(json.loads(out.stdout)["records"][0], token)


def test_seal_without_token_says_it_is_ephemeral(st_file: tuple[Path, dict[str, Any]]) -> None:
    out = run("seal", "--backend", "host", "-a", "blake3", str(st_file[0]))
    assert out.returncode == 0, out.stderr
    assert "ephemeral token" in out.stderr
    doc = json.loads(out.stdout)
    assert doc["ephemeral_token"] is True
    assert doc["records"][0]["digest"] == digest(st_file[0].read_bytes(), "blake3").hex()


def test_seal_checkpoint_and_manifest(
    tmp_path: Path, tensors_for: Any, write_sharded: Any, token: str
) -> None:
    d = tmp_path / "ckpt"
    write_sharded(d, [tensors_for(1, {"a": 300_000}), tensors_for(2, {"b": 200_000})])
    man = tmp_path / "manifest.json"
    out = run("manifest", "-o", str(man), "-a", "sha256-tree-v1", "-a", "blake3", str(d))
    assert out.returncode == 0, out.stderr
    doc = json.loads(man.read_text())
    assert [f["name"] for f in doc["files"]] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    tf = token_file(tmp_path, token)
    out = run("seal", "--backend", "host", "--token-file", str(tf), "--manifest", str(man), str(d))
    assert out.returncode == 0, out.stderr
    sealed = json.loads(out.stdout)
    model = check_model_record(sealed["model"], token)
    assert model.model_digest == doc["model"]["sha256-tree-v1"]
    assert len(sealed["records"]) == 2
    # digest --manifest writes the same manifest for one algorithm, and prints digest lines.
    man2 = tmp_path / "m2.json"
    out = run("digest", "--manifest", str(man2), "-a", "blake3", str(d))
    assert out.returncode == 0, out.stderr
    assert json.loads(man2.read_text())["model"] == {"blake3": doc["model"]["blake3"]}
    assert out.stdout.split()[0] == doc["files"][0]["digests"]["blake3"]


def test_seal_errors_exit_1(tmp_path: Path, st_file: tuple[Path, dict[str, Any]]) -> None:
    out = run("seal", "--backend", "host", str(tmp_path / "missing.safetensors"))
    assert out.returncode == 1
    assert "InvalidInput" in out.stderr and "no such file" in out.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    out = run("seal", "--backend", "host", "--manifest", str(bad), str(st_file[0]))
    assert out.returncode == 1 and "InvalidInput" in out.stderr
    loose = tmp_path / "loose.token"
    loose.write_text("x" * 40)
    loose.chmod(0o644)
    out = run("seal", "--backend", "host", "--token-file", str(loose), str(st_file[0]))
    assert out.returncode == 1 and "ConfigError" in out.stderr
    assert "x" * 40 not in out.stderr  # the token never shows
    out = run("seal", "--backend", "host", "--staging-mib", "1024", str(st_file[0]))
    assert out.returncode == 2


def test_seal_bad_manifest_or_lone_public_key_exit_1(
    tmp_path: Path, st_file: tuple[Path, dict[str, Any]]
) -> None:
    """A manifest nested past the JSON parser's limit was a RecursionError traceback; a
    ``--public-key`` without ``--manifest`` was ignored, so the files were sealed unchecked."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    out = run("seal", "--backend", "host", "--manifest", str(deep), str(st_file[0]))
    assert out.returncode == 1 and "InvalidInput" in out.stderr and "not valid JSON" in out.stderr
    assert "Traceback" not in out.stderr
    out = run("seal", "--backend", "host", "--public-key", str(deep), str(st_file[0]))
    assert out.returncode == 1 and "no --manifest given" in out.stderr
    assert out.stdout == ""  # nothing was sealed
