"""Models made of several shards: sharded files, or a framework's tensors. Scheme ``vram-model-v1``.

A ``seal-v1`` record has one free-form field, ``model_ref``, and the ``shard_index`` /
``total_shards`` pair. A model of ``N`` parts (files of a sharded checkpoint, or tensors adopted
from a framework) is sealed as ``N`` shards that share one ``model_ref``::

    model_ref = NAME "@vram-model-v1:" HEX(M)
    M = SHA-256( "vram-residency-model-v1" || LE32(N) ||
                 for each part i = 0 .. N-1, in order:
                   LE32(len(name_i)) || name_i || LE32(len(alg)) || alg || LE64(size_i) || digest_i )

where ``name_i`` is the part's UTF-8 name (the file name as the index or manifest gives it, or
the tensor name), ``alg`` the digest algorithm of every shard (``sha256-tree-v1`` or ``blake3``),
``size_i`` its length in bytes and ``digest_i`` its 32-byte digest. Part ``i`` is sealed with
``shard_index = i`` and ``total_shards = N``.

Since each shard's tag covers its own digest and the shared ``model_ref``, and ``M`` covers every
part's name, size and digest in order, a verifier holding the ``N`` records and the part names
(both in :meth:`SealedModel.record`) detects a missing part (an index absent, or ``M`` differs),
an extra one (``total_shards`` or ``M`` differs) and a swap (``M`` differs): see
:func:`check_model_record`. ``M`` is computed from digests measured in device memory, so every
part is first copied (or adopted) and digested, and only then are the ``N`` seals made; any
failure in between frees everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Final

from vram_residency._core import ShardStore, TensorSpan
from vram_residency.audit.events import POLICY_VIOLATION
from vram_residency.backends.base import DeviceBuffer, Segment
from vram_residency.errors import InvalidInput, PolicyViolation, SealVerificationFailed, VramError
from vram_residency.formats.tree import HashResult, check_algorithm
from vram_residency.shard import SealedShard, check_seal_record, parse_record_text

__all__ = [
    "MODEL_DIGEST_NAME",
    "ModelPart",
    "SealedModel",
    "check_model_record",
    "model_digest",
    "model_ref_for",
    "parse_model_ref",
]

MODEL_DIGEST_NAME: Final = "vram-model-v1"
MODEL_RECORD_FORMAT: Final = "vram-model-v1"
_DOMAIN: Final = b"vram-residency-model-v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")

_NAME: Final = operator.attrgetter("name")
_SHARD: Final = operator.attrgetter("shard")
#: Every field of a part's shard that the binding reads (``_check_binding``), read in one C call.
_BINDING_FIELDS: Final = operator.attrgetter(
    "model_ref", "shard_index", "total_shards", "vram_bytes", "digest_algorithm", "digest"
)


def _utf8(what: str, s: object) -> bytes:
    if not isinstance(s, str) or not s:
        raise InvalidInput(f"{what} must be a non-empty string")
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} {s!r} is not valid Unicode text") from None


def _hex32(digest: object) -> bytes | None:
    """The 32 bytes of ``digest`` when it is 64 lower-case hex characters, else None."""
    if not isinstance(digest, str) or len(digest) != 64:
        return None
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        return None
    return raw if len(raw) == 32 and raw.hex() == digest else None


def model_digest(parts: Sequence[tuple[str, int, str, str]]) -> str:
    """``M`` (hex) of ``(name, size, algorithm, hex digest)`` parts, in order."""
    if not parts:
        raise InvalidInput("a model needs at least one part")
    # Every verify_model recomputes M over all parts (check_binding), so the per-part work is
    # kept small: each distinct algorithm is checked and encoded once, the encoded parts are
    # joined and hashed in one update (the same bytes as part by part).
    encoded: list[bytes] = [_DOMAIN, len(parts).to_bytes(4, "little")]
    append, pack = encoded.append, int.to_bytes
    algorithm_bytes: dict[str, bytes] = {}
    for name, size, algorithm, digest in parts:
        nb = _utf8("part name", name)
        ab = algorithm_bytes.get(algorithm) if type(algorithm) is str else None
        if ab is None:
            ab = check_algorithm(algorithm, keyed=True).encode("ascii")
            ab = len(ab).to_bytes(4, "little") + ab
            algorithm_bytes[algorithm] = ab
        # 64 lower-case hex characters, exactly: the 32 bytes they decode to must encode back to
        # the same text (which rules out upper case and the spaces fromhex skips); cheaper than
        # a regular expression per part.
        raw = _hex32(digest)
        if raw is None:
            raise InvalidInput("part digest must be 64 lower-case hex characters")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 1 << 64:
            raise InvalidInput("part size must be a 64-bit unsigned integer")
        append(pack(len(nb), 4, "little") + nb + ab + pack(size, 8, "little") + raw)
    return hashlib.sha256(b"".join(encoded)).hexdigest()


def model_ref_for(name: str, digest: str) -> str:
    _utf8("model name", name)
    return f"{name}@{MODEL_DIGEST_NAME}:{digest}"


def parse_model_ref(ref: str) -> tuple[str, str]:
    """``(name, M)`` of a ``vram-model-v1`` model_ref; ``InvalidInput`` for any other ref."""
    name, sep, rest = ref.rpartition("@")
    prefix = f"{MODEL_DIGEST_NAME}:"
    if not sep or not name or not rest.startswith(prefix) or not _HEX64.fullmatch(rest[len(prefix) :]):
        raise InvalidInput(f"model_ref {ref!r} is not a {MODEL_DIGEST_NAME} reference")
    return name, rest[len(prefix) :]


@dataclass(frozen=True, slots=True)
class ModelPart:
    """One named part of a model and the shard it is sealed as."""

    name: str
    shard: SealedShard


@dataclass(frozen=True, slots=True)
class SealedModel:
    """A model sealed as ``len(parts)`` shards bound together by ``model_ref`` (see module doc)."""

    model_ref: str
    model_digest: str
    digest_algorithm: str
    parts: tuple[ModelPart, ...]
    #: The last binding found valid, as ``[(model_ref, *names, *binding fields of each shard)]``
    #: (empty: none yet); see :meth:`bound_shards`. A cache, not part of the model: not compared,
    #: hashed or shown, and not copied by ``dataclasses.replace``.
    _binding: list[Any] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        return parse_model_ref(self.model_ref)[0]

    @property
    def shards(self) -> tuple[SealedShard, ...]:
        return tuple(map(_SHARD, self.parts))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)

    @property
    def vram_bytes(self) -> int:
        return sum(p.shard.vram_bytes for p in self.parts)

    def shard(self, name: str) -> SealedShard:
        for p in self.parts:
            if p.name == name:
                return p.shard
        raise KeyError(name)

    def check_binding(self) -> None:
        """Recompute ``M`` from the parts; ``SealVerificationFailed`` unless it is the one sealed."""
        self.bound_shards()

    def bound_shards(self) -> tuple[SealedShard, ...]:
        """:meth:`check_binding`, then the shards, in part order (what ``verify_model`` verifies).

        The binding is a pure function of the model_ref, the part names and six fields of each
        part's shard. Those are read (a few C-level passes over the parts) and compared with the
        ones last found bound; only when any differs is ``M`` recomputed (a verify of a model of
        hundreds of parts would otherwise pay most of its host time here). Reading the values,
        not trusting the parts' or shards' identity, keeps this exact even for objects edited in
        place; the values themselves are compared by identity (the cache keeps them alive, so no
        other object can take their ids), because ``==`` would take a value of another type that
        only compares equal (a str subclass equal to every string) for the one checked."""
        shards, check = self.binding_check()
        check()
        return shards

    def binding_check(self) -> tuple[tuple[SealedShard, ...], Callable[[], None]]:
        """:meth:`bound_shards` in two steps: the shards (in part order, read now) and the check
        of their binding (``SealVerificationFailed`` when it fails), to be run before any verdict
        on them. ``verify_model`` hands the check to the store, which runs it on the host while
        the device digests the shards (``ShardStore.verify_many``'s ``before_verdict``)."""
        parts = self.parts
        shards = tuple(map(_SHARD, parts))

        def check() -> None:
            # The parts read once above: the names checked are those of the parts whose shards
            # are verified.
            names = list(map(_NAME, parts))
            values = (self.model_ref, *names, *chain.from_iterable(map(_BINDING_FIELDS, shards)))
            # One read of the cached tuple (another thread may replace it meanwhile: a copy.copy
            # of the model shares this list), so that its length and items are of one binding.
            cache = self._binding
            bound = cache[0] if cache else ()
            if len(bound) != len(values) or not all(map(operator.is_, values, bound)):
                _check_binding(self.model_ref, list(zip(names, shards, strict=True)))
                cache[:] = [values]

        return shards, check

    def record(self) -> dict[str, Any]:
        """JSON-ready: the model_ref, ``M``, and each part's name with its seal record."""
        return {
            "format": MODEL_RECORD_FORMAT,
            "model_ref": self.model_ref,
            "model_digest": self.model_digest,
            "digest_algorithm": self.digest_algorithm,
            "parts": [{"name": p.name, "seal": p.shard.record()} for p in self.parts],
        }


def _check_binding(model_ref: str, parts: Sequence[tuple[str, SealedShard]]) -> str:
    _, want = parse_model_ref(model_ref)
    n = len(parts)
    algorithms = {s.digest_algorithm for _, s in parts}
    problems: list[str] = []
    if len(algorithms) > 1:
        problems.append(f"parts use different digest algorithms {sorted(algorithms)}")
    for i, (name, s) in enumerate(parts):
        if s.model_ref != model_ref:
            problems.append(f"part {i} ({name!r}) belongs to model_ref {s.model_ref!r}")
        if s.shard_index != i or s.total_shards != n:
            problems.append(
                f"part {i} ({name!r}) is sealed as shard {s.shard_index} of {s.total_shards}, "
                f"not {i} of {n} (missing, extra or reordered part)"
            )
    if not problems:
        got = model_digest([(name, s.vram_bytes, s.digest_algorithm, s.digest) for name, s in parts])
        if not hmac.compare_digest(got, want):
            problems.append(
                "the parts' names, sizes and digests do not give the model digest in model_ref "
                "(a part was swapped, renamed, replaced, added or removed)"
            )
    if problems:
        raise SealVerificationFailed(
            f"model {model_ref}: " + "; ".join(problems),
            expected_digest=want,
        )
    return want


def check_model_record(record: dict[str, Any] | str | bytes, worker_token: str | bytes) -> SealedModel:
    """Check a model record (:meth:`SealedModel.record`, or its JSON text) with the worker token.

    Every part's ``seal-v1`` tag is checked, then the binding: all parts carry the same
    ``vram-model-v1`` model_ref, are numbered ``0 .. N-1`` of ``N``, and their names, sizes and
    digests reduce to its ``M``. Raises ``InvalidInput`` for a malformed record and
    ``SealVerificationFailed`` for a forged, incomplete, padded or reordered one.
    """
    if isinstance(record, (str, bytes, bytearray)):
        record = parse_record_text(record, "model record")
    if not isinstance(record, dict) or record.get("format") != MODEL_RECORD_FORMAT:
        raise InvalidInput(f"model record must be a JSON object of format {MODEL_RECORD_FORMAT!r}")
    model_ref, parts = record.get("model_ref"), record.get("parts")
    if not isinstance(model_ref, str) or not isinstance(parts, list) or not parts:
        raise InvalidInput("model record needs a model_ref and a non-empty list of parts")
    # The two conveniences are parsed here, with the rest of the record's shape, before any tag
    # is checked: a value of the wrong type is a malformed record (InvalidInput), never a
    # "mismatch" (SealVerificationFailed) that would send the caller looking for a forger.
    claimed_digest, claimed_algorithm = record.get("model_digest"), record.get("digest_algorithm")
    if claimed_digest is not None and not (
        isinstance(claimed_digest, str) and _HEX64.fullmatch(claimed_digest)
    ):
        raise InvalidInput("model record's model_digest must be 64 lower-case hex characters or null")
    if claimed_algorithm is not None and not isinstance(claimed_algorithm, str):
        raise InvalidInput("model record's digest_algorithm must be a string or null")
    checked: list[tuple[str, SealedShard]] = []
    for part in parts:
        # The seal is the JSON object SealedModel.record writes, not its text: a record has one
        # spelling, as every other JSON form checked here.
        if not isinstance(part, dict) or not isinstance(part.get("name"), str):
            raise InvalidInput("each part of a model record needs a name and a seal")
        if not isinstance(part.get("seal"), dict):
            raise InvalidInput("each part of a model record needs a name and a seal")
        checked.append((part["name"], check_seal_record(part["seal"], worker_token)))
    want = _check_binding(model_ref, checked)
    if claimed_digest not in (None, want):
        raise SealVerificationFailed(f"model record's model_digest does not match its model_ref {model_ref}")
    algorithm = checked[0][1].digest_algorithm
    # Not covered by any tag, like model_digest: when present it must say what the tagged parts
    # say, so that whoever reads the accepted record's field reads the checked value.
    if claimed_algorithm not in (None, algorithm):
        raise SealVerificationFailed(
            f"model record's digest_algorithm is not its parts' ({algorithm}) in model_ref {model_ref}"
        )
    return SealedModel(model_ref, want, algorithm, tuple(ModelPart(n, s) for n, s in checked))


# -- sealing ------------------------------------------------------------------------------------


@dataclass(slots=True)
class PartSource:
    """What :func:`seal_parts` needs to put one part into device memory.

    ``acquire(shard_id)`` returns the part's device buffer (a fresh allocation audited under that
    shard id, or adopted memory); ``fill`` (if any) writes the part's bytes into it."""

    name: str
    size: int
    acquire: Callable[[str], DeviceBuffer]
    fill: Callable[[DeviceBuffer], None] | None = None
    tensors: tuple[TensorSpan, ...] = ()
    source: Any = None
    expected_digest: str | None = None


def seal_parts(
    store: ShardStore,
    parts: Sequence[PartSource],
    *,
    model_name: str,
    digest_algorithm: str,
    device: int | None = None,
    expected_model_digest: str | None = None,
) -> SealedModel:
    """Seal ``parts`` as one ``vram-model-v1`` model; all or nothing.

    Every part is acquired and filled first; then ONE ``hash_many`` digests them all (digests and
    unit digests), ``M`` is computed, and ONE ``digest_many`` checks that the memory still holds
    what ``M`` was computed from before each part is sealed through the store's sealing path."""
    check_algorithm(digest_algorithm, keyed=True)
    _utf8("model name", model_name)
    n = len(parts)
    if n == 0:
        raise InvalidInput("nothing to seal: the model has no parts")
    if n > store.max_tensors:  # each part is at least one tensor (seal_tensors checks first)
        raise InvalidInput(f"a model of {n} parts lists more than {store.max_tensors} tensors (max_tensors)")
    names = [p.name for p in parts]
    for name in names:
        _utf8("part name", name)
    if len(set(names)) != n:
        dup = sorted({x for x in names if names.count(x) > 1})
        raise InvalidInput(f"part names must be unique; repeated: {dup[:5]}")
    # Validate every part against the store's limits before touching device memory.
    for p in parts:
        store.validate_seal_args(p.size, device, "validation", 0, n, p.expected_digest, digest_algorithm)
    need = sum(p.size for p in parts)
    if need > store.max_model_bytes:
        raise InvalidInput(f"model of {need} bytes exceeds max_model_bytes ({store.max_model_bytes})")
    backend = store.backend
    ids = [store.new_shard_id() for _ in parts]
    buffers: list[DeviceBuffer] = []
    shards: list[SealedShard] = []
    try:
        for p, sid in zip(parts, ids, strict=True):
            try:
                buf = p.acquire(sid)
            except PolicyViolation as exc:
                # Adopting checks the memory first (VRAM of this device, not managed or host):
                # nothing was acquired, but the refusal is audited.
                store.emit(POLICY_VIOLATION, critical=True, reason=str(exc), vram_bytes=p.size)
                raise
            buffers.append(buf)
            # A PolicyViolation is audited as one when the buffer is released below.
            backend.check_policy(buf)
            if p.fill is not None:
                p.fill(buf)
        # The ids were chosen above, before hashing: nh-fast-v1 is keyed per shard id.
        segments = [
            Segment(b, p.size, digest_algorithm, store.digest_key(digest_algorithm, sid))
            for p, b, sid in zip(parts, buffers, ids, strict=True)
        ]
        results = backend.hash_many(segments)
        digests = [r.digest.hex() for r in results]
        for p, actual in zip(parts, digests, strict=True):
            if p.expected_digest is not None and not hmac.compare_digest(actual, p.expected_digest.lower()):
                raise InvalidInput(
                    f"part {p.name!r}: digest in device memory ({actual}) does not match the expected "
                    f"digest ({p.expected_digest.lower()}); nothing was sealed"
                )
        m = model_digest([(p.name, p.size, digest_algorithm, d) for p, d in zip(parts, digests, strict=True)])
        if expected_model_digest is not None and not hmac.compare_digest(m, expected_model_digest.lower()):
            raise InvalidInput(
                f"model digest {m} does not match the expected {expected_model_digest.lower()}; "
                "nothing was sealed"
            )
        model_ref = model_ref_for(model_name, m)
        # The memory is digested again, in one batch, right before sealing: each seal must hold
        # what M was computed from, even if someone wrote to an adopted tensor meanwhile.
        again = backend.digest_many(segments)
        for i, (p, buf, d, r, now) in enumerate(zip(parts, buffers, digests, results, again, strict=True)):
            shards.append(
                store.seal_into(
                    p.size,
                    _given(HashResult(now, r.unit_digests)),
                    device=device,
                    model_ref=model_ref,
                    shard_index=i,
                    total_shards=n,
                    expected_digest=d,
                    digest_algorithm=digest_algorithm,
                    tensors=p.tensors,
                    source=p.source,
                    buffer=buf,
                    shard_id=ids[i],
                )
            )
    except BaseException as exc:
        for s in shards:
            # Keep releasing the rest: the original error is the one to report.
            with contextlib.suppress(VramError):
                store.deallocate(s)
        sealed = {s.shard_id for s in shards}
        for p, b, sid in zip(parts, buffers, ids, strict=False):
            if sid not in sealed and not b.closed:
                store.release_unsealed(b, shard_id=sid, size=p.size, reason=exc)
        raise
    return SealedModel(
        model_ref,
        m,
        digest_algorithm,
        tuple(ModelPart(p.name, s) for p, s in zip(parts, shards, strict=True)),
    )


def _given(result: HashResult) -> Callable[[DeviceBuffer], HashResult]:
    def fill(_buf: DeviceBuffer) -> HashResult:
        return result

    return fill
