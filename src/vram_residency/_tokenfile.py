"""The one reader of worker token files, used by every command (``serve``, ``seal``, ``audit``).

One policy, so that a token read by ``serve`` is byte for byte the token ``audit verify`` reads
(a token that one command strips differently from another cannot verify its own log):

* **Open without blocking, regular files only.** The file is opened with ``O_NONBLOCK`` (a FIFO
  then opens at once instead of waiting for a writer) and checked through the descriptor with
  ``fstat``: anything that is not a regular file (FIFO, socket, device, directory) is refused.
  Checking the descriptor, not the path, means the check and the read see the same file. A
  symbolic link to a regular file is followed: Kubernetes secret volumes and systemd
  credentials are symlinks, and what counts is the file read, which the descriptor pins.
* **Permissions: refused, everywhere**, when the file has any group or other permission bit or
  belongs to another user (root may own it; root may read anyone's). The token is the key of
  every seal and audit record: a copy readable by others is already a leak, and a verifier that
  accepts it would teach people to leave it so. ``chmod 600 FILE`` fixes it.
* **Stripping: all surrounding ASCII whitespace** (spaces, tabs, CR, LF) is removed, nothing
  else. Editors and ``echo`` add a newline, copy-paste adds spaces; a bearer token travels in an
  HTTP header, where surrounding whitespace is not part of the value anyway.
* **Content:** at most 4096 bytes of printable ASCII without whitespace (it is an HTTP header
  value), and whatever ``formats.keys.token_bytes`` demands of any token (a minimum length).

Errors are :class:`~vram_residency.errors.ConfigError` and never show the file's content.
"""

from __future__ import annotations

import os
import stat
from typing import Final

from vram_residency.errors import ConfigError
from vram_residency.formats.keys import token_bytes

__all__ = ["MAX_TOKEN_FILE_BYTES", "read_token_file"]

MAX_TOKEN_FILE_BYTES: Final = 4096
_WHITESPACE: Final = b" \t\r\n\x0b\x0c"


def _shown(name: str) -> str:
    """The path for an error that could not open it. The usual slip is the token itself given
    where its file is expected (``--token-file "$TOKEN"``); naming that "file" would print the
    token into terminals and CI logs. A name of 16 characters or more (a token's minimum) with
    no ``.``, not starting with ``/`` or ``~``, and with no existing directory part (a base64
    token holds ``/``) is not shown; a token file's path seldom looks like that."""
    looks_like_token = (
        len(name) >= 16
        and "." not in name
        and not name.startswith(("/", "~"))
        and ("/" not in name or not os.path.isdir(os.path.dirname(name)))
    )
    if looks_like_token:
        return f"(not shown: the {len(name)} characters given look like a token, not a path)"
    return name


def read_token_file(path: str | os.PathLike[str]) -> str:
    """Read, check and return the worker token in ``path`` (see the module docstring)."""
    name = os.fspath(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(name, flags)
    except FileNotFoundError:
        raise ConfigError(f"worker token file {_shown(name)} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot open worker token file {_shown(name)}: {exc.strerror}") from None
    try:
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise ConfigError(f"cannot read worker token file {name}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"worker token file {name} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"worker token file {name} has mode {stat.S_IMODE(st.st_mode):04o}: it must not be "
                f"accessible by group or others (chmod 600 {name})"
            )
        euid = os.geteuid()
        if euid != 0 and st.st_uid not in (euid, 0):
            raise ConfigError(f"worker token file {name} is owned by another user (uid {st.st_uid})")
        if st.st_size > MAX_TOKEN_FILE_BYTES:
            raise ConfigError(f"worker token file {name} is larger than {MAX_TOKEN_FILE_BYTES} bytes")
        try:
            raw = os.read(fd, MAX_TOKEN_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read worker token file {name}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_TOKEN_FILE_BYTES:  # it grew between fstat and read
        raise ConfigError(f"worker token file {name} is larger than {MAX_TOKEN_FILE_BYTES} bytes")
    token = raw.strip(_WHITESPACE)
    if not token:
        raise ConfigError(f"worker token file {name} is empty")
    if any(b < 0x21 or b > 0x7E for b in token):
        raise ConfigError(f"worker token in {name} must be printable ASCII without inner whitespace")
    try:
        token_bytes(token)  # the library's own rules (minimum length): one place decides
    except ConfigError as exc:
        raise ConfigError(f"worker token in {name}: {exc}") from None
    return token.decode("ascii")
