"""Opening model files safely and mapping their tensors to byte ranges.

Every file is opened once, as a regular file, before anything is allocated: a missing file, a
directory, a FIFO or device, a path under a non-directory, or a truncated or corrupt header is an
``InvalidInput`` with no device memory touched. The descriptor opened here is the one that is
parsed and then streamed, so a rename between the two cannot swap the bytes under the parser;
``seal_files`` instead closes each file once checked and streams it through
:meth:`OpenedFile.reopen` (one descriptor at a time, whatever the number of files), which refuses
another inode or a moved size, mtime or ctime, and :meth:`OpenedFile.check_header`, which
compares the header bytes that were copied with those parsed.

A header may list at most ``max_tensors`` tensors (``DEFAULT_MAX_TENSORS``, 262,144, unless the
manager sets another): each costs about 1 KiB of Python objects while it is checked.

A shard sealed from a file holds the *whole* file, header included, so its digest is the digest
of the file as it lies on disk (what ``vram-residency digest`` and manifests record), and tensor
spans are absolute byte offsets inside the file. The header gets a span of its own, named
``(header)``, so that a change there is reported too.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import itertools
import json
import os
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from vram_residency._core import DEFAULT_MAX_TENSORS, TensorSpan
from vram_residency.errors import ConfigError, InvalidInput

__all__ = [
    "DEFAULT_MAX_TENSORS",
    "FORMATS",
    "HEADER_SPAN",
    "MAX_SAFETENSORS_HEADER",
    "SAFETENSORS_DTYPES",
    "FileFormat",
    "FileLayout",
    "OpenedFile",
    "SafetensorsEntry",
    "SafetensorsHeader",
    "inspect_file",
    "open_model_file",
    "parse_safetensors_header",
    "pread_exact",
    "safetensors_header_size",
]

FileFormat = Literal["auto", "raw", "safetensors", "gguf"]
FORMATS: Final = ("auto", "raw", "safetensors", "gguf")
HEADER_SPAN: Final = "(header)"

#: safetensors refuses headers above 100 MB; so do we, before reading one into memory.
MAX_SAFETENSORS_HEADER: Final = 100_000_000
_GGUF_MAGIC: Final = b"GGUF"

# Bits per element of every dtype the safetensors library (0.8) knows; sub-byte float formats
# are packed. A dtype not listed here is refused, as the library refuses it.
_DTYPE_BITS: Final = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
#: The safetensors dtype names a header may use.
SAFETENSORS_DTYPES: Final = frozenset(_DTYPE_BITS)


@dataclass(frozen=True, slots=True)
class FileLayout:
    """What a model file holds: its format, size and named byte ranges (file offsets)."""

    format: Literal["raw", "safetensors", "gguf"]
    size: int
    #: The header's span, then one span per tensor of at least one byte, in file order.
    tensors: tuple[TensorSpan, ...]
    #: Every tensor's name, zero-byte tensors included.
    tensor_names: frozenset[str] = frozenset()
    #: SHA-256 of the header's bytes as they were parsed (``None`` for a raw file): what a file
    #: reopened later must still hold for ``tensors`` to describe it (``OpenedFile.reopen``).
    header_sha256: bytes | None = None


def pread_exact(fd: int, offset: int, n: int, what: str) -> bytes:
    """Exactly ``n`` bytes at ``offset``; a short file is an ``InvalidInput`` naming ``what``."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        try:
            chunk = os.pread(fd, n - got, offset + got)
        except OSError as exc:
            raise InvalidInput(f"cannot read {what}: {exc.strerror}") from None
        if not chunk:
            raise InvalidInput(f"{what} is truncated: expected {n} bytes at offset {offset}, got {got}")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class OpenedFile:
    """A regular file opened for reading, with its parsed layout. Close it (or use ``with``)."""

    def __init__(self, path: Path, fd: int, st: os.stat_result, layout: FileLayout) -> None:
        self.path = path
        self.fd = fd
        self._stat = st
        self.layout = layout

    @property
    def size(self) -> int:
        return self.layout.size

    def check_unchanged(self) -> None:
        """Raise ``InvalidInput`` if the file changed size, mtime or ctime since it was opened.

        Streaming takes time; a file rewritten meanwhile would be sealed as a mix of old and new
        bytes, with a layout parsed from the old ones. The inode change time is compared too:
        anyone who can write the file can set its mtime back (``os.utime``), but no one can set
        back its ctime, which every write (and that ``utime``) moves. A chmod or rename during
        the seal then refuses it as well: safe, and the caller can seal again."""
        st = os.fstat(self.fd)
        was = self._stat
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (was.st_size, was.st_mtime_ns, was.st_ctime_ns):
            raise InvalidInput(f"{self.path} changed while it was being read")

    def reopen(self) -> OpenedFile:
        """The file parsed here, opened again (this one may be closed meanwhile), with the same
        layout; ``InvalidInput`` if its path no longer names it unchanged: another inode (a
        rename over it), or the same one written since (size, mtime or ctime moved).

        ``seal_files`` parses every file first and then streams them one at a time through a
        reopened descriptor, so that a model of many files never holds all of them open. The
        checks on this reopened descriptor are those a held one gets (``check_unchanged`` after
        streaming), plus this identity check; a held descriptor also pins the inode, which this
        replaces with the header check of :func:`check_header` on the bytes that were copied."""
        fd, st = _open_regular(self.path)
        was = self._stat
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (
            was.st_dev,
            was.st_ino,
            was.st_size,
            was.st_mtime_ns,
            was.st_ctime_ns,
        ):
            os.close(fd)
            raise InvalidInput(f"{self.path} changed between its check and its copy; nothing was sealed")
        return OpenedFile(self.path, fd, was, self.layout)

    def check_header(self, copied: bytes) -> None:
        """``InvalidInput`` unless ``copied`` (the first bytes of the file as they were copied,
        at least the header's span) hashes to the header that was parsed: exact, whatever the
        file system's timestamps can show, so the tensor spans describe the bytes sealed."""
        want = self.layout.header_sha256
        if want is None:
            return
        got = hashlib.sha256(copied[: self.layout.tensors[0].end]).digest()
        if not hmac.compare_digest(got, want):
            raise InvalidInput(
                f"{self.path} changed between its check and its copy (its header differs); nothing was sealed"
            )

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> OpenedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()


