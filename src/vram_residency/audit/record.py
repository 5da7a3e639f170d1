"""The audit record format (``audit-v1``): canonical JSON, the hash chain and the HMAC.

A record is one JSON object on one line::

    {"critical":false,"event":"VramSealed","fields":{...},"id":"<32 hex>","prev_hash":"<64 hex>",
     "seq":7,"time":"2025-01-02T03:04:05.123456Z","v":1,"worker_id":"w0","hash":"<64 hex>",
     "hmac":"<64 hex>"}

*Canonical bytes* of a record are ``json.dumps(body, sort_keys=True, separators=(",", ":"),
ensure_ascii=False, allow_nan=False)`` encoded as UTF-8, where *body* is the record without
``hash`` and ``hmac``. Then

* ``hash = SHA-256(canonical bytes)``, lower-case hex; it makes the chain, because ``prev_hash``
  (inside the body) is the previous record's ``hash``, and ``GENESIS_HASH`` for the first record;
* ``hmac = HMAC-SHA256(audit key, RECORD_DOMAIN || canonical bytes)``, lower-case hex, under the
  key HKDF derives from the worker token with ``AUDIT_KEY_INFO``.

``id`` is 128 random bits in hex (unique across workers and restarts, like a UUID4). ``time`` is
UTC, ISO 8601 with microseconds and a ``Z``. ``fields`` holds the event's own data.

The hash alone lets anyone check the links; the HMAC stops someone without the token from
rewriting the log and recomputing the chain. ``seq`` counts records from 0 across every file of
a rotation set and across restarts, so a report can name a record by number.

The *head* file (``<log>.head``) holds the signed ``(seq, hash)`` of the newest record known to be
durable. A chain alone cannot show that records were cut off its end; the head can, as long as
the head file itself survives (see ``verify.py``).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac as _stdlib_hmac
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from operator import itemgetter
from pathlib import PurePath
from types import MappingProxyType
from typing import Any, Final, NamedTuple, NoReturn, Protocol

from vram_residency._strictjson import unique_keys
from vram_residency.errors import InvalidInput
from vram_residency.formats.keys import AUDIT_KEY_INFO, SecretKey, derive_key, token_bytes

__all__ = [
    "FORMAT_VERSION",
    "GENESIS_HASH",
    "HEAD_DOMAIN",
    "MAX_FIELDS_CHARS",
    "MAX_LINE_BYTES",
    "RECORD_DOMAIN",
    "AuditKey",
    "AuditRecord",
    "MacKey",
    "RecordFormatError",
    "RecordSealer",
    "SignedHead",
    "audit_key",
    "canonical_bytes",
    "check_fields_size",
    "check_record",
    "encode_fields",
    "head_message",
    "line_bytes",
    "normalize_fields",
    "parse_line",
    "parse_signed_head",
    "record_from_json",
    "signed_head_from_json",
]

FORMAT_VERSION: Final = 1
GENESIS_HASH: Final = "0" * 64
#: Domain separation: the same key signs records and heads, and neither may pass for the other.
RECORD_DOMAIN: Final = b"llorch-vram-audit-record-v1\x00"
HEAD_DOMAIN: Final = b"llorch-vram-audit-head-v1\x00"

#: The keys of a record body, in the order a reader expects them; ``hash`` and ``hmac`` follow.
BODY_KEYS: Final = frozenset(
    {"v", "seq", "id", "time", "worker_id", "event", "critical", "fields", "prev_hash"}
)

#: Field names that look like secrets are refused outright: a record is readable by anyone with
#: the file, so a token or key passed by mistake must never reach the disk.
_SECRET_NAMES: Final = frozenset(
    {
        "token",
        "worker_token",
        "secret",
        "key",
        "secret_key",
        "seal_key",
        "audit_key",
        "api_key",
        "password",
        "authorization",
        "tag",
        "seal_tag",
        "hmac_key",
    }
)
_MAX_DEPTH: Final = 16
#: The longest line a reader takes as a record. A longer one is refused without being read
#: whole: a multi-gigabyte "line" must not exhaust the verifier's memory.
MAX_LINE_BYTES: Final = 64 << 20
#: The longest fields JSON (in characters) the writer accepts. UTF-8 takes at most 4 bytes a
#: character, so every record it writes stays well under ``MAX_LINE_BYTES``.
MAX_FIELDS_CHARS: Final = 8 << 20
_PLAIN: Final = frozenset({str, int, bool, type(None)})


# One encoder object: json.dumps would build a new one per call, a measurable share of an emit.
_ENCODER: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _no_default(o: object) -> object:
    raise TypeError(f"{type(o).__name__} is not JSON data")


def _make_fast_encoder() -> Callable[[Any], str]:
    """The C encoder behind ``_ENCODER``, built once instead of on every ``encode`` call.

    ``JSONEncoder.encode`` constructs a fresh C encoder per call, which is about half its cost
    for a small object. ``c_make_encoder`` is internal to the json module (stable since 2.7);
    if it is missing or its signature ever changes, the public path is used and the output is
    the same. No circular-reference markers: normalized fields are trees of bounded depth.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _ENCODER.encode
    try:
        enc = make(None, _no_default, json.encoder.encode_basestring, None, ":", ",", True, False, False)
        if "".join(enc({"b": [1.5, None], "a": "\u00e9"}, 0)) != _ENCODER.encode(
            {"b": [1.5, None], "a": "\u00e9"}
        ):
            return _ENCODER.encode
    except Exception:
        return _ENCODER.encode

    def encode(obj: Any) -> str:
        return "".join(enc(obj, 0))

    return encode


