"""Open files that a command only reads, refusing anything that is not a regular file.

A path given by an operator can be a FIFO (a plain ``open`` waits for a writer forever), a
character device (``/dev/zero`` and ``/dev/urandom`` never end; ``/dev/zero`` even reports size
0) or a symlink to either. The file is opened with ``O_NONBLOCK`` (a FIFO opens at once; the flag
does nothing to reads of regular files) and checked through the descriptor with ``fstat``, so the
check and the read see the same file.

The errors are ``OSError``s carrying ``filename`` and ``strerror``, so that every caller's
existing handling of an unreadable file (one line naming it) applies unchanged.
"""

from __future__ import annotations

import errno
import io
import os
import stat

__all__ = ["NotRegularFileError", "open_regular", "read_regular"]


class NotRegularFileError(OSError):
    """The path names a FIFO, socket or device: reading it might block or never end."""


def open_regular(path: str | os.PathLike[str]) -> io.BufferedReader:
    """``open(path, "rb")``, for regular files only."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(
                errno.EINVAL, "not a regular file (FIFO, socket or device)", os.fspath(path)
            )
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes (``EFBIG`` above)."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(path))
    return data
