"""Compiled kernels kept on disk across processes (issue 11): NVRTC's CUBIN, so that a second
process's first seal does not pay a second of compilation per kernel source.

Where: ``$VRAM_RESIDENCY_KERNEL_CACHE`` if set (``off`` or ``0`` disables the cache), else
``$XDG_CACHE_HOME/vram-residency/kernels``, else ``~/.cache/vram-residency/kernels``.

Why it is careful: a CUBIN is code that runs on the GPU over the sealed bytes, so a planted entry
could report any digest it likes. Entries are trusted only as far as the directory is:

- the directory is created 0700 and used only if it is owned by this user and writable by no one
  else; entries must be regular files owned by this user with no group or other access (0600);
- an entry is ``MAGIC | key (32) | SHA-256 of payload (32) | LE64 payload length | payload``,
  named after its key. The key is SHA-256 over the kernel source and headers, the compile
  options, the architecture, and the NVRTC and driver versions, so a changed source, option or
  toolkit never loads an old entry. A wrong magic, key (a foreign or renamed entry), length
  (truncated), checksum (corrupt) or a payload that is not ELF is refused, logged, recompiled
  and replaced;
- writes go to a temporary file in the same directory (0600), then ``os.replace``, so a reader
  sees the old entry or the new one, never half of one. Concurrent writers race harmlessly.

Nothing here raises: any problem with the cache means compiling in memory as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

__all__ = ["MAGIC", "cache_dir", "entry_key", "load", "store"]

log = logging.getLogger("vram_residency.kernel_cache")

MAGIC: Final = b"VRKCUBIN1\n"
_HEADER: Final = len(MAGIC) + 32 + 32 + 8
_MAX_ENTRY: Final = 64 << 20  # our CUBINs are about 200 KiB; anything huge is not ours
ENV: Final = "VRAM_RESIDENCY_KERNEL_CACHE"


def cache_dir() -> Path | None:
    """The cache directory to use, or None when the cache is switched off."""
    env = os.environ.get(ENV)
    if env is not None:
        if env.strip().lower() in ("", "0", "off", "no", "false"):
            return None
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "vram-residency" / "kernels"


def entry_key(
    sources: Sequence[bytes], options: Sequence[str], arch: str, nvrtc: tuple[int, int], driver: int | None
) -> bytes:
    """32-byte key of one compilation: everything that changes the machine code it yields."""
    h = hashlib.sha256()
    for src in sources:
        h.update(len(src).to_bytes(8, "little"))
        h.update(src)
    meta = {"options": list(options), "arch": arch, "nvrtc": list(nvrtc), "driver": driver, "format": 1}
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.digest()


def _dir_ok(d: Path, *, create: bool) -> bool:
    try:
        if create:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(d, follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        log.warning("kernel cache %s is not a directory; not used", d)
        return False
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        # Someone else could place code there that our process would run on the GPU.
        log.warning("kernel cache %s is not owned by this user or is writable by others; not used", d)
        return False
    return True


def _path(d: Path, key: bytes) -> Path:
    return d / f"{key.hex()}.cubin"


def load(d: Path, key: bytes) -> bytes | None:
    """The cached CUBIN for ``key``, or None (absent, or refused and logged)."""
    path = _path(d, key)
    if not path.exists() or not _dir_ok(d, create=False):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        log.warning("kernel cache entry %s unreadable (%s); recompiling", path.name, exc.strerror)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return _refuse(path, "not a private regular file of this user")
        if st.st_size > _MAX_ENTRY:
            return _refuse(path, "too large")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(_MAX_ENTRY + 1)
    except OSError as exc:
        log.warning("kernel cache entry %s unreadable (%s); recompiling", path.name, exc.strerror)
        return None
    finally:
        os.close(fd)
    if len(raw) < _HEADER or not raw.startswith(MAGIC):
        return _refuse(path, "not a kernel cache entry (bad magic or truncated header)")
    at = len(MAGIC)
    stored_key, checksum = raw[at : at + 32], raw[at + 32 : at + 64]
    length = int.from_bytes(raw[at + 64 : at + 72], "little")
    payload = raw[_HEADER:]
    if stored_key != key:
        return _refuse(path, "entry belongs to another key")
    if length != len(payload):
        return _refuse(path, "truncated or padded")
    if hashlib.sha256(payload).digest() != checksum:
        return _refuse(path, "checksum mismatch (corrupt)")
    if not payload.startswith(b"\x7fELF"):
        return _refuse(path, "payload is not a CUBIN")
    return payload


def _refuse(path: Path, why: str) -> bytes | None:
    log.warning("kernel cache entry %s refused: %s; recompiling", path.name, why)
    return None


def store(d: Path, key: bytes, payload: bytes) -> bool:
    """Write the entry atomically; False (logged at debug level) when the cache cannot be used."""
    if not _dir_ok(d, create=True):
        return False
    header = MAGIC + key + hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "little")
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".cubin", dir=d)  # 0600
        with os.fdopen(fd, "wb") as f:
            f.write(header + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, _path(d, key))
        tmp = None
        return True
    except OSError as exc:
        log.debug("kernel cache entry not written: %s", exc)
        return False
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