_encode: Final = _make_fast_encoder()


class MacKey(Protocol):
    """What the log and the verifier need of a key: ``SecretKey`` and ``AuditKey`` both fit."""

    def tag(self, message: bytes) -> bytes: ...

    def verify(self, message: bytes, tag: bytes) -> bool: ...


class AuditKey:
    """The audit HMAC key, ``HKDF(token, AUDIT_KEY_INFO)``, kept as a ready HMAC-SHA256 state.

    Same key and same tags as ``SecretKey.from_token(token, AUDIT_KEY_INFO)``; the difference is
    speed: the key's pad blocks are hashed once here, and each tag copies that state (the
    stdlib's OpenSSL HMAC), instead of setting up a new HMAC per record. Like ``SecretKey`` it
    never shows itself in repr or str, refuses pickling, and does not compare.
    """

    __slots__ = ("__hmac", "__inner", "__outer")

    def __init__(self, token: str | bytes) -> None:
        key = derive_key(token_bytes(token), AUDIT_KEY_INFO)
        self.__hmac = _stdlib_hmac.new(key, digestmod=hashlib.sha256)
        # The same key's HMAC pad blocks as two SHA-256 states (RFC 2104; a 32-byte key is
        # shorter than the block, so it is zero-padded, not hashed), for _hex_tagger.
        block = key.ljust(64, b"\0")
        self.__inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self.__outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
        del key, block

    def tag(self, message: bytes) -> bytes:
        h = self.__hmac.copy()
        h.update(message)
        return h.digest()

    def _hex_tagger(self, prefix: bytes) -> Callable[[bytes], str]:
        """``lambda m: self.tag(prefix + m).hex()``, faster: the log tags every record with the
        same domain prefix, so its blocks are hashed once here; a tag then costs two SHA-256
        state copies (HMAC = H(K^opad || H(K^ipad || m)), RFC 2104, with the key's pad blocks
        already absorbed) and skips building ``prefix + m``. The closure holds hash states of
        the key, never the key bytes, and shows nothing in a repr."""
        inner = self.__inner.copy()
        inner.update(prefix)
        outer = self.__outer

        def tag_hex(message: bytes) -> str:
            i = inner.copy()
            i.update(message)
            o = outer.copy()
            o.update(i.digest())
            return o.hexdigest()

        return tag_hex

    def verify(self, message: bytes, tag: bytes) -> bool:
        return _stdlib_hmac.compare_digest(self.tag(message), bytes(tag))

    def __repr__(self) -> str:
        return "AuditKey(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("AuditKey cannot be pickled")

    def __eq__(self, other: object) -> bool:
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def audit_key(token: str | bytes | MacKey) -> MacKey:
    """The audit key of a worker token (or the key itself, when already given one)."""
    if isinstance(token, (str, bytes, bytearray)):
        return AuditKey(bytes(token) if isinstance(token, bytearray) else token)
    return token


