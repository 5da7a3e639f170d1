"""The thread count of numpy's BLAS in the worker process.

The built-in executor multiplies small matrices (a few dozen tokens by 384 or 1536). Measured on
this project's 2-CPU CI machine while other processes were busy: one sentence through
all-MiniLM-L6-v2 took 36 ms with single-threaded OpenBLAS and 200 to 850 ms with two threads,
whose spinning workers fight over the cores with everything else (including the verification
threads). A worker therefore runs its BLAS single-threaded unless told otherwise; batches, not
BLAS threads, are where its throughput comes from.

OpenBLAS (what numpy's wheels ship) has no Python API for this, so the setter is called through
``ctypes`` on the library numpy loaded, found in ``/proc/self/maps``. Elsewhere (another BLAS,
another OS) nothing is changed and ``None`` is returned.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Final

__all__ = ["set_blas_threads"]

log = logging.getLogger("vram_residency.service")

_SETTERS: Final = (
    "openblas_set_num_threads",
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads_64_",
    "openblas_set_num_threads64_",
)


def _loaded_openblas() -> Path | None:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if "openblas" in Path(path).name.lower() and ".so" in path:
                    return Path(path)
    except OSError:
        pass
    return None


def set_blas_threads(n: int) -> str | None:
    """Set the number of OpenBLAS threads of this process; say what was done, or None."""
    import numpy  # noqa: F401  # loads numpy's BLAS, so that it can be found

    path = _loaded_openblas()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    for name in _SETTERS:
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes = [ctypes.c_int]
            fn.restype = None
            fn(int(n))
            return f"{path.name}: {name}({n})"
    return None
