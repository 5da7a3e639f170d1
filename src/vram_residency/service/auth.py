"""The worker token: where it comes from, how it is checked on disk, how requests prove it.

The token is a bearer credential *and* the key material of every seal and audit record, so it
lives only in a file that nobody but the worker's user can read. Where it comes from, in order:

1. an explicit path (``--token-file``),
2. ``$WORKER_API_TOKEN_FILE``,
3. systemd credentials: ``$CREDENTIALS_DIRECTORY/worker_api_token`` (``LoadCredential=``),
4. only for a bare ``serve``: a file in the state directory, created on first run (mode 0600).

The first three must already exist; the service refuses to start when the file is missing,
empty, not a regular file, owned by another user, or has any group/other permission bit.

Requests carry ``Authorization: Bearer <token>``. Only the SHA-256 of the token is kept for the
comparison, which is constant time over two equal-length digests, so neither the token's length
nor any prefix of it shows in the timing.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from vram_residency._tokenfile import read_token_file as _read_token_file
from vram_residency.formats.keys import token_bytes

__all__ = [
    "CREDENTIAL_NAME",
    "TOKEN_ENV",
    "BearerCheck",
    "TokenSource",
    "create_token_file",
    "default_state_dir",
    "find_token_file",
    "fingerprint",
    "read_token_file",
]

TOKEN_ENV: Final = "WORKER_API_TOKEN_FILE"  # noqa: S105 - a variable name, not a secret
CREDENTIAL_NAME: Final = "worker_api_token"
DEFAULT_TOKEN_NAME: Final = "worker.token"  # noqa: S105 - a file name, not a secret
_FINGERPRINT_DOMAIN: Final = b"vram-residency worker token fingerprint v1\x00"


class TokenOrigin(enum.Enum):
    ARGUMENT = "--token-file"
    ENVIRONMENT = TOKEN_ENV
    CREDENTIALS = "$CREDENTIALS_DIRECTORY"
    STATE_DIR = "state directory"


@dataclass(frozen=True, slots=True)
class TokenSource:
    path: Path
    origin: TokenOrigin
    may_create: bool  # only the state-directory default may be created


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/vram-residency``, else ``~/.local/state/vram-residency``."""
    base = os.environ.get("XDG_STATE_HOME")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "vram-residency"


def find_token_file(explicit: str | os.PathLike[str] | None, state_dir: Path | None) -> TokenSource:
    """Where the token is to be read from (see the module docstring for the order)."""
    if explicit is not None:
        return TokenSource(Path(explicit), TokenOrigin.ARGUMENT, False)
    env = os.environ.get(TOKEN_ENV)
    if env:
        return TokenSource(Path(env), TokenOrigin.ENVIRONMENT, False)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        return TokenSource(Path(creds) / CREDENTIAL_NAME, TokenOrigin.CREDENTIALS, False)
    return TokenSource((state_dir or default_state_dir()) / DEFAULT_TOKEN_NAME, TokenOrigin.STATE_DIR, True)


def read_token_file(path: Path) -> bytes:
    """Read and check a token file; raise ConfigError (never showing the content) if unusable.

    The checks are ``vram_residency._tokenfile``'s, the one reader every command uses, so that
    the token ``serve`` seals and signs with is byte for byte the token ``audit verify`` and
    ``attest`` read."""
    return token_bytes(_read_token_file(path))


def create_token_file(path: Path) -> bytes:
    """Create a new random token file with mode 0600 (directory 0700); fail if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32).encode("ascii")
    # O_EXCL: never overwrite (or follow a planted symlink to) an existing file.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen it, but make the mode explicit anyway
        os.write(fd, token + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return token


def fingerprint(token: bytes) -> str:
    """A short, domain-separated fingerprint (8 hex digits) to tell tokens apart in output."""
    return hashlib.sha256(_FINGERPRINT_DOMAIN + token).hexdigest()[:8]


class BearerCheck:
    """Constant-time check of ``Authorization`` header values against the worker token.

    Holds only the SHA-256 of the expected token; its repr shows nothing.
    """

    __slots__ = ("_digest",)

    def __init__(self, token: bytes) -> None:
        self._digest = hashlib.sha256(token).digest()

    def check_header(self, value: bytes | str | None) -> bool:
        if value is None:
            return False
        raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
        scheme, _, presented = raw.strip().partition(b" ")
        # Always hash and compare, also for a wrong scheme, so a bad header costs the same time.
        ok_scheme = scheme.lower() == b"bearer"
        ok = hmac.compare_digest(hashlib.sha256(presented.strip()).digest(), self._digest)
        return ok and ok_scheme

    @property
    def fp6(self) -> str:
        """The token's fp6 breadcrumb: the first 6 hex characters of SHA-256(token)."""
        return self._digest.hex()[:6]

    def __repr__(self) -> str:
        return "BearerCheck(<redacted>)"