_sha256: Final = hashlib.sha256
_esc: Final = json.encoder.encode_basestring  # the escaper JSONEncoder uses with ensure_ascii=False
_CANON_TEMPLATE: Final = (
    '{{"critical":{},"event":{},"fields":{},"id":{},"prev_hash":{},"seq":{},"time":{},"v":{},"worker_id":{}}}'
)


def canonical_bytes(body: Mapping[str, Any]) -> bytes:
    """The canonical encoding that the hash and the HMAC cover (see the module docstring)."""
    try:
        return _encode(body).encode("utf-8")
    except UnicodeEncodeError as exc:
        # A lone surrogate in a string cannot be UTF-8; refuse rather than pick an escape.
        raise InvalidInput("audit field text is not valid Unicode") from exc


def head_message(seq: int, hash_hex: str) -> bytes:
    return HEAD_DOMAIN + canonical_bytes({"hash": hash_hex, "seq": seq, "v": FORMAT_VERSION})


def _normalize(value: Any, depth: int) -> Any:
    """Turn a field value into plain JSON data, refusing anything that might carry a secret."""
    if depth > _MAX_DEPTH:
        raise InvalidInput("audit field nests too deeply")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput("audit field floats must be finite")
        return value
    if isinstance(value, enum.Enum):
        return _normalize(value.value, depth + 1)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (SecretKey, AuditKey, bytes, bytearray, memoryview)):
        # Raw bytes are how keys and tokens travel; an audit field has no business holding them.
        raise InvalidInput("audit fields may not hold bytes or keys")
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidInput("audit field mapping keys must be strings")
            _check_name(k)
            out[k] = _normalize(v, depth + 1)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_normalize(v, depth + 1) for v in items]
    raise InvalidInput(f"audit field of type {type(value).__name__} is not JSON data")


#: Field names that passed _check_name. A worker uses a few dozen names millions of times; the
#: set lets normalize_fields check a whole event's names in one C call. Bounded, so that callers
#: inventing names (a bug, or a test) cannot grow it without limit: past the bound, names are
#: simply checked every time.
_CHECKED_NAMES: Final[set[str]] = set()
_CHECKED_NAMES_MAX: Final = 4096


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise InvalidInput("audit field names must be strings")
    if name.lower() in _SECRET_NAMES:
        raise InvalidInput(f"audit field name {name!r} looks like a secret and is refused")
    if len(_CHECKED_NAMES) < _CHECKED_NAMES_MAX:
        _CHECKED_NAMES.add(name)


def normalize_fields(fields: Mapping[str, Any], *, owned: bool = False) -> dict[str, Any]:
    """Validate and copy event fields to plain JSON data (tuples become lists).

    ``owned``: ``fields`` is a dict the caller hands over (an ``emit``'s ``**fields``), returned
    as is when nothing in it needs converting, instead of copied.
    """
    # Fast path: every name checked before and every value a plain scalar (exact types, so an
    # IntEnum or a str subclass still takes the checked way). Two C-level set checks instead of
    # a Python loop over the fields; the result is the same dict the loop below would build.
    if _CHECKED_NAMES.issuperset(fields) and _PLAIN.issuperset(map(type, fields.values())):
        return fields if owned and type(fields) is dict else dict(fields)
    out: dict[str, Any] = {}
    for name, value in fields.items():
        _check_name(name)
        # Fast path for the scalars most events carry; everything else goes the checked way.
        out[name] = value if type(value) in _PLAIN else _normalize(value, 0)
    return out


def encode_fields(fields: Mapping[str, Any]) -> str:
    """The canonical JSON text of normalized fields, as ``AuditRecord.seal`` embeds it."""
    try:
        text = _encode(fields)
    except ValueError as exc:  # a NaN or infinity that slipped past normalisation
        raise InvalidInput(f"audit fields are not canonical JSON: {exc}") from exc
    check_fields_size(text)
    return text


def check_fields_size(text: str) -> None:
    """Refuse an event whose fields JSON is longer than ``MAX_FIELDS_CHARS`` (its record would
    be longer than a reader takes; see ``MAX_LINE_BYTES``)."""
    if len(text) > MAX_FIELDS_CHARS:
        raise InvalidInput(f"audit fields are too large ({len(text)} characters, at most {MAX_FIELDS_CHARS})")


