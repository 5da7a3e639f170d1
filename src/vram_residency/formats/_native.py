"""Optional native accelerator for ``sha256-tree-v1`` unit digests on the host.

``_treehash.c`` is compiled into ``_treehash.so`` next to this file by the hatch build hook
(``hatch_build.py``, for wheel and editable installs) or by hand with
``python -m vram_residency.formats._native --build``. When the library or a usable libcrypto is
missing, :func:`available` is false and ``tree.py`` runs its pure-Python path instead.

The library is called through :mod:`ctypes`, which releases the GIL for the duration of a foreign
call, so other Python threads keep running while the C threads hash.

This module imports only the standard library at module level: ``hatch_build.py`` loads it by
file path inside an isolated build environment (without numpy) to reuse :func:`compile_library`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

__all__ = [
    "LIBRARY_NAME",
    "SOURCE_NAME",
    "NativeLibrary",
    "available",
    "build_main",
    "compile_library",
    "sha256_tree_units",
]

SOURCE_NAME: Final = "_treehash.c"
LIBRARY_NAME: Final = "_treehash.so"
_HERE: Final = Path(__file__).resolve().parent
_UNIT_SIZE: Final = 1 << 20
#: -O3 for the loop code; the hashing itself is libcrypto's assembly, so no -march is needed
#: (and none is wanted: the wheel must run on any x86-64 / aarch64 machine).
CFLAGS: Final = ("-O3", "-fPIC", "-shared", "-pthread", "-std=c11")
LDLIBS: Final = ("-ldl",)  # dlopen is in libc since glibc 2.34; older glibc needs libdl.


class NativeLibrary:
    """One optional native library of this package, loaded on first use, once.

    ``bind(lib)`` declares the C signatures (and may initialise the library); it returns "" when
    the library is usable, otherwise why not. The load is under a lock: ctypes drops the GIL
    inside C calls (``treehash_init``), so two first callers could otherwise both bind it."""

    def __init__(self, path: Path, bind: Callable[[ctypes.CDLL], str], label: str) -> None:
        self.path = path
        self.label = label
        self._bind = bind
        self._lib: ctypes.CDLL | None = None
        self._state: str | None = None  # None: not tried yet; "" loaded; otherwise why not
        self._lock = threading.Lock()

    def _load(self) -> str:
        if not self.path.exists():
            return f"{self.path} not built"
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            return f"cannot load {self.path}: {exc}"
        why = self._bind(lib)
        if not why:
            self._lib = lib
        return why

    def unavailable_reason(self) -> str | None:
        """``None`` when the library is usable, otherwise a short explanation."""
        if self._state is None:
            with self._lock:
                if self._state is None:
                    self._state = self._load()
        return self._state or None

    def handle(self) -> ctypes.CDLL:
        """The loaded library; RuntimeError (with the reason) when it is not usable."""
        reason = self.unavailable_reason()
        if reason is not None or self._lib is None:
            raise RuntimeError(f"native {self.label} is not available: {reason}")
        return self._lib


def build_main(argv: list[str], source: Path, lib: NativeLibrary, detail: Callable[[], str]) -> int:
    """``python -m ...`` of a native module: ``--build`` compiles ``source`` into the library's
    path first; then say whether the library is usable (``detail()`` adds to "available")."""
    if argv == ["--build"]:
        err = compile_library(source, lib.path)
        if err:
            print(f"build failed: {err}", file=sys.stderr)
            return 1
        print(f"built {lib.path}")
    reason = lib.unavailable_reason()
    state = f"available{detail()}" if reason is None else f"unavailable ({reason})"
    print(f"native {lib.label}: {state}")
    return 0 if reason is None else 1


def compile_library(source: Path, dest: Path, *, cc: str | None = None) -> str | None:
    """Compile ``source`` into the shared library ``dest``; return ``None`` or why it failed.

    Never raises for a missing or failing compiler: a machine with only python3 and pip must
    still build and install the package (the pure-Python path then runs).
    """
    compiler = (
        cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    )
    if not compiler:
        return "no C compiler found (set CC or install cc/gcc/clang)"
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: a process that already mapped the old library keeps
    # its inode, and nobody ever sees a half-written file.
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    cmd = [*compiler.split(), *CFLAGS, "-o", str(tmp), str(source), *LDLIBS]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        return f"cannot run {compiler!r}: {exc}"
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        return f"{' '.join(cmd)} failed:\n{proc.stderr.strip()}"
    os.replace(tmp, dest)
    return None


def _libcrypto_candidates() -> list[str]:
    # Prefer the exact libcrypto that Python's own _hashlib mapped: it is known to load here and
    # hashlib's measured speed is the baseline we are compared with. /proc/self/maps names it.
    out: list[str] = []
    try:
        import _hashlib  # noqa: F401  (maps libcrypto into this process when it is shared)

        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if "/libcrypto.so" in path and path not in out:
                    out.append(path)
    except (ImportError, OSError):
        pass
    out.append("libcrypto.so.3")
    found = ctypes.util.find_library("crypto")
    if found:
        out.append(found)
    return out


def _bind(lib: ctypes.CDLL) -> str:
    lib.treehash_init.argtypes = [ctypes.c_char_p]
    lib.treehash_init.restype = ctypes.c_int
    lib.treehash_sha256_units.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int]
    lib.treehash_sha256_units.restype = ctypes.c_int
    for cand in _libcrypto_candidates():
        if lib.treehash_init(os.fsencode(cand)) == 0:
            return ""
    return "no libcrypto with SHA256_Init/Update/Final found"


_LIB = NativeLibrary(_HERE / LIBRARY_NAME, _bind, "sha256-tree-v1")


def unavailable_reason() -> str | None:
    """``None`` when the native path is usable, otherwise a short explanation."""
    return _LIB.unavailable_reason()


def available() -> bool:
    return unavailable_reason() is None


def sha256_tree_units(view: memoryview, threads: int) -> bytes:
    """The ``sha256-tree-v1`` unit digests of ``view``: ``32 * max(1, ceil(n / 1 MiB))`` bytes.

    ``view`` may be read-only (bytes, read-only mmap) or writable; it must be C-contiguous.
    The GIL is released while the C threads hash.
    """
    lib = _LIB.handle()
    import numpy as np  # a project dependency; imported late so the build hook does not need it

    # numpy takes a buffer export of ``view`` for read-only and writable buffers alike (ctypes'
    # from_buffer refuses read-only ones). ``arr`` holds that export until after the call, so
    # the memory stays valid and a bytearray behind it cannot be resized meanwhile.
    arr = np.frombuffer(view, dtype=np.uint8)
    n = arr.size
    units = max(1, -(-n // _UNIT_SIZE))
    out = ctypes.create_string_buffer(32 * units)
    rc = lib.treehash_sha256_units(arr.ctypes.data if n else None, n, out, max(1, int(threads)))
    del arr
    if rc != 0:
        raise RuntimeError(f"native tree hasher failed (rc={rc})")
    return out.raw


def _main(argv: list[str]) -> int:
    return build_main(argv, _HERE / SOURCE_NAME, _LIB, lambda: "")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
