"""File naming of a rotation set: ``audit.jsonl`` (active), ``audit.jsonl.1``, ``audit.jsonl.2``...

Rotated files are numbered in the order they were written: ``.1`` is the *oldest*, the active
file (no suffix) the newest. That is the reverse of logrotate's habit on purpose: rotating is then
a single atomic ``rename(active, active.N+1)`` instead of a cascade of renames that a crash could
leave half done, and the chain order of the set is simply ``.1, .2, ..., .N, active``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["chain_order", "default_head_path", "rotated_paths", "rotation_index", "split_rotation"]

_SUFFIX = re.compile(r"^(?P<base>.+)\.(?P<n>[1-9][0-9]*)$")


def split_rotation(path: str | os.PathLike[str]) -> tuple[Path, int | None]:
    """``audit.jsonl.3`` -> (``audit.jsonl``, 3); ``audit.jsonl`` -> (``audit.jsonl``, None)."""
    p = Path(path)
    m = _SUFFIX.match(p.name)
    if m is None:
        return p, None
    return p.with_name(m.group("base")), int(m.group("n"))


def rotation_index(path: str | os.PathLike[str]) -> int | None:
    return split_rotation(path)[1]


def rotated_paths(active: str | os.PathLike[str]) -> list[Path]:
    """The existing rotated files of ``active``, oldest first (not including ``active``)."""
    p = Path(active)
    parent = p.parent
    found: list[tuple[int, Path]] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    prefix = p.name + "."
    for name in names:
        if (
            name.startswith(prefix)
            and name[len(prefix) :].isdigit()
            and not name[len(prefix)].startswith("0")
        ):
            found.append((int(name[len(prefix) :]), parent / name))
    return [q for _, q in sorted(found)]


def chain_order(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Sort files of one or more rotation sets into chain order (``.1``, ``.2``, ..., active).

    A shell glob gives ``audit.jsonl, audit.jsonl.1, audit.jsonl.10, audit.jsonl.2``; the chain
    needs numeric order with the active file last.
    """

    def key(p: Path) -> tuple[str, int]:
        base, n = split_rotation(p)
        return (str(base), n if n is not None else 1 << 62)

    return sorted((Path(p) for p in paths), key=key)


def default_head_path(active: str | os.PathLike[str]) -> Path:
    p = Path(active)
    return p.with_name(p.name + ".head")
