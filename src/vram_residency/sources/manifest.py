"""Manifests: the expected digests of a model's files, written before and checked at seal time.

Format ``vram-residency-manifest-v1`` (JSON)::

    {
      "format": "vram-residency-manifest-v1",
      "name": "all-MiniLM-L6-v2",
      "model_digest_scheme": "vram-model-v1",
      "model": {"sha256-tree-v1": "<hex M>", "blake3": "<hex M>"},
      "files": [
        {"name": "model-00001-of-00002.safetensors", "size": 4998..., "digests": {
            "sha256-tree-v1": "<hex>", "blake3": "<hex>"}},
        ...
      ]
    }

``files`` are in model order; each digest is the file's digest under that algorithm (the value
``vram-residency digest`` prints and the digest its shard is sealed with). ``model`` holds, per
algorithm, the ``vram-model-v1`` digest ``M`` of the files in that order (``sources.model``):
the value that ``seal_files`` puts in the model_ref when it seals exactly these files. Either
algorithm or both may be recorded.

For ``blake3`` an OpenSSF model-signing signature (a Sigstore bundle written by the
``model_signing`` package with ``hashing_algorithm="blake3"``) also serves as a manifest: its
per-file digests are plain BLAKE3 of each file, the same digest. Its signature is checked first,
with the signer's public key (``model_signing``'s elliptic-curve key path); a bundle whose check
fails is refused. Keyless Sigstore bundles need the public-good Sigstore services (trust root,
transparency log) to verify, so they are not accepted here.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final

from vram_residency.errors import InvalidInput
from vram_residency.formats.stream import StreamHasher
from vram_residency.formats.tree import ALGORITHMS, BLAKE3, SHA256_TREE_V1, check_algorithm
from vram_residency.shard import parse_record_text
from vram_residency.sources.index import PathArg, resolve_model_files
from vram_residency.sources.layout import open_model_file
from vram_residency.sources.model import MODEL_DIGEST_NAME, model_digest
from vram_residency.sources.stream import Progress

__all__ = [
    "MANIFEST_FORMAT",
    "OPENSSF_ORIGIN",
    "Manifest",
    "ManifestEntry",
    "build_manifest",
    "load_manifest",
    "load_openssf_manifest",
    "write_manifest",
]

MANIFEST_FORMAT: Final = "vram-residency-manifest-v1"
OPENSSF_ORIGIN: Final = "openssf-model-signing"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_READ_CHUNK: Final = 64 << 20
_MAX_MANIFEST_BYTES: Final = 64 << 20


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One file: its name inside the model, its size (None where the manifest has none), and
    its digest under each recorded algorithm (lower-case hex)."""

    name: str
    size: int | None
    digests: Mapping[str, str]

    def expected(self, algorithm: str, *, manifest_name: str = "the manifest") -> str:
        try:
            return self.digests[algorithm]
        except KeyError:
            have = ", ".join(sorted(self.digests)) or "none"
            raise InvalidInput(
                f"{manifest_name} records no {algorithm} digest for {self.name!r} (it has: {have})"
            ) from None