class RecordSealer:
    """``AuditRecord.seal`` for one log, byte for byte, with the per-log work done once.

    The canonical body of a record is, in ``canonical_bytes``' sorted key order,
    ``head(event, critical) + fields JSON + ',"id":"<id>","prev_hash":"<hash>","seq":<seq>,
    "time":"<time>",' + tail``: the worker id, the format version and each (event, critical)
    pair are escaped once, and a record costs one join, one SHA-256 and one HMAC from a state
    that has the key's pads and ``RECORD_DOMAIN`` absorbed already (for an :class:`AuditKey`;
    any other :class:`MacKey` is asked for ``tag(RECORD_DOMAIN + canon)``).

    The caller promises that ``id``, ``prev_hash`` and ``time`` hold no character that JSON
    escapes, and that ``seq`` is an ``int``: the log passes hex ids and hashes and ``_utc_now``
    times, which the canonical encoder writes unchanged, so they go in without the escaper.
    ``tests/audit/test_audit_fastpath.py`` holds the output to ``AuditRecord.seal``'s and to
    known-answer lines written by the code before this class existed.
    """

    __slots__ = ("_heads", "_tag_hex", "_tail")

    #: The hex HMAC of ``RECORD_DOMAIN + canon`` for a record's canonical bytes.
    _tag_hex: Callable[[bytes], str]

    _MAX_HEADS: Final = 256

    def __init__(self, key: MacKey, worker_id: str) -> None:
        if isinstance(key, AuditKey):
            self._tag_hex = key._hex_tagger(RECORD_DOMAIN)
        else:

            def tag_hex(canon: bytes) -> str:
                return key.tag(RECORD_DOMAIN + canon).hex()

            self._tag_hex = tag_hex
        self._tail = f'"v":{FORMAT_VERSION},"worker_id":{_esc(worker_id)}}}'
        self._heads: dict[tuple[str, bool], str] = {}

    @property
    def tail(self) -> str:
        """The end of every body: ``"v"`` and ``"worker_id"`` and the closing brace."""
        return self._tail

    @property
    def tag_hex(self) -> Callable[[bytes], str]:
        """The hex HMAC of ``RECORD_DOMAIN + canon`` (for a loop that seals many records)."""
        return self._tag_hex

    def head(self, event: str, critical: bool) -> str:
        """The start of an ``event`` record's body, up to its fields JSON."""
        h = self._heads.get((event, critical))
        if h is None:
            h = f'{{"critical":{"true" if critical else "false"},"event":{_esc(event)},"fields":'
            if len(self._heads) < self._MAX_HEADS:
                self._heads[(event, critical)] = h
        return h

    def body(self, prefix: str, id: str, prev_hash: str, seq: int, time: str) -> str:
        """The canonical body text of a record: ``prefix`` is its head and fields JSON."""
        # str(seq) is int.__repr__ for an int, what the encoder writes.
        return "".join(
            (prefix, ',"id":"', id, '","prev_hash":"', prev_hash, '","seq":', str(seq),
             ',"time":"', time, '",', self._tail)
        )  # fmt: skip

    def seal(
        self, event: str, critical: bool, fields_json: str, seq: int, id: str, time: str, prev_hash: str
    ) -> tuple[str, str, bytes]:
        """(hash, hmac, line) of a record: the line is what ``AuditRecord.seal`` returns."""
        return self.finish(self.body(self.head(event, critical) + fields_json, id, prev_hash, seq, time))

    def finish(self, canon_text: str) -> tuple[str, str, bytes]:
        """(hash, hmac, line) of a record whose canonical body is ``canon_text``."""
        try:
            canon = canon_text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput("audit field text is not valid Unicode") from exc
        hash_hex = _sha256(canon).hexdigest()
        mac_hex = self._tag_hex(canon)
        # line_bytes(canon, ...) + newline, built as text: the canonical text encoded cleanly
        # above, so this encode cannot fail, and it is cheaper than formatting bytes.
        return hash_hex, mac_hex, f'{canon_text[:-1]},"hash":"{hash_hex}","hmac":"{mac_hex}"}}\n'.encode()

    def batch_prefixes(
        self,
        event: str,
        critical: bool,
        batch: Sequence[Mapping[str, Any]],
        common: Mapping[str, Any] | None = None,
    ) -> list[str] | None:
        """Each event's ``head(event, critical) + fields JSON`` for a batch of flat events, or None.

        For a batch whose normalized fields all have the same names and only plain scalar
        values (str, int, bool, None: what the verify path's SealVerified records carry), the
        fields' canonical JSON is ``{"name":value,...}`` in sorted name order, each string
        escaped by the encoder's own escaper and each int written by ``int.__repr__``, as the
        encoder does. Values the same in every event are spelled once into the literal text
        (a shard-by-shard batch differs in a few fields only), the others column by column.
        ``common``: fields every event has besides its own (names none of ``batch`` has).
        Anything else (nested values, names that differ, an int and a bool in one column, a
        common name that an event has too): None, and the caller encodes each event with the
        generic encoder.
        """
        first = batch[0]
        count = len(first)
        if set(map(len, batch)) != {count}:
            return None
        own = sorted(first)
        # The batch as columns, one per name (itemgetter: one C-level pass over the batch).
        try:
            if count > 1:
                table: list[tuple[Any, ...]] = list(zip(*map(itemgetter(*own), batch), strict=True))
            else:
                table = [tuple(fields[name] for fields in batch) for name in own]
        except KeyError:  # same number of names, not the same names
            return None
        by_name: dict[str, Sequence[Any]] = dict(zip(own, table, strict=True))
        if common:
            if not first.keys().isdisjoint(common):
                return None
            for name, value in common.items():
                by_name[name] = (value,)  # one value throughout: spelled once
        # The prefix as literal text between the varying values: chunks[0] column[0] chunks[1]
        # ... chunks[-1], each event's prefix joined from its row (no %-template to parse).
        chunks: list[str] = []
        columns: list[list[str]] = []
        text = self.head(event, critical) + "{"
        sep = ""
        for name in sorted(by_name):
            column = by_name[name]
            types = set(map(type, column))
            if len(types) != 1 or not types <= _PLAIN:
                return None  # mixed or nested: the generic encoder decides (bool vs int, say)
            kind = types.pop()
            text += sep + _esc(name) + ":"
            sep = ","
            if column.count(column[0]) == len(column):  # one value (and one type) throughout
                text += _plain_json(column[0])
                continue
            chunks.append(text)
            text = ""
            if kind is str:
                columns.append(list(map(_esc, column)))
            elif kind is int:
                columns.append(list(map(int.__repr__, column)))
            else:  # bool (None is always constant)
                columns.append(["true" if v else "false" for v in column])
        chunks.append(text + "}")
        if not columns:
            return [chunks[0]] * len(batch)
        parts: list[Iterable[str]] = [repeat(chunks[0])]
        for column, chunk in zip(columns, chunks[1:], strict=True):
            parts += (column, repeat(chunk))
        return list(map("".join, zip(*parts, strict=False)))  # the repeats are endless


