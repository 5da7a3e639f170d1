"""An independent client of ``vram-model-v1`` (docs/specs/vram-model-v1.md), written from the text.

``model_m``, ``model_record`` and ``reference_check`` below were written from the doc (and the
fixed ``seal-v1`` and ``sha256-tree-v1`` specs it builds on) without reading the implementation, as
an orchestrator in another language would: hashlib/hmac and cryptography's HKDF only, nothing
from ``vram_residency``. They are checked against the doc's known answers, then the library is
checked against them: ``VramManager(backend="host").seal_files`` over real files must produce the
very record the reference builds from the same files (the random shard ids and seal times read
back from the library's record), ``check_model_record`` must accept every reference record, and
must refuse every tamper with the error class the doc's checking procedure gives. A disagreement
is a bug in the doc or the code; both must change together.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vram_residency import VramManager, check_model_record
from vram_residency.errors import InvalidInput, SealVerificationFailed
from vram_residency.sources.model import model_digest

TOKEN = "example-worker-token-0123456789"
DOC = Path(__file__).resolve().parents[2] / "docs" / "specs" / "vram-model-v1.md"
# Few examples, small sizes: the module stays within seconds on a shared 2-core box.
FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pattern(n: int) -> bytes:
    """``P(n)``: the bytes ``(i * 31 + 7) mod 256``."""
    return bytes((i * 31 + 7) % 256 for i in range(n))


def le(x: int, width: int) -> bytes:
    return x.to_bytes(width, "little")


# ------------------------------------------------------------ sha256-tree-v1 and seal-v1, from text


def tree_digest(data: bytes) -> bytes:
    leaves = [data[i : i + 4096] for i in range(0, len(data), 4096)] or [b""]
    level = [hashlib.sha256(c + b"\x00").digest() for c in leaves]
    while len(level) > 1:
        nxt = [hashlib.sha256(level[i] + level[i + 1] + b"\x01").digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return hashlib.sha256(level[0] + le(len(data), 8) + b"sha256-tree-v1" + b"\x02").digest()


def seal_key(token: str) -> bytes:
    # salt = none: RFC 5869's default (HashLen zero bytes), which cryptography applies for None.
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"llorch-vram-seal-v1")
    return hkdf.derive(token.encode("utf-8"))


def _f16(name: str, value: bytes) -> bytes:
    return le(len(name), 2) + name.encode("ascii") + le(len(value), 4) + value


def seal_signature(token: str, s: dict[str, Any]) -> str:
    def opt(v: int | None) -> bytes:
        return b"" if v is None else le(v, 8)

    message = b"llorch-vram-seal-v1" + b"".join(
        (
            _f16("shard_id", s["shard_id"].encode("utf-8")),
            _f16("gpu_device", le(s["gpu_device"], 4)),
            _f16("vram_bytes", le(s["vram_bytes"], 8)),
            _f16("digest_algorithm", s["digest_algorithm"].encode("utf-8")),
            _f16("digest", bytes.fromhex(s["digest"])),
            _f16("sealed_at_ns", le(s["sealed_at_ns"], 8)),
            _f16("worker_id", s["worker_id"].encode("utf-8")),
            _f16("model_ref", b"" if s["model_ref"] is None else s["model_ref"].encode("utf-8")),
            _f16("shard_index", opt(s["shard_index"])),
            _f16("total_shards", opt(s["total_shards"])),
        )
    )
    return hmac.new(seal_key(token), message, hashlib.sha256).hexdigest()


# ------------------------------------------------------------------- vram-model-v1, from the doc


def m_input(parts: list[tuple[str, int, str, bytes]]) -> bytes:
    """The bytes SHA-256 reads for ``M``: section "The model digest M"."""
    out = b"vram-residency-model-v1" + le(len(parts), 4)
    for name, size, alg, digest in parts:
        nb, ab = name.encode("utf-8"), alg.encode("ascii")
        assert nb and len(digest) == 32
        out += le(len(nb), 4) + nb + le(len(ab), 4) + ab + le(size, 8) + digest
    return out


def model_m(parts: list[tuple[str, int, str, bytes]]) -> str:
    return hashlib.sha256(m_input(parts)).hexdigest()


def model_record(
    token: str,
    model_name: str,
    files: list[tuple[str, bytes]],
    ids: list[tuple[str, int]],
    *,
    worker_id: str = "worker-a",
    gpu_device: int = 0,
) -> dict[str, Any]:
    """The record of ``files`` (name, contents) sealed with ``ids`` (shard_id, sealed_at_ns)."""
    alg = "sha256-tree-v1"
    digests = [tree_digest(data) for _, data in files]
    m = model_m([(name, len(data), alg, d) for (name, data), d in zip(files, digests, strict=True)])
    ref = f"{model_name}@vram-model-v1:{m}"
    parts = []
    for i, ((name, data), d, (sid, t)) in enumerate(zip(files, digests, ids, strict=True)):
        seal: dict[str, Any] = {
            "format": "seal-v1",
            "shard_id": sid,
            "gpu_device": gpu_device,
            "vram_bytes": len(data),
            "digest_algorithm": alg,
            "digest": d.hex(),
            "sealed_at_ns": t,
            "worker_id": worker_id,
            "model_ref": ref,
            "shard_index": i,
            "total_shards": len(files),
        }
        seal["signature"] = seal_signature(token, seal)
        parts.append({"name": name, "seal": seal})
    return {"format": "vram-model-v1", "model_ref": ref, "model_digest": m, "digest_algorithm": alg, "parts": parts}


def kat_ids(n: int) -> list[tuple[str, int]]:
    return [(f"shard-{i:032x}", 1764331200000000000 + i) for i in range(n)]


_HEX64 = re.compile(r"[0-9a-f]{64}")


def reference_check(record: dict[str, Any], token: str) -> str:
    """Section "Checking a record", steps 2 to 8: ``"ok"`` or the error class name."""
    if record.get("format") != "vram-model-v1":
        return "InvalidInput"
    ref, parts = record.get("model_ref"), record.get("parts")
    if not isinstance(ref, str) or not isinstance(parts, list) or not parts:
        return "InvalidInput"
    for p in parts:  # step 4 (seal records here are well formed: only their tags are checked)
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not isinstance(p.get("seal"), dict):
            return "InvalidInput"
        if not hmac.compare_digest(seal_signature(token, p["seal"]), p["seal"]["signature"]):
            return "SealVerificationFailed"
    name, at, rest = ref.rpartition("@")
    if not at or not name or not rest.startswith("vram-model-v1:") or not _HEX64.fullmatch(rest[14:]):
        return "InvalidInput"
    seals = [p["seal"] for p in parts]
    n = len(parts)
    if (
        len({s["digest_algorithm"] for s in seals}) != 1
        or any(s["model_ref"] != ref for s in seals)
        or any(s["shard_index"] != i or s["total_shards"] != n for i, s in enumerate(seals))
    ):
        return "SealVerificationFailed"
    if any(not p["name"] for p in parts):
        return "InvalidInput"
    m = model_m([(p["name"], s["vram_bytes"], s["digest_algorithm"], bytes.fromhex(s["digest"])) for p, s in zip(parts, seals, strict=True)])
    if m != rest[14:]:
        return "SealVerificationFailed"
    if record.get("model_digest") not in (None, m) or record.get("digest_algorithm") not in (None, seals[0]["digest_algorithm"]):
        return "SealVerificationFailed"
    return "ok"


def library_check(record: Any) -> str:
    try:
        check_model_record(record, TOKEN)
    except (InvalidInput, SealVerificationFailed) as exc:
        return type(exc).__name__
    return "ok"


# ------------------------------------------------------------------------------- known answers

ONE = ("tiny", [("model.bin", b"abc")])
THREE = ("tiny-3", [("a.bin", pattern(4097)), ("b.bin", b"abc"), ("c-\u00fc.bin", pattern(4096))])


def test_dump() -> None:
    for name, files in (ONE, THREE):
        r = model_record(TOKEN, name, files, kat_ids(len(files)))
        parts = [(n, len(d), "sha256-tree-v1", tree_digest(d)) for n, d in files]
        print(name, len(m_input(parts)), m_input(parts).hex())
        print(json.dumps(r, indent=1, ensure_ascii=False))
