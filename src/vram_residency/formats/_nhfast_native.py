"""Optional native host path of ``nh-fast-v1`` leaf tags (``_nhfast.c`` -> ``_nhfast.so``).

Built beside ``_treehash.so`` by the hatch build hook (``hatch_build.py``) or by hand with
``python -m vram_residency.formats._nhfast_native --build``; the compile command is
``_native.compile_library``. When the library is missing, :func:`available` is false and
``nhfast.py`` uses its numpy path, which gives the same bytes more slowly.

Imports only the standard library at module level, like ``_native.py``.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Final

from vram_residency.formats._native import NativeLibrary, build_main

__all__ = ["LIBRARY_NAME", "PATHS", "SOURCE_NAME", "available", "leaf_tags", "path_name"]

SOURCE_NAME: Final = "_nhfast.c"
LIBRARY_NAME: Final = "_nhfast.so"
_HERE: Final = Path(__file__).resolve().parent
_LEAF: Final = 4096
_TAG: Final = 24
_KEY_BYTES: Final = 5120
#: Names of the C paths (``nhfast_path``): the portable loop, AVX2, AVX-512F.
PATHS: Final = ("portable", "avx2", "avx512f")


def _bind(lib: ctypes.CDLL) -> str:
    lib.nhfast_leaf_tags.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint64,
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.nhfast_leaf_tags.restype = ctypes.c_int
    lib.nhfast_path.argtypes = [ctypes.c_int]
    lib.nhfast_path.restype = ctypes.c_int
    return ""


_LIB = NativeLibrary(_HERE / LIBRARY_NAME, _bind, "nh-fast-v1")


def unavailable_reason() -> str | None:
    return _LIB.unavailable_reason()


def available() -> bool:
    return unavailable_reason() is None


def path_name(want: int = -1) -> str:
    """The C path ``leaf_tags(..., want=want)`` runs on this CPU."""
    return PATHS[int(_LIB.handle().nhfast_path(want))]


def leaf_tags(view: memoryview, nh_key: bytes, threads: int, *, want: int = -1) -> bytes:
    """Leaf tags of ``view`` (``24 * max(1, ceil(n / 4096))`` bytes) under the 5120-byte NH key.

    ``want`` caps the vector path (0 portable, 1 AVX2, 2 AVX-512F; -1 the best available): the
    tests run every path against the reference."""
    lib = _LIB.handle()
    if len(nh_key) != _KEY_BYTES:
        raise ValueError("the NH key is 5120 bytes")
    import numpy as np

    # A numpy buffer export works for read-only and writable buffers alike and pins the memory
    # (a bytearray behind it cannot be resized) until after the call.
    arr = np.frombuffer(view, dtype=np.uint8)
    n = arr.size
    out = ctypes.create_string_buffer(_TAG * max(1, -(-n // _LEAF)))
    ptr = arr.ctypes.data if n else None
    rc = lib.nhfast_leaf_tags(ptr, n, nh_key, out, max(1, int(threads)), int(want))
    del arr
    if rc != 0:
        raise RuntimeError(f"native nh-fast-v1 failed (rc={rc})")
    return out.raw


def _main(argv: list[str]) -> int:
    return build_main(argv, _HERE / SOURCE_NAME, _LIB, lambda: f" ({path_name()})")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
