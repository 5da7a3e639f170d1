"""Commit: what a model is (a name, a path, or bytes), what digest it must have, sealing it.

Digest forms of ``expected_digest`` (llama-orch WORKER-4223, 4113):

* 64 bare hex characters: **SHA-256 of the model bytes**, exactly what ``sha256sum`` prints. It is
  computed while the file streams into device memory (``stream_into(observe=...)``), never as a
  second pass; a mismatch aborts the seal with nothing left allocated.
* ``sha256-tree-v1:<hex>`` or ``blake3:<hex>`` (additions): the seal's own digest under that
  algorithm, compared by the manager as it seals.

Signature (WORKER-4222): an optional Ed25519 signature, base64, over the 32 raw bytes of the
model's SHA-256. It needs a bare-hex ``expected_digest`` (the digest it signs) and a public key
configured on the worker; it is verified *before* anything is loaded, and the bytes streamed must
then hash to that digest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vram_residency._regularfile import read_regular
from vram_residency.errors import ConfigError, InvalidInput
from vram_residency.formats.tree import ALGORITHMS
from vram_residency.service.catalog import ModelNotFound
from vram_residency.service.errors import ModelLoadFailed, PathNotAllowed, SignatureInvalid
from vram_residency.service.executor import ModelFiles

__all__ = [
    "DigestCheck",
    "ModelBytes",
    "bytes_to_file",
    "files_for_path",
    "load_public_keys",
    "parse_expected_digest",
    "verify_signature",
]

_HEX64: Final = re.compile(r"[0-9a-fA-F]{64}")
_PREFIXED: Final = re.compile(r"([a-z0-9-]+):([0-9a-fA-F]{64})")
_SUFFIX_FORMAT: Final = {".safetensors": "safetensors", ".gguf": "gguf"}


@dataclass(frozen=True, slots=True)
class DigestCheck:
    """What a commit's bytes must hash to: a plain SHA-256, or the seal's digest under an algorithm."""

    sha256: str | None = None
    seal_algorithm: str | None = None
    seal_digest: str | None = None


def parse_expected_digest(value: str | None) -> DigestCheck:
    if value is None:
        return DigestCheck()
    if _HEX64.fullmatch(value):
        return DigestCheck(sha256=value.lower())
    m = _PREFIXED.fullmatch(value)
    if m is None or m.group(1) not in ALGORITHMS:
        raise InvalidInput(
            "expected_digest must be 64 hex characters (SHA-256 of the model bytes) or "
            f"ALGORITHM:HEX with ALGORITHM one of {', '.join(ALGORITHMS)}"
        )
    return DigestCheck(seal_algorithm=m.group(1), seal_digest=m.group(2).lower())


class Sha256Observer:
    """Hashes the bytes as they stream in; at the last byte, compares with the expected digest and
    raises (aborting the seal) on a mismatch."""

    def __init__(self, expected: str, size: int) -> None:
        self._h = hashlib.sha256()
        self._expected = expected
        self._remaining = size
        self.hexdigest: str | None = None

    def __call__(self, chunk: memoryview) -> None:
        self._h.update(chunk)
        self._remaining -= len(chunk)
        if self._remaining == 0:
            self.hexdigest = self._h.hexdigest()
            if self.hexdigest != self._expected:
                raise ModelLoadFailed(
                    f"SHA-256 of the model bytes is {self.hexdigest}, not the expected_digest "
                    f"{self._expected}; nothing was sealed"
                )


def load_public_keys(paths: Sequence[Path]) -> tuple[Ed25519PublicKey, ...]:
    """Ed25519 public keys (PEM or 32 raw bytes) that commit signatures may be made with."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    keys = []
    for p in paths:
        try:
            # Regular files only: a FIFO would hold the start, /dev/zero fill the memory. A PEM
            # public key is a few hundred bytes.
            raw = read_regular(p, 64 << 10)
        except OSError as exc:
            raise ConfigError(f"cannot read commit signing key {p}: {exc.strerror}") from None
        try:
            key = Ed25519PublicKey.from_public_bytes(raw) if len(raw) == 32 else load_pem_public_key(raw)
        except ValueError as exc:
            raise ConfigError(f"{p} is not an Ed25519 public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{p} is not an Ed25519 public key")
        keys.append(key)
    return tuple(keys)


def verify_signature(signature: str, check: DigestCheck, keys: Sequence[Ed25519PublicKey]) -> None:
    """Raise unless ``signature`` is a valid Ed25519 signature, by one of ``keys``, of the SHA-256
    that ``check`` expects. Called before anything is loaded."""
    if check.sha256 is None:
        raise SignatureInvalid(
            "a signature needs expected_digest as 64 hex (the SHA-256 it signs); nothing was loaded"
        )
    if not keys:
        raise SignatureInvalid("a signature was given but this worker has no commit signing key configured")
    try:
        sig = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("signature must be base64") from None
    message = bytes.fromhex(check.sha256)
    for key in keys:
        try:
            key.verify(sig, message)
        except InvalidSignature:
            continue
        return
    raise SignatureInvalid(
        "the commit signature does not verify against the SHA-256 given; nothing was loaded"
    )


def files_for_path(name: str, path: Path, roots: Sequence[Path]) -> ModelFiles:
    """A model file given by path: it must resolve (symlinks followed) inside one of ``roots``,
    the directories this worker loads models from. Side files next to it (``config.json``,
    ``tokenizer.json``) are used when present."""
    if "\x00" in str(path):
        # No file system path holds one (os calls raise ValueError, which would be a 500).
        raise InvalidInput("model_bytes path contains a NUL character")
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise ModelNotFound(f"model_bytes path {str(path)!r} does not exist") from None
    if not any(real.is_relative_to(r.resolve()) for r in roots):
        raise PathNotAllowed(
            f"model_bytes path {str(path)!r} is outside the directories this worker loads models from "
            "(--model-dir, the example models); give a path inside one"
        )
    if not real.is_file():
        raise ModelLoadFailed(f"model_bytes path {str(path)!r} is not a regular file")
    root = real.parent

    def side(filename: str) -> Path | None:
        p = root / filename
        return p if p.is_file() else None

    return ModelFiles(
        name=name,
        weights=real,
        format=_SUFFIX_FORMAT.get(real.suffix.lower(), "raw"),
        root=root,
        config=side("config.json"),
        tokenizer=side("tokenizer.json"),
    )


@dataclass(frozen=True, slots=True)
class ModelBytes:
    """Model bytes sent in the request (base64): bounded by the request body limit."""

    data: bytes


def decode_model_bytes(b64: str) -> ModelBytes:
    try:
        return ModelBytes(base64.b64decode(b64, validate=True))
    except (binascii.Error, ValueError):
        raise InvalidInput("model_bytes.base64 is not valid base64") from None


@contextmanager
def bytes_to_file(data: bytes, directory: Path, suffix: str) -> Iterator[Path]:
    """The bytes as a private temporary file (mode 0600) for the streaming sealer; removed after."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(prefix="commit-", suffix=suffix, dir=directory)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        path.unlink(missing_ok=True)


Observer = Callable[[memoryview], None]