def _fspath(path: object) -> Path:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInput(f"path must be str or os.PathLike, not {type(path).__name__}")
    p = Path(path)
    if not str(p):
        raise InvalidInput("path is empty")
    if "\x00" in str(p):
        raise InvalidInput("path contains a NUL byte")
    return p


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever. It has
    # no effect on reads of regular files, which are all we keep.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    except NotADirectoryError:
        raise InvalidInput(f"{path}: a component of the path is not a directory") from None
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            # No descriptor free (a flood of connections in a server): nothing is wrong with the
            # path or the file, and the same open succeeds later. Raised as it is, so that a
            # caller can tell "retry" from "bad input" (the worker answers 503, not 422).
            raise
        raise InvalidInput(f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InvalidInput(f"{path} is a directory, not a model file")
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"{path} is not a regular file (FIFO, socket or device)")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _detect(fd: int, path: Path, size: int) -> Literal["raw", "safetensors", "gguf"]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".gguf":
        return "gguf"
    if size >= 4 and pread_exact(fd, 0, 4, str(path)) == _GGUF_MAGIC:
        return "gguf"
    return "raw"


def _shown(value: object, limit: int = 120) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters: names, dtypes and
    shapes come from untrusted headers (up to 100 MB), and a message carries them into logs and
    HTTP answers."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _object_hook(max_tensors: int) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """The ``object_pairs_hook`` of a header parse: :func:`_no_duplicates`, and a count of the
    objects built so far. A valid header holds one object per tensor, plus the header itself and
    ``__metadata__``; past that, decoding stops at once, so a header listing millions of tensors
    costs the memory of ``max_tensors`` of them, not of all (about 1 KiB of Python objects per
    ~70 bytes of header text)."""
    count = 0
    limit = max_tensors + 2

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal count
        count += 1
        if count > limit:
            # Prefixed with ``what`` where json.loads' errors are caught.
            raise InvalidInput(_too_many("", max_tensors))
        return _no_duplicates(pairs)

    return hook


def _too_many(what: str, max_tensors: int) -> str:
    return (
        f"{what}: " * bool(what) + f"the header lists more than {max_tensors} tensors "
        "(max_tensors; VramManager(max_tensors=...) raises it)"
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise InvalidInput(f"duplicate key {_shown(k)} in safetensors header")
        # JSON escapes can spell lone surrogates, which have no UTF-8 form (the safetensors
        # library refuses them): a tensor name like that could never be written to an audit
        # record or a report. Every string of a valid header is a key or a value of an object.
        for text in (k, v) if isinstance(v, str) else (k,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInput(f"safetensors header holds a lone surrogate in {text[:64]!r}") from None
        out[k] = v
    return out


def _is_uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _element_count(shape: list[int], limit: int) -> int | None:
    """The product of ``shape``, or ``None`` once it exceeds ``limit``.

    A header may hold millions of large dimensions; multiplying them all out first would build an
    integer of millions of digits, in quadratic time, before the size check could refuse it."""
    if 0 in shape:
        return 0
    count = 1
    for d in shape:
        count *= d
        if count > limit:
            return None
    return count


@dataclass(frozen=True, slots=True)
class SafetensorsEntry:
    """One tensor of a safetensors header, at absolute offsets in the file (header included)."""

    name: str
    dtype: str  # the safetensors name (F32, BF16, ...), one of SAFETENSORS_DTYPES
    shape: tuple[int, ...]
    start: int  # half-open byte range [start, end) in the file
    end: int


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A safetensors header as :func:`parse_safetensors_header` accepted it."""

    #: Offset of the data section: 8 (the length field) + the JSON header's length.
    data_start: int
    #: Every tensor, zero-byte ones included, in file order (by offset, then name).
    entries: tuple[SafetensorsEntry, ...]
    #: ``__metadata__``, strings to strings (empty when the header has none).
    metadata: Mapping[str, str] = field(default_factory=dict)

    def by_name(self) -> dict[str, SafetensorsEntry]:
        return {e.name: e for e in self.entries}

    @property
    def names(self) -> frozenset[str]:
        return frozenset(e.name for e in self.entries)

    def spans(self) -> tuple[TensorSpan, ...]:
        """The header's own span, then one span per tensor of at least one byte, in file order."""
        head = TensorSpan(HEADER_SPAN, 0, self.data_start)
        return (head, *(TensorSpan(e.name, e.start, e.end) for e in self.entries if e.end > e.start))