def _plain_json(value: Any) -> str:
    """The canonical JSON of a plain scalar (str, int, bool or None), as ``_encode`` writes it."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        return int.__repr__(value)
    return str(_esc(value))


class AuditRecord(NamedTuple):
    """One record of the chain, as written. Contains no secret: the HMAC is a tag, not a key.

    A named tuple rather than a frozen dataclass: it is as immutable, and building one is
    several times cheaper, which matters at tens of thousands of events a second.
    """

    seq: int
    id: str
    time: str
    worker_id: str
    event: str
    critical: bool
    fields: Mapping[str, Any]
    prev_hash: str
    hash: str
    hmac: str

    def body(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "seq": self.seq,
            "id": self.id,
            "time": self.time,
            "worker_id": self.worker_id,
            "event": self.event,
            "critical": self.critical,
            "fields": dict(self.fields),
            "prev_hash": self.prev_hash,
        }

    def to_json(self) -> dict[str, Any]:
        out = self.body()
        out["hash"] = self.hash
        out["hmac"] = self.hmac
        return out

    @classmethod
    def seal(
        cls,
        key: MacKey,
        *,
        seq: int,
        id: str,
        time: str,
        worker_id: str,
        event: str,
        critical: bool,
        fields: Mapping[str, Any],
        prev_hash: str,
    ) -> tuple[AuditRecord, bytes]:
        """Build a record, compute its hash and HMAC, and return it with its line (``\\n``-ended).

        The line is the canonical body with ``hash`` and ``hmac`` appended, so the canonical
        JSON is encoded once per record (that is most of the cost of an event).
        """
        if type(seq) is not int or type(critical) is not bool:
            raise InvalidInput("seq must be an int and critical a bool")
        # The body's keys are fixed, so its canonical form is assembled directly around the
        # encoded fields, with strings escaped exactly as the sorted-keys encoder escapes them.
        # It equals canonical_bytes(body) byte for byte (a property test holds it to that), at
        # about half the cost of encoding the whole body through the generic encoder.
        try:
            canon = _CANON_TEMPLATE.format(
                "true" if critical else "false",
                _esc(event),
                _encode(fields),
                _esc(id),
                _esc(prev_hash),
                seq,
                _esc(time),
                FORMAT_VERSION,
                _esc(worker_id),
            ).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput("audit field text is not valid Unicode") from exc
        except ValueError as exc:  # a NaN or infinity that slipped past normalisation
            raise InvalidInput(f"audit fields are not canonical JSON: {exc}") from exc
        hash_hex = hashlib.sha256(canon).hexdigest()
        mac_hex = key.tag(RECORD_DOMAIN + canon).hex()
        line = line_bytes(canon, hash_hex, mac_hex) + b"\n"
        rec = cls(
            seq=seq,
            id=id,
            time=time,
            worker_id=worker_id,
            event=event,
            critical=critical,
            fields=MappingProxyType(fields),  # the caller passes a fresh dict
            prev_hash=prev_hash,
            hash=hash_hex,
            hmac=mac_hex,
        )
        return rec, line


class RecordFormatError(ValueError):
    """A line is not a well-formed ``audit-v1`` record (reason in the message)."""


_HEX64_CHARS: Final = frozenset("0123456789abcdef")


def _is_hex64(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX64_CHARS


def record_from_json(obj: object) -> tuple[AuditRecord, bytes]:
    """Check the shape of a parsed record; return it with its canonical body bytes.

    Checks structure only. The hash, HMAC and links are the verifier's job.
    """
    if not isinstance(obj, dict):
        raise RecordFormatError("record is not a JSON object")
    keys = set(obj)
    if keys != BODY_KEYS | {"hash", "hmac"}:
        missing = sorted(BODY_KEYS | {"hash", "hmac"} - keys)
        extra = sorted(keys - BODY_KEYS - {"hash", "hmac"})
        raise RecordFormatError(f"record keys wrong (missing {missing}, unexpected {extra})")
    if obj["v"] != FORMAT_VERSION or isinstance(obj["v"], bool):
        raise RecordFormatError(f"unknown record version {obj['v']!r}")
    seq = obj["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise RecordFormatError("seq is not a non-negative integer")
    for name in ("id", "time", "worker_id", "event"):
        if not isinstance(obj[name], str):
            raise RecordFormatError(f"{name} is not a string")
    if not isinstance(obj["critical"], bool):
        raise RecordFormatError("critical is not a boolean")
    if not isinstance(obj["fields"], dict):
        raise RecordFormatError("fields is not an object")
    for name in ("prev_hash", "hash", "hmac"):
        if not _is_hex64(obj[name]):
            raise RecordFormatError(f"{name} is not 64 lower-case hex characters")
    body = {k: obj[k] for k in BODY_KEYS}
    try:
        canon = canonical_bytes(body)
    except (InvalidInput, ValueError) as exc:
        raise RecordFormatError(f"record cannot be encoded canonically: {exc}") from exc
    rec = AuditRecord(
        seq=seq,
        id=obj["id"],
        time=obj["time"],
        worker_id=obj["worker_id"],
        event=obj["event"],
        critical=obj["critical"],
        fields=MappingProxyType(obj["fields"]),
        prev_hash=obj["prev_hash"],
        hash=obj["hash"],
        hmac=obj["hmac"],
    )
    return rec, canon


# A record with two "event" keys would show a reader text that was never signed.
_unique_keys: Final = unique_keys(lambda key: RecordFormatError(f"duplicate key {key!r}"))


def _no_constant(name: str) -> NoReturn:
    raise RecordFormatError(f"{name} is not JSON")


_STRICT: Final = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def line_bytes(canon: bytes, hash_hex: str, hmac_hex: str) -> bytes:
    """The exact bytes of a record's line (without the newline): canonical body, then ``hash``
    and ``hmac`` as the last two keys. The writer produces these and the reader demands them."""
    return b'%s,"hash":"%s","hmac":"%s"}' % (canon[:-1], hash_hex.encode(), hmac_hex.encode())


def parse_line(line: bytes) -> tuple[AuditRecord, bytes]:
    """Parse one line (without its newline) into a record and its canonical body bytes.

    Only the exact bytes the writer produces are accepted (see :func:`line_bytes`): the record is
    re-serialized and compared byte for byte. Extra whitespace, ``\\u`` escapes where the
    canonical form has the character itself, another key order, another number form, a CR before
    the newline, duplicate keys: all refused. The hash and HMAC cover the canonical body only,
    so without this check a tool that reads the raw line (grep, another JSON parser keeping the
    first of two keys) could be shown text that was never signed.
    """
    try:
        obj = _STRICT.decode(line.decode("utf-8"))
    except RecordFormatError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting: RecursionError
        raise RecordFormatError(f"not valid JSON: {type(exc).__name__}") from exc
    rec, canon = record_from_json(obj)
    if line != line_bytes(canon, rec.hash, rec.hmac):
        if line.endswith(b"\r"):
            raise RecordFormatError("not canonical: CRLF line ending")
        raise RecordFormatError(
            "not canonical: the line's bytes differ from the record's canonical serialization "
            "(whitespace, escapes, key order or number form)"
        )
    return rec, canon


def check_record(key: MacKey, rec: AuditRecord, canon: bytes) -> str | None:
    """The reason a record's own hash or HMAC is wrong, or None when both hold."""
    if hashlib.sha256(canon).hexdigest() != rec.hash:
        return "hash mismatch: the record was changed after it was written"
    try:
        mac = bytes.fromhex(rec.hmac)
    except ValueError:
        return "hmac is not hex"
    if not key.verify(RECORD_DOMAIN + canon, mac):
        return "hmac mismatch: not signed by this worker token's audit key"
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class SignedHead:
    """A signed ``(seq, hash)``: the content of a head file, and what an anchor keeps.

    ``hmac = HMAC-SHA256(audit key, HEAD_DOMAIN || canonical {"hash","seq","v"})``. ``seq`` -1
    with the genesis hash is the head of a log with no records. JSON form (the head file's and
    the ``GET /worker/audit/head`` answer's): ``{"v":1,"seq":N,"hash":"<64 hex>","hmac":"<64 hex>"}``.
    """

    seq: int
    hash: str
    hmac: str

    def to_json(self) -> dict[str, Any]:
        return {"v": FORMAT_VERSION, "seq": self.seq, "hash": self.hash, "hmac": self.hmac}

    def verify(self, key: MacKey) -> bool:
        try:
            mac = bytes.fromhex(self.hmac)
        except ValueError:
            return False
        return key.verify(head_message(self.seq, self.hash), mac)


def signed_head_from_json(obj: object) -> SignedHead | None:
    """The head a parsed JSON object describes (shape only, the HMAC is not checked), or None."""
    if not isinstance(obj, dict):
        return None
    seq, hash_hex, mac = obj.get("seq"), obj.get("hash"), obj.get("hmac")
    if obj.get("v", FORMAT_VERSION) != FORMAT_VERSION:
        return None
    if type(seq) is not int or seq < -1 or not isinstance(hash_hex, str) or not isinstance(mac, str):
        return None
    if not _is_hex64(hash_hex) or not _is_hex64(mac):
        return None
    if seq == -1 and hash_hex != GENESIS_HASH:
        return None
    return SignedHead(seq=seq, hash=hash_hex, hmac=mac)


def parse_signed_head(raw: bytes | str, key: MacKey) -> SignedHead | None:
    """A head file's content (or an anchor's JSON text), if well formed and signed by ``key``."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        obj = _STRICT.decode(text.strip())
    except (UnicodeDecodeError, ValueError, RecursionError):  # deep nesting: RecursionError
        return None
    head = signed_head_from_json(obj)
    if head is None or not head.verify(key):
        return None
    return head
