"""Manifests as expected digests: vram-residency JSON, and OpenSSF model-signing bundles (blake3)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from vram_residency import InvalidInput, VramManager
from vram_residency.formats import digest
from vram_residency.sources import Manifest, build_manifest, load_manifest, write_manifest


def _write_keypair(directory: Path, stem: str, curve: Any) -> tuple[Path, Path]:
    """A fresh EC key pair as PEM files: ``stem.pem`` (private) and ``stem.pub`` (public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(curve)
    priv, pub = directory / f"{stem}.pem", directory / f"{stem}.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, pub


def test_roundtrip_both_algorithms(tmp_path: Path, st_file: tuple[Path, dict[str, Any]]) -> None:
    path, _ = st_file
    raw = path.read_bytes()
    man = build_manifest(path, ["sha256-tree-v1", "blake3"], name="tiny")
    (entry,) = man.files
    assert entry.name == "model.safetensors" and entry.size == len(raw)
    assert entry.digests == {a: digest(raw, a).hex() for a in ("sha256-tree-v1", "blake3")}
    out = tmp_path / "m.json"
    write_manifest(man, out)
    doc = json.loads(out.read_text())
    assert doc["format"] == "vram-residency-manifest-v1"
    assert set(doc["model"]) == {"sha256-tree-v1", "blake3"}
    again = load_manifest(out)
    assert again.files == man.files and dict(again.model_digests) == dict(man.model_digests)


@pytest.mark.parametrize("algorithm", ["sha256-tree-v1", "blake3"])
def test_seal_file_with_manifest(
    mgr: VramManager, tmp_path: Path, st_file: tuple[Path, dict[str, Any]], audit: Any, algorithm: str
) -> None:
    path, _ = st_file
    out = tmp_path / "m.json"
    write_manifest(build_manifest(path, [algorithm]), out)
    shard = mgr.seal_file(path, manifest=out, digest_algorithm=algorithm)
    assert shard.digest == json.loads(out.read_text())["files"][0]["digests"][algorithm]
    mgr.deallocate(shard)
    # The same file, one bit changed on disk: refused, nothing left allocated.
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1
    path.write_bytes(raw)
    free = mgr.available_vram()
    with pytest.raises(InvalidInput, match="does not match"):
        mgr.seal_file(path, manifest=load_manifest(out), digest_algorithm=algorithm)
    assert mgr.available_vram() == free and mgr.shards() == []


def test_manifest_problems(mgr: VramManager, tmp_path: Path, st_file: tuple[Path, dict[str, Any]]) -> None:
    path, _ = st_file
    out = tmp_path / "m.json"
    write_manifest(build_manifest(path, ["blake3"]), out)
    with pytest.raises(InvalidInput, match="no sha256-tree-v1 digest"):
        mgr.seal_file(path, manifest=out)
    other = tmp_path / "other.bin"
    other.write_bytes(b"x" * 100)
    with pytest.raises(InvalidInput, match="lists no file"):
        mgr.seal_file(other, manifest=out, digest_algorithm="blake3")
    good = digest(path.read_bytes(), "blake3").hex()
    with pytest.raises(InvalidInput, match="disagree"):
        mgr.seal_file(path, manifest=out, expected_digest="1" * 64, digest_algorithm="blake3")
    assert mgr.seal_file(path, manifest=out, expected_digest=good, digest_algorithm="blake3").digest == good
    # Hand edits that make the manifest inconsistent are refused when it is read.
    doc = json.loads(out.read_text())
    doc["files"][0]["digests"]["blake3"] = "0" * 64
    out.write_text(json.dumps(doc))
    with pytest.raises(InvalidInput, match="does not follow from its files"):
        load_manifest(out)
    doc["files"][0]["size"] = 1
    doc["model"] = {}
    out.write_text(json.dumps(doc))
    with pytest.raises(InvalidInput, match="manifest records 1"):
        mgr.seal_file(path, manifest=out, digest_algorithm="blake3")
    for bad in ("[]", "{}", "not json", '{"format": "vram-residency-manifest-v1", "name": "x", "files": []}'):
        out.write_text(bad)
        with pytest.raises(InvalidInput):
            load_manifest(out)
    write_manifest(build_manifest(path), out)
    with pytest.raises(InvalidInput, match="public key does not apply"):
        load_manifest(out, public_key=out)


def test_manifest_nested_or_with_repeated_keys_is_invalid_input(
    tmp_path: Path, st_file: tuple[Path, dict[str, Any]]
) -> None:
    """Nesting past the JSON parser's recursion limit was a RecursionError traceback (also from
    ``vram-residency seal --manifest``); a repeated key was read as its last value."""
    path, _ = st_file
    out = tmp_path / "m.json"
    for deep in ("[" * 100_000, '{"a":' * 100_000):
        out.write_text(deep)
        with pytest.raises(InvalidInput, match="not valid JSON"):
            load_manifest(out)
    write_manifest(build_manifest(path), out)
    text = out.read_text().rstrip()
    load_manifest(out)
    out.write_text(text[:-1] + ', "name": "another"}')
    with pytest.raises(InvalidInput, match="duplicate key 'name'"):
        load_manifest(out)


def test_manifest_matches_by_relative_path(tmp_path: Path) -> None:
    man = Manifest(
        "m",
        (
            _entry("1_Pooling/config.json"),
            _entry("config.json"),
        ),
        origin="openssf-model-signing",
    )
    # Both entries end this path; the longer, more specific one is the file.
    assert man.entry_for(tmp_path / "model" / "1_Pooling" / "config.json").name == "1_Pooling/config.json"
    assert man.entry_for(tmp_path / "model" / "config.json").name == "config.json"
    assert man.entry_for(tmp_path / "elsewhere.json", "config.json").name == "config.json"
    with pytest.raises(InvalidInput, match="lists no file"):
        man.entry_for(tmp_path / "model" / "other.json")


def _entry(name: str) -> Any:
    from vram_residency.sources import ManifestEntry

    return ManifestEntry(name, None, {"blake3": "0" * 64})


# -- OpenSSF model signing ---------------------------------------------------------------------------


def _model_signing() -> Any:
    try:
        import model_signing
    except ImportError as exc:  # its signing module needs pyOpenSSL, which it does not declare
        pytest.skip(f"model_signing cannot be imported here: {exc}")
    return model_signing


@pytest.fixture
def signed_model(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A model directory signed with a fresh EC key through model_signing's own API (blake3)."""
    ms = _model_signing()
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric import ec
    from safetensors.numpy import save_file

    model = tmp_path / "model"
    (model / "1_Pooling").mkdir(parents=True)
    save_file({"w": np.arange(500_000, dtype=np.float32)}, str(model / "model.safetensors"))
    (model / "config.json").write_text('{"hidden": 8}')
    (model / "1_Pooling" / "config.json").write_text('{"pooling": "mean"}')
    priv, pub = _write_keypair(tmp_path, "key", ec.SECP256R1())
    sig = tmp_path / "model.sig"
    cfg = ms.signing.Config().use_elliptic_key_signer(private_key=priv)
    cfg.set_hashing_config(ms.hashing.Config().use_file_serialization(hashing_algorithm="blake3"))
    cfg.sign(model, sig)
    return model, sig, pub, priv


def test_openssf_bundle_gives_blake3_expected_digests(
    mgr: VramManager, signed_model: tuple[Path, Path, Path, Path], audit: Any
) -> None:
    model, sig, pub, _ = signed_model
    man = load_manifest(sig, public_key=pub)
    assert man.origin == "openssf-model-signing"
    assert {e.name for e in man.files} == {"model.safetensors", "config.json", "1_Pooling/config.json"}
    weights = model / "model.safetensors"
    shard = mgr.seal_file(weights, manifest=man, digest_algorithm="blake3")
    assert shard.digest == digest(weights.read_bytes(), "blake3").hex()
    # Our own digest is not in an OpenSSF manifest.
    with pytest.raises(InvalidInput, match="no sha256-tree-v1 digest"):
        mgr.seal_file(weights, manifest=man)
    # The file changed after signing: the signed digest no longer matches, nothing is sealed.
    mgr.deallocate(shard)
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x80
    weights.write_bytes(raw)
    free = mgr.available_vram()
    with pytest.raises(InvalidInput, match="does not match"):
        mgr.seal_file(weights, manifest=man, digest_algorithm="blake3")
    assert mgr.available_vram() == free and mgr.shards() == []


def test_openssf_signature_is_checked(tmp_path: Path, signed_model: tuple[Path, Path, Path, Path]) -> None:
    _, sig, pub, _ = signed_model
    with pytest.raises(InvalidInput, match="public key"):
        load_manifest(sig)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = tmp_path / "other.pub"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(InvalidInput, match="does not verify"):
        load_manifest(sig, public_key=other)
    # Tamper with the signed payload (a digest inside the in-toto statement).
    import base64

    doc = json.loads(sig.read_text())
    payload = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    resources = payload["predicate"]["resources"]
    resources[0]["digest"] = "00" * 32
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    forged = tmp_path / "forged.sig"
    forged.write_text(json.dumps(doc))
    with pytest.raises(InvalidInput, match="does not verify"):
        load_manifest(forged, public_key=pub)


def test_openssf_sha256_bundle_is_not_accepted(tmp_path: Path) -> None:
    ms = _model_signing()
    from cryptography.hazmat.primitives.asymmetric import ec

    model = tmp_path / "m"
    model.mkdir()
    (model / "w.bin").write_bytes(os.urandom(1000))
    priv, pub = _write_keypair(tmp_path, "k", ec.SECP384R1())
    sig = tmp_path / "m.sig"
    cfg = ms.signing.Config().use_elliptic_key_signer(private_key=priv)
    cfg.set_hashing_config(ms.hashing.Config().use_file_serialization(hashing_algorithm="sha256"))
    cfg.sign(model, sig)
    with pytest.raises(InvalidInput, match="only per-file blake3"):
        load_manifest(sig, public_key=pub)
