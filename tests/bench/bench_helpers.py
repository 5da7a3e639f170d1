"""Loading a bench/ script as a module in the tests: the scripts are not a package (they run as
``python3 bench/x.py`` and import each other by bare name, so bench/ is on sys.path while one
loads)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "bench"


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` as module ``<name>_bench`` (registered in sys.modules, as dataclasses
    and pickling need)."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCH_DIR / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH_DIR))