@dataclass(frozen=True, slots=True)
class Manifest:
    """Expected digests of a model's files (see the module doc for the JSON form)."""

    name: str
    files: tuple[ManifestEntry, ...]
    model_digests: Mapping[str, str] = field(default_factory=dict)
    origin: str = MANIFEST_FORMAT

    @property
    def is_complete_model(self) -> bool:
        """True when ``files`` are exactly the model's files in order (a vram-residency manifest);
        an OpenSSF manifest lists every file of a model directory, configs included."""
        return self.origin == MANIFEST_FORMAT

    def describe(self) -> str:
        return f"{self.origin} manifest {self.name!r}"

    def entry_for(self, path: Path, name: str | None = None) -> ManifestEntry:
        """The entry of a file: by exact ``name`` if given, else the entry whose path components
        end the file's path, the longest such (``/m/1_Pooling/config.json`` is
        ``1_Pooling/config.json``, not ``config.json``)."""
        if name is not None:
            for e in self.files:
                if e.name == name:
                    return e
        parts = Path(os.path.abspath(path)).parts
        found = [
            (len(p), e)
            for e in self.files
            if (p := PurePosixPath(e.name).parts) and tuple(parts[-len(p) :]) == p
        ]
        if not found:
            raise InvalidInput(f"{self.describe()} lists no file matching {path}; nothing was sealed")
        return max(found, key=lambda t: t[0])[1]

    def check_file_list(self, names: Sequence[str]) -> None:
        """``InvalidInput`` unless ``names`` are this manifest's files, in its order."""
        want = [e.name for e in self.files]
        if list(names) == want:
            return
        missing = [n for n in want if n not in names]
        extra = [n for n in names if n not in want]
        detail = []
        if missing:
            detail.append(f"missing {missing[:5]}")
        if extra:
            detail.append(f"not in the manifest {extra[:5]}")
        if not detail:
            detail.append(f"order differs: manifest has {want[:5]}, got {list(names)[:5]}")
        raise InvalidInput(
            f"model files do not match {self.describe()}: {'; '.join(detail)}; nothing was sealed"
        )

    def to_json(self) -> dict[str, Any]:
        if not self.is_complete_model:
            raise InvalidInput("only vram-residency manifests are written; OpenSSF ones are signed bundles")
        return {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "model_digest_scheme": MODEL_DIGEST_NAME,
            "model": dict(self.model_digests),
            "files": [{"name": e.name, "size": e.size, "digests": dict(e.digests)} for e in self.files],
        }

    @classmethod
    def from_json(cls, doc: object, *, source: str = "manifest") -> Manifest:
        """Parse and check a ``vram-residency-manifest-v1`` document (model digests included)."""
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise InvalidInput(f"{source}: not a {MANIFEST_FORMAT} document")
        name, files, model = doc.get("name"), doc.get("files"), doc.get("model", {})
        if (
            not isinstance(name, str)
            or not isinstance(files, list)
            or not files
            or not isinstance(model, dict)
        ):
            raise InvalidInput(f"{source}: needs a name, a non-empty files list and a model object")
        if doc.get("model_digest_scheme", MODEL_DIGEST_NAME) != MODEL_DIGEST_NAME:
            raise InvalidInput(f"{source}: unknown model_digest_scheme {doc.get('model_digest_scheme')!r}")
        entries = tuple(_entry_from_json(f, source) for f in files)
        if len({e.name for e in entries}) != len(entries):
            raise InvalidInput(f"{source}: file names repeat")
        man = cls(name, entries, {check_algorithm(a): _hex(d, source) for a, d in model.items()})
        # The model digests must follow from the files: a hand-edited file digest with a stale
        # model digest (or the reverse) is an inconsistent manifest, not a usable one.
        for algorithm, m in man.model_digests.items():
            if m != _model_digest_of(man.files, algorithm, source):
                raise InvalidInput(f"{source}: model digest for {algorithm} does not follow from its files")
        return man


def _hex(v: object, source: str) -> str:
    if not isinstance(v, str) or not _HEX64.fullmatch(v.lower()):
        raise InvalidInput(f"{source}: digests must be 64 hex characters")
    return v.lower()


def _entry_from_json(f: object, source: str) -> ManifestEntry:
    if not isinstance(f, dict):
        raise InvalidInput(f"{source}: each file must be an object")
    name, size, digests = f.get("name"), f.get("size"), f.get("digests")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{source}: a file has no name")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise InvalidInput(f"{source}: file {name!r} has an invalid size")
    if not isinstance(digests, dict) or not digests:
        raise InvalidInput(f"{source}: file {name!r} has no digests")
    return ManifestEntry(name, size, {check_algorithm(a): _hex(d, source) for a, d in digests.items()})


def _model_digest_of(files: Iterable[ManifestEntry], algorithm: str, source: str) -> str:
    parts = []
    for e in files:
        if e.size is None or algorithm not in e.digests:
            raise InvalidInput(
                f"{source}: file {e.name!r} lacks the size or {algorithm} digest for the model digest"
            )
        parts.append((e.name, e.size, algorithm, e.digests[algorithm]))
    return model_digest(parts)


