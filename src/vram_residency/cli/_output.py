"""Lines the commands print for other programs to read."""

from __future__ import annotations

__all__ = ["digest_line"]


def digest_line(digest_hex: str, algorithm: str, name: str) -> str:
    """``DIGEST  ALGORITHM  NAME``, one line whatever the name holds.

    A file name may contain a newline: printed as it is, ``evil\\n<64 zeros>  sha256-tree-v1
    passwd`` reads as a second line, a digest for a file never hashed. As ``sha256sum`` does, a
    name with a backslash, CR or LF is escaped (``\\\\``, ``\\r``, ``\\n``) and its line starts
    with a backslash, so that a reader can tell an escaped name from a plain one.
    """
    if not any(c in name for c in "\\\r\n"):
        return f"{digest_hex}  {algorithm}  {name}"
    escaped = name.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
    return f"\\{digest_hex}  {algorithm}  {escaped}"