def safetensors_header_size(prefix: bytes | memoryview, size: int, what: str) -> int:
    """How many leading bytes (8 + the JSON header) a ``size``-byte safetensors file's header takes,
    from at least its first 8 bytes; ``InvalidInput`` when that length cannot be right.

    Lets a reader fetch exactly the header (from a file descriptor, or from device memory) before
    handing it to :func:`parse_safetensors_header`."""
    if size < 8 or len(prefix) < 8:
        raise InvalidInput(f"{what}: safetensors file is truncated ({size} bytes)")
    (n,) = struct.unpack_from("<Q", prefix, 0)
    if n < 2 or n > MAX_SAFETENSORS_HEADER:
        raise InvalidInput(f"{what}: corrupt safetensors header length {n}")
    if 8 + n > size:
        raise InvalidInput(f"{what}: safetensors header ({n} bytes) runs past the end of the file")
    return int(8 + n)


def parse_safetensors_header(
    head: bytes | memoryview, size: int, what: str, *, max_tensors: int = DEFAULT_MAX_TENSORS
) -> SafetensorsHeader:
    """Parse and validate the header of a ``size``-byte safetensors file from its leading bytes.

    ``head`` holds at least the first :func:`safetensors_header_size` bytes of the file (more is
    ignored). Validated as strictly as the safetensors library does, and this is the only parser
    of the format in the package (sealing, the in-place executor views and the example-model
    writer all call it), so what is checked when a file is sealed is exactly what is trusted when
    its sealed bytes are run: no duplicate keys, known dtypes only, sizes matching dtype and
    shape, offsets in bounds, and the data section covered exactly (no overlap, gap or trailing
    bytes), and at most ``max_tensors`` tensors (counted while decoding: refused early). Any
    problem is an ``InvalidInput`` naming ``what``.
    """
    header_end = safetensors_header_size(head, size, what)
    if len(head) < header_end:
        raise InvalidInput(
            f"{what}: safetensors header is truncated: {len(head)} of its {header_end} bytes given"
        )
    raw = bytes(head[8:header_end])
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_object_hook(max_tensors))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, InvalidInput):
            raise InvalidInput(f"{what}: {exc}") from None
        raise InvalidInput(f"{what}: corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidInput(f"{what}: safetensors header is not a JSON object")
    if len(header) - ("__metadata__" in header) > max_tensors:
        # The hook's count allows for __metadata__ even when there is none: the exact count.
        raise InvalidInput(_too_many(what, max_tensors))
    data_start = header_end
    data_len = size - data_start
    metadata: dict[str, str] = {}
    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise InvalidInput(f"{what}: __metadata__ must map strings to strings")
            metadata = info
            continue
        if not isinstance(info, dict):
            raise InvalidInput(f"{what}: entry {_shown(name)} is not an object")
        if name == HEADER_SPAN:
            # The name reports give the header's bytes: a tensor of that name would make "what
            # changed" ambiguous.
            raise InvalidInput(f"{what}: the tensor name {HEADER_SPAN!r} is reserved for the header")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise InvalidInput(f"{what}: tensor {_shown(name)} has no dtype")
        bits = _DTYPE_BITS.get(dtype)
        if bits is None:
            # The safetensors library refuses a dtype it does not know; so do we, since the size
            # of such a tensor could not be checked against its shape.
            raise InvalidInput(f"{what}: tensor {_shown(name)} has unknown dtype {_shown(dtype)}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise InvalidInput(f"{what}: tensor {_shown(name)} has an invalid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise InvalidInput(f"{what}: tensor {_shown(name)} has invalid data_offsets")
        begin, end = offsets
        if begin > end or end > data_len:
            raise InvalidInput(
                f"{what}: tensor {_shown(name)} spans [{begin}, {end}) outside the data section of "
                f"{data_len} bytes (truncated file?)"
            )
        count = _element_count(shape, 8 * (end - begin))
        nbits = None if count is None else count * bits
        if nbits is None or nbits % 8 or nbits // 8 != end - begin:
            raise InvalidInput(
                f"{what}: tensor {_shown(name)} of dtype {_shown(dtype)} and shape {_shown(shape)} "
                f"cannot take {end - begin} bytes"
            )
        entries.append((begin, end, name, dtype, tuple(shape)))
    entries.sort()
    pos = 0
    for begin, end, name, _, _ in entries:
        if begin != pos:
            kind = "overlaps another tensor" if begin < pos else "leaves a gap before it"
            raise InvalidInput(f"{what}: tensor {_shown(name)} {kind} (offset {begin}, expected {pos})")
        pos = end
    if pos != data_len:
        raise InvalidInput(
            f"{what}: tensors cover {pos} bytes but the data section holds {data_len} "
            f"(truncated or padded file)"
        )
    return SafetensorsHeader(
        data_start,
        tuple(
            SafetensorsEntry(name, dtype, shape, data_start + b, data_start + e)
            for b, e, name, dtype, shape in entries
        ),
        MappingProxyType(metadata),
    )


def parse_safetensors(
    fd: int, size: int, what: str, max_tensors: int = DEFAULT_MAX_TENSORS
) -> tuple[tuple[TensorSpan, ...], frozenset[str], bytes]:
    """Tensor spans of a safetensors file (see :func:`parse_safetensors_header`), its tensor names
    and the SHA-256 of the header bytes parsed."""
    header_end = safetensors_header_size(pread_exact(fd, 0, min(size, 8), what), size, what)
    head = pread_exact(fd, 0, header_end, what)
    header = parse_safetensors_header(head, size, what, max_tensors=max_tensors)
    return header.spans(), header.names, hashlib.sha256(head).digest()


#: Bytes of each fixed-size GGUF value type (GGUFValueType: UINT8 .. FLOAT64), and the fewest
#: bytes a string (its u64 length) or an array (u32 type, u64 count) can take.
_GGUF_FIXED: Final = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MIN: Final = {**_GGUF_FIXED, _GGUF_STRING: 8, _GGUF_ARRAY: 12}
#: Arrays of arrays nested deeper than this are refused (no GGUF writer nests them at all).
_GGUF_MAX_NESTING: Final = 16
#: The fewest bytes one tensor info takes: name length, dimension count, type, offset.
_GGUF_MIN_TENSOR_INFO: Final = 24


def _check_gguf_counts(fd: int, size: int, what: str, max_tensors: int) -> None:
    """Check every count in a GGUF header against the bytes the file holds, before gguf's reader
    sees it: the reader loops once per element an array claims, and an element past the end of
    the file reads as empty instead of failing, so a 50-byte file claiming 2**62 elements grows
    a list until the process is killed for memory. A count that cannot fit is ``InvalidInput``;
    whatever else is wrong is left for the reader to find."""
    # Read through pread, not a memory map: a file truncated meanwhile must be an error, not
    # a SIGBUS. The reads are a few bytes each; one 1 MiB window serves thousands of them.
    window = (0, b"")

    def unpack(fmt: str, off: int) -> tuple[int, ...]:
        nonlocal window
        n = struct.calcsize(fmt)
        base, data = window
        if off < base or off + n > base + len(data):
            try:
                data = os.pread(fd, max(n, 1 << 20), off)
            except OSError as exc:
                raise InvalidInput(f"cannot read {what}: {exc.strerror}") from None
            if len(data) < n:
                raise InvalidInput(f"{what} is truncated: it changed while its header was read")
            window = base, data = off, data
        return struct.unpack_from(fmt, data, off - base)

    if size < 24:
        return  # too short to hold its counts: the reader says so
    (version,) = unpack("<I", 4)
    order = ">" if version and not version & 0xFFFF else "<"  # as gguf's reader decides
    if unpack(order + "I", 4)[0] not in (2, 3):
        return  # a version the reader does not take (v1's counts are 32-bit): it says so
    n_tensors, n_kv = unpack(order + "QQ", 8)
    if n_tensors > max_tensors:
        # Before the reader builds one object per tensor info (it is much slower per tensor
        # than the safetensors parser).
        raise InvalidInput(_too_many(what, max_tensors))

    def need(off: int, n: int, each: int) -> None:
        if n * each > size - off:
            raise InvalidInput(
                f"{what}: corrupt GGUF file: the header claims {n} entries of at least {each} "
                f"bytes at offset {off}, beyond the end of the file"
            )

    def skip(off: int, vtype: int, depth: int) -> int:
        # The offset after one value of ``vtype`` at ``off`` (strings and arrays bounded).
        if vtype in _GGUF_FIXED:
            need(off, 1, _GGUF_FIXED[vtype])
            return off + _GGUF_FIXED[vtype]
        if vtype == _GGUF_STRING:
            need(off, 1, 8)
            (n,) = unpack(order + "Q", off)
            need(off + 8, n, 1)
            return off + 8 + n
        if vtype != _GGUF_ARRAY or depth >= _GGUF_MAX_NESTING:
            raise InvalidInput(f"{what}: corrupt GGUF file: value type {vtype} at offset {off}")
        need(off, 1, 12)
        itype, n = unpack(order + "IQ", off)
        off += 12
        if itype not in _GGUF_MIN:
            raise InvalidInput(f"{what}: corrupt GGUF file: array of value type {itype} at offset {off}")
        need(off, n, _GGUF_MIN[itype])
        if itype in _GGUF_FIXED:
            return off + n * _GGUF_FIXED[itype]
        for _ in range(n):  # at most (size - off) / 8 elements: bounded by the file
            off = skip(off, itype, depth + 1)
        return off

    off = 24
    need(off, n_kv, 8 + 4 + 1)  # key length, type, the smallest value
    for _ in range(n_kv):
        off = skip(off, _GGUF_STRING, 0)  # the key
        need(off, 1, 4)
        (vtype,) = unpack(order + "I", off)
        off = skip(off + 4, vtype, 0)
    need(off, n_tensors, _GGUF_MIN_TENSOR_INFO)


def _read_gguf(reader_cls: Any, path: Path) -> tuple[int, list[tuple[str, int, int]]]:
    # Only plain integers and names leave this function, so the reader and its memory map of
    # the whole file are gone when it returns.
    reader = reader_cls(path)
    return int(reader.data_offset), [
        (str(t.name), int(t.data_offset), int(t.n_bytes)) for t in reader.tensors
    ]


def parse_gguf(
    fd: int, size: int, what: str, max_tensors: int = DEFAULT_MAX_TENSORS
) -> tuple[tuple[TensorSpan, ...], frozenset[str], bytes]:
    """Tensor spans of a GGUF file, read with the ``gguf`` package's own reader, its tensor names
    and the SHA-256 of its header (the bytes before the tensor data)."""
    if size < 4 or pread_exact(fd, 0, 4, what) != _GGUF_MAGIC:
        raise InvalidInput(f"{what}: not a GGUF file (bad magic)")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError(
            f"{what}: reading GGUF files needs the gguf package: pip install 'vram-residency[gguf]'"
        ) from None

    # Parse the descriptor already opened and checked, not the path again: on Linux
    # /proc/self/fd/N opens the same inode even if the path was replaced meanwhile.
    _check_gguf_counts(fd, size, what, max_tensors)
    proc = Path(f"/proc/self/fd/{fd}")
    try:
        header_end, raw = _read_gguf(GGUFReader, proc if proc.exists() else Path(what))
    except Exception as exc:
        # gguf's reader raises whatever numpy raises on malformed input (ValueError, IndexError,
        # struct errors, ...); for an untrusted file every one of them means a corrupt header.
        raise InvalidInput(
            f"{what}: corrupt GGUF file: {type(exc).__name__}: {_shown(str(exc), 300)}"
        ) from None
    if len(raw) > max_tensors:  # a header _check_gguf_counts left to the reader
        raise InvalidInput(_too_many(what, max_tensors))
    spans = [TensorSpan(HEADER_SPAN, 0, min(header_end, size))]
    seen: set[str] = set()
    for name, start, n in raw:
        if name in seen:
            raise InvalidInput(f"{what}: duplicate tensor name {_shown(name)} in GGUF file")
        if name == HEADER_SPAN:  # as in a safetensors header: the name of the header's bytes
            raise InvalidInput(f"{what}: the tensor name {HEADER_SPAN!r} is reserved for the header")
        seen.add(name)
        if start < header_end or start + n > size:
            raise InvalidInput(
                f"{what}: tensor {_shown(name)} spans [{start}, {start + n}) outside the file (truncated?)"
            )
        if n:
            spans.append(TensorSpan(name, start, start + n))
    # Two tensors over the same bytes: llama.cpp refuses such a file, and a change there would be
    # reported under both names; a GGUF writer never makes one.
    by_start = sorted(spans[1:], key=lambda sp: sp.start)
    for prev, cur in itertools.pairwise(by_start):
        if cur.start < prev.end:
            raise InvalidInput(
                f"{what}: tensors {_shown(prev.name)} and {_shown(cur.name)} overlap in GGUF file"
            )
    return tuple(spans), frozenset(seen), _sha256_at(fd, 0, spans[0].end, what)


def _sha256_at(fd: int, offset: int, n: int, what: str) -> bytes:
    h = hashlib.sha256()
    pos = offset
    while pos < offset + n:
        step = min(1 << 20, offset + n - pos)
        h.update(pread_exact(fd, pos, step, what))
        pos += step
    return h.digest()


def inspect_file(
    fd: int, path: Path, size: int, fmt: str, max_tensors: int = DEFAULT_MAX_TENSORS
) -> FileLayout:
    if fmt not in FORMATS:
        raise InvalidInput(f"format must be one of {FORMATS}, not {fmt!r}")
    kind = _detect(fd, path, size) if fmt == "auto" else fmt
    what = str(path)
    if kind == "safetensors":
        return FileLayout("safetensors", size, *parse_safetensors(fd, size, what, max_tensors))
    if kind == "gguf":
        return FileLayout("gguf", size, *parse_gguf(fd, size, what, max_tensors))
    return FileLayout("raw", size, ())


def open_model_file(
    path: str | os.PathLike[str], fmt: str = "auto", *, max_tensors: int = DEFAULT_MAX_TENSORS
) -> OpenedFile:
    """Open ``path`` as a regular file and parse its layout (at most ``max_tensors`` tensors);
    ``InvalidInput`` on any problem with the path or the file; OSError (EMFILE, ENFILE) when no
    file descriptor is free (transient)."""
    p = _fspath(path)
    fd, st = _open_regular(p)
    try:
        layout = inspect_file(fd, p, st.st_size, fmt, max_tensors)
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(p, fd, st, layout)
