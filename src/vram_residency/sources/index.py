"""Which files make up a model, and in what order.

A sharded safetensors checkpoint is described by its ``*.safetensors.index.json``, whose
``weight_map`` assigns every tensor to a file. Its files are taken in sorted name order (the
``-00001-of-0000N`` order that the index's writers use), each with the set of tensors it must
hold; anything else is a list of files taken in the order given.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vram_residency._core import DEFAULT_MAX_TENSORS
from vram_residency.errors import InvalidInput
from vram_residency.shard import parse_record_text
from vram_residency.sources.layout import open_model_file, pread_exact

__all__ = ["INDEX_SUFFIX", "ModelFile", "PathArg", "resolve_model_files", "total_size"]

PathArg = str | os.PathLike[str]
INDEX_SUFFIX = ".safetensors.index.json"
_MAX_INDEX_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class ModelFile:
    """One file of a model, with the name the model's index (or the caller) gives it."""

    name: str
    path: Path
    #: Tensor names the index assigns to this file (None: no index, nothing to cross-check).
    expected_tensors: frozenset[str] | None = None


def _as_path(p: object) -> Path:
    if not isinstance(p, (str, os.PathLike)) or not str(p):
        raise InvalidInput(f"path must be a non-empty str or os.PathLike, not {p!r}")
    path = Path(p)
    if "\x00" in str(path):
        raise InvalidInput("path contains a NUL byte")
    return path


def _safe_name(name: object, index: Path) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{index}: file names in weight_map must be non-empty strings")
    try:
        name.encode("utf-8")  # a JSON escape can spell a lone surrogate, which no path can hold
    except UnicodeEncodeError:
        raise InvalidInput(f"{index}: file name {name[:64]!r} is not valid Unicode text") from None
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise InvalidInput(f"{index}: file name {name!r} leaves the model directory")
    return pure.as_posix()


def _read_index(index: Path, max_tensors: int) -> list[ModelFile]:
    # Opened as model files are (regular files only, without blocking): a FIFO named like an
    # index made a plain open() wait for a writer forever.
    with open_model_file(index, "raw") as opened:
        if opened.size > _MAX_INDEX_BYTES:
            raise InvalidInput(f"{index} is larger than {_MAX_INDEX_BYTES} bytes")
        raw = pread_exact(opened.fd, 0, opened.size, str(index))
    # Strictly: deep nesting is InvalidInput (not RecursionError), a repeated key is refused.
    try:
        doc = parse_record_text(raw.decode("utf-8"), "index")
    except (UnicodeDecodeError, InvalidInput) as exc:
        raise InvalidInput(f"{index}: corrupt index: {exc}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidInput(f"{index}: no weight_map")
    if len(weight_map) > max_tensors:
        # Before a set per file and a file opened: the model's files together could list no more.
        # The parse itself is bounded by _MAX_INDEX_BYTES (2,000,000 entries in 53 MB took 7 s
        # and 0.5 GiB to read).
        raise InvalidInput(
            f"{index}: the weight_map lists more than {max_tensors} tensors (max_tensors; "
            "VramManager(max_tensors=...) raises it)"
        )
    by_file: dict[str, set[str]] = {}
    for tensor, fname in weight_map.items():
        by_file.setdefault(_safe_name(fname, index), set()).add(tensor)
    base = index.parent
    return [ModelFile(name, base / name, frozenset(by_file[name])) for name in sorted(by_file)]


def resolve_model_files(
    paths: PathArg | Sequence[PathArg], *, max_tensors: int = DEFAULT_MAX_TENSORS
) -> list[ModelFile]:
    """The ordered files of a model (an index listing more than ``max_tensors`` tensors is
    ``InvalidInput``).

    - a directory holding exactly one ``*.safetensors.index.json``, or such an index file: the
      files the index names, in sorted order, each with the tensors it must hold;
    - one file, or a list of files: those files in the given order, named by their base names.
    """
    if isinstance(paths, (str, os.PathLike)):
        items = [_as_path(paths)]
    elif isinstance(paths, Sequence) and not isinstance(paths, (bytes, bytearray)):
        items = [_as_path(p) for p in paths]
    else:
        raise InvalidInput("paths must be a path or a sequence of paths")
    if not items:
        raise InvalidInput("no files given")
    if len(items) == 1:
        (p,) = items
        if p.is_dir():
            indexes = sorted(p.glob(f"*{INDEX_SUFFIX}"))
            if len(indexes) != 1:
                raise InvalidInput(
                    f"{p} is a directory without exactly one *{INDEX_SUFFIX} "
                    f"(found {len(indexes)}); name the files to seal instead"
                )
            return _read_index(indexes[0], max_tensors)
        if p.name.endswith(INDEX_SUFFIX):
            return _read_index(p, max_tensors)
    files = [ModelFile(p.name, p) for p in items]
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise InvalidInput("model files must have distinct base names")
    return files


def total_size(files: Sequence[ModelFile]) -> int:
    """Bytes in ``files`` as they stand now, for progress bars: a file that cannot be statted
    counts 0 here and is reported properly by whoever opens it."""
    total = 0
    for f in files:
        with contextlib.suppress(OSError):
            total += f.path.stat().st_size
    return total
