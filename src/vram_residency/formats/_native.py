"""Optional native accelerator for ``sha256-tree-v1`` on the host.

Placeholder until the native library lands: reports unavailable, so the pure-Python path runs.
"""

from __future__ import annotations


def available() -> bool:
    return False


def sha256_tree_units(view: memoryview, threads: int) -> bytes:
    raise RuntimeError("native tree hasher is not available")
