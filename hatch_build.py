"""Hatch build hook: compile the optional native accelerators (``sha256-tree-v1``, ``nh-fast-v1``).

``src/vram_residency/formats/_treehash.c`` becomes ``vram_residency/formats/_treehash.so`` (and
``_nhfast.c`` becomes ``_nhfast.so`` the same way):

- editable installs (what ``uv sync`` and ``dev.py`` do): built into the source tree, because
  that is where the editable package is imported from;
- regular wheels: built in a temporary folder and force-included, so ``uv build`` does not touch
  the source tree, and the wheel is tagged for the platform (``py3-none-<platform>``: the library
  is loaded with ctypes, not as a CPython extension, so any Python 3 on that platform can use it).

Without a C compiler (a fresh machine may have only python3 and pip) or when the compile fails,
it prints a warning and the package is built without the library; ``formats/_native.py`` then
reports unavailable and ``formats/tree.py`` uses its pure-Python path. Set
``VRAM_RESIDENCY_NO_NATIVE=1`` to skip the compile on purpose.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface  # type: ignore[import-not-found,unused-ignore]

_PKG_DIR = Path("src", "vram_residency", "formats")
_DIST_DIR = "vram_residency/formats"
#: Further native libraries built the same way (source, library): nh-fast-v1's leaf tags.
_EXTRA = (("_nhfast.c", "_nhfast.so"),)


def _load_native(root: Path) -> ModuleType:
    # The compile command lives in _native.py (one source of truth for `--build` and this hook);
    # it is loaded by path because the package itself is not importable in the build env.
    path = root / _PKG_DIR / "_native.py"
    spec = importlib.util.spec_from_file_location("_vram_residency_native_build", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _platform_tag() -> str:
    from packaging.tags import sys_tags  # a hatchling dependency

    # Same choice as hatchling's own inferred tag: the first tag that is not manylinux/musllinux.
    for tag in sys_tags():
        if "manylinux" not in tag.platform and "musllinux" not in tag.platform:
            return tag.platform
    raise RuntimeError("no platform tag")


class NativeTreeHashHook(BuildHookInterface):  # type: ignore[misc,type-arg,unused-ignore]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        self._tmp: str | None = None
        if os.environ.get("VRAM_RESIDENCY_NO_NATIVE") == "1":
            self._warn("VRAM_RESIDENCY_NO_NATIVE=1: building without the native sha256-tree-v1 library")
            return
        root = Path(self.root)
        try:
            native = _load_native(root)
        except Exception as exc:  # a broken helper must not break the install
            self._warn(f"cannot load the native build helper: {exc}")
            return
        if version != "editable":
            self._tmp = tempfile.mkdtemp(prefix="vram-residency-native-")
        built = False
        for src_name, lib_name in ((native.SOURCE_NAME, native.LIBRARY_NAME), *_EXTRA):
            source = root / _PKG_DIR / src_name
            dest = root / _PKG_DIR / lib_name if self._tmp is None else Path(self._tmp, lib_name)
            err = native.compile_library(source, dest)
            if err:
                self._warn(
                    f"building without the native {lib_name} library ({err}); the slower "
                    "Python path will be used"
                )
                continue
            built = True
            if self._tmp is not None:
                build_data["force_include"][str(dest)] = f"{_DIST_DIR}/{lib_name}"
        if built and self._tmp is not None:
            build_data["pure_python"] = False
            build_data["tag"] = f"py3-none-{_platform_tag()}"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if getattr(self, "_tmp", None):
            shutil.rmtree(str(self._tmp), ignore_errors=True)

    def _warn(self, message: str) -> None:
        # hatch prints warnings to stderr (pip -v and uv -v show them) unless run with -qq.
        self.app.display_warning(f"WARNING vram-residency: {message}")