def build_manifest(
    paths: PathArg | Sequence[PathArg],
    algorithms: Sequence[str] = (SHA256_TREE_V1,),
    *,
    name: str | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Digest the model's files (one streamed read each, every algorithm at once) into a manifest.

    ``paths`` are resolved as ``seal_files`` resolves them (an index or directory gives the
    checkpoint's files in model order), so the manifest's model digest is the one ``seal_files``
    will seal."""
    algs = tuple(dict.fromkeys(check_algorithm(a) for a in algorithms))
    if not algs:
        raise InvalidInput(f"choose at least one algorithm of {ALGORITHMS}")
    files = resolve_model_files(paths)
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    entries = []
    try:
        for mf in files:
            with open_model_file(mf.path, "raw") as opened:
                hashers = [StreamHasher(a) for a in algs]
                pos = 0
                while pos < opened.size:
                    n = min(_READ_CHUNK, opened.size - pos)
                    got = os.preadv(opened.fd, [view[:n]], pos)
                    if got == 0:
                        raise InvalidInput(f"{mf.path} was truncated while being read")
                    for h in hashers:
                        h.update(view[:got])
                    pos += got
                    if progress is not None:
                        progress(got)
                opened.check_unchanged()
                digests = {a: h.finalize().digest.hex() for a, h in zip(algs, hashers, strict=True)}
            entries.append(ManifestEntry(mf.name, opened.size, digests))
    finally:
        view.release()
    model_name = name or files[0].path.resolve().parent.name or "model"
    return Manifest(model_name, tuple(entries), {a: _model_digest_of(entries, a, "manifest") for a in algs})


def write_manifest(manifest: Manifest, out: PathArg) -> None:
    """Write ``manifest`` as JSON, atomically (a reader never sees half a manifest)."""
    target = Path(out)
    text = json.dumps(manifest.to_json(), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_manifest(path: PathArg, *, public_key: PathArg | None = None) -> Manifest:
    """Read a ``vram-residency-manifest-v1`` file, or (with ``public_key``) an OpenSSF
    model-signing signature, checking its signature first."""
    with open_model_file(path, "raw") as opened:
        if opened.size > _MAX_MANIFEST_BYTES:
            raise InvalidInput(f"{path}: a manifest of {opened.size} bytes is not plausible")
        raw = os.pread(opened.fd, opened.size, 0)
    # The strict parser of every JSON document checked here: nesting deeper than the parser's
    # recursion limit is InvalidInput (not a RecursionError traceback), and a repeated key (which
    # another tool could read as its first value and this one as its last) is refused.
    try:
        doc = parse_record_text(raw.decode("utf-8"), f"{path}: manifest")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path}: manifest is not JSON: {exc}") from None
    if isinstance(doc, dict) and "sigstore.bundle" in str(doc.get("mediaType", "")):
        if public_key is None:
            raise InvalidInput(
                f"{path} is an OpenSSF model-signing bundle: pass the signer's public key so that "
                "its signature can be checked before its digests are trusted"
            )
        return load_openssf_manifest(path, public_key)
    if public_key is not None:
        raise InvalidInput(f"{path} is not a signed bundle; a public key does not apply to it")
    return Manifest.from_json(doc, source=str(path))


def load_openssf_manifest(signature: PathArg, public_key: PathArg) -> Manifest:
    """The verified manifest of an OpenSSF model-signing bundle signed with an EC key.

    Raises ``InvalidInput`` if the signature does not verify with ``public_key`` or if the
    bundle does not record per-file BLAKE3 digests (the only ones that match ours)."""
    try:
        # model_signing's public API verifies a bundle *and* re-hashes the model directory,
        # but does not hand back the manifest; these are the two calls it makes for the first
        # step (model_signing 1.1: verifying.Config.verify).
        from model_signing._signing import sign_ec_key, sign_sigstore_pb
    except ImportError as exc:
        raise InvalidInput(
            "reading OpenSSF model-signing bundles needs the model_signing package "
            f"(pip install 'vram-residency[openssf]'): {exc}"
        ) from None
    sig_path, key_path = Path(signature), Path(public_key)
    try:
        bundle = sign_sigstore_pb.Signature.read(sig_path)
        verified = sign_ec_key.Verifier(key_path).verify(bundle)
    except Exception as exc:
        # The library reports every failure (bad key, wrong key, tampered payload, malformed
        # bundle) as a plain exception; any of them means the digests must not be used.
        raise InvalidInput(
            f"OpenSSF signature {sig_path} does not verify with {key_path}: {type(exc).__name__}: {exc}"
        ) from None
    params = verified.serialization_type
    if params.get("method") != "files" or params.get("hash_type") != BLAKE3:
        raise InvalidInput(
            f"{sig_path}: only per-file blake3 OpenSSF manifests can give expected digests "
            f"(this one is {params.get('method')}/{params.get('hash_type')})"
        )
    entries = []
    for rd in verified.resource_descriptors():
        if rd.digest.algorithm != BLAKE3:
            raise InvalidInput(
                f"{sig_path}: {rd.identifier!r} has a {rd.digest.algorithm} digest, not blake3"
            )
        entries.append(ManifestEntry(str(rd.identifier), None, {BLAKE3: rd.digest.digest_hex}))
    if not entries:
        raise InvalidInput(f"{sig_path}: the signed manifest lists no files")
    return Manifest(str(verified.model_name), tuple(entries), {}, origin=OPENSSF_ORIGIN)
