"""Argument types shared by the commands: out-of-range values end as a usage error (exit 2,
one line naming the option), never as a traceback from deep inside the library."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["device_ordinal", "finite", "integer_in", "mib", "output_path", "positive"]


def device_ordinal(text: str) -> int:
    """A GPU ordinal: a non-negative integer."""
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return v


def finite(text: str) -> float:
    """A finite number; its range is the command's to check. NaN passes every range check written
    as ``not x < low`` and fails every other: refused here, by name, before it reaches a timeout
    or an ``int()``."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def positive(high: float, unit: str) -> Callable[[str], float]:
    """A number of ``unit`` (fractions allowed), finite, more than 0 and at most ``high``. NaN
    passes every ``<=`` check and infinity every ``>`` check: both are refused by name here,
    before they reach ``int()`` or a socket timeout."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or not 0 < v <= high:
            raise argparse.ArgumentTypeError(f"must be more than 0 and at most {high:g} {unit}")
        return v

    return parse


def mib(high: float) -> Callable[[str], float]:
    """A size in MiB (fractions allowed), finite, more than 0 and at most ``high``."""
    return positive(high, "MiB")


def integer_in(low: int, high: int) -> Callable[[str], int]:
    """An integer from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}")
        return v

    return parse


def output_path(text: str) -> Path:
    """A file to write: its directory must exist and be writable, checked before any work."""
    p = Path(text)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"directory {parent} is not writable")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{p} is a directory")
    # The file is written to a temporary file renamed over the path: over a device, a FIFO or a
    # link to one that replaces the node itself (`-o /dev/null` run as root replaced /dev/null).
    for st in _stats(p):
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise argparse.ArgumentTypeError(
                f"{p} is not a regular file (a device, FIFO or socket, or a link to one)"
            )
    return p


def _stats(p: Path) -> list[os.stat_result]:
    """The path's own status and, through a symbolic link, its target's (none if absent)."""
    out = []
    for follow in (False, True):
        # Absent (or a dangling link): nothing there to replace but the link.
        with contextlib.suppress(OSError):
            out.append(os.stat(p, follow_symlinks=follow))
    return out
