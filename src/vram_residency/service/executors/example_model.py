"""The example model a bare ``serve`` commits: a byte-level decoder with RANDOM weights.

Its weights are drawn from a fixed seed (numpy's PCG64, one stream per tensor), so every
generation writes the same bytes. They are not trained: the tokens it generates are noise. It
exists so that a worker with nothing installed runs seal -> verify -> execute on real compute,
with the costs of a real generator (every token reads every weight), which an encoder run once per
request does not have.

Presets: ``small`` (6 layers, 384 hidden, 43 MB of float32) is the default example; ``1gib``
(5 layers, 2048 hidden, about 1 GiB) is for measuring verification before execute on a GPU.

Where it lives: ``STATE_DIR/example-models/<name>/`` (``model.safetensors`` and ``config.json``),
a directory of the worker's own (mode 0700), never a path a client names. On first use in a
process the whole file image is generated in memory and compared with the files there; a file
that is missing or differs is rewritten atomically (a temporary file in the same directory,
fsynced, its safetensors header read back from the file and checked by the package's one strict
parser, :func:`vram_residency.sources.parse_safetensors_header`, then renamed over it). The
digest of the generated image (under the worker's digest algorithm) goes with the model, and the
commit refuses bytes that do not seal to it, so a file changed between the check and the seal is
caught too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from vram_residency.errors import ConfigError, InvalidInput
from vram_residency.formats.tree import digest
from vram_residency.service.executors.decoder import EOS_ID, ByteLMConfig
from vram_residency.sources import parse_safetensors_header, safetensors_header_size

__all__ = [
    "EXAMPLE_NAMES",
    "PRESETS",
    "SEED",
    "GeneratedModel",
    "ensure_example",
    "example_provider",
    "file_image",
    "seed_note",
]

#: The fixed seed of every example model (the date the model was designed).
SEED: Final = 20261128
PRESETS: Final[dict[str, ByteLMConfig]] = {
    "small": ByteLMConfig(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1024),
    "1gib": ByteLMConfig(hidden_size=2048, num_layers=5, num_heads=16, intermediate_size=6144),
}
#: The model name each preset is committed under.
EXAMPLE_NAMES: Final[dict[str, str]] = {"small": "random-byte-lm", "1gib": "random-byte-lm-1gib"}
_INIT_STD: Final = 0.02


@dataclass(frozen=True, slots=True)
class GeneratedModel:
    directory: Path
    sha256: str  # of model.safetensors
    digest: str  # of model.safetensors under ``algorithm``
    algorithm: str
    written: bool  # False when the files on disk were already exactly right


def file_image(config: ByteLMConfig, seed: int = SEED) -> bytearray:
    """The complete safetensors file of the model, weights drawn from ``seed``.

    Each tensor has its own stream (``default_rng([seed, index])``), written straight into the
    image through a numpy view: the image is the only copy. Matrices are N(0, 0.02), the output
    projections of each block scaled by 1/sqrt(2 x layers) (GPT-2's initialization), norms 1.
    The <eos> row of the output projection is zero: its logit is then 0 while the largest of the
    other 256 is almost surely above 0, so greedy decoding of this untrained model runs to
    max_tokens instead of stopping at a random step.
    """
    shapes = config.tensor_shapes()
    header: dict[str, object] = {
        "__metadata__": {
            "generator": "vram_residency.service.executors.example_model",
            "seed": str(seed),
            "weights": "random (untrained): generated tokens are noise",
        }
    }
    offset = 0
    for name, shape in shapes.items():
        n = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-aligned, as safetensors writes it
    base = 8 + len(head)
    image = bytearray(base + offset)
    image[:8] = struct.pack("<Q", len(head))
    image[8:base] = head
    scale_out = _INIT_STD / float(np.sqrt(2 * config.num_layers))
    pos = base
    for index, (name, shape) in enumerate(shapes.items()):
        count = int(np.prod(shape))
        arr = np.frombuffer(image, dtype="<f4", count=count, offset=pos).reshape(shape)
        pos += 4 * count
        if name.endswith("layernorm.weight") or name == "norm.weight":
            arr[...] = 1.0
            continue
        np.random.default_rng([seed, index]).standard_normal(shape, dtype=np.float32, out=arr)
        arr *= np.float32(scale_out if name.endswith(("o_proj.weight", "down_proj.weight")) else _INIT_STD)
        if name == "lm_head.weight":
            arr[EOS_ID] = 0.0
    return image


def seed_note(preset: str) -> str:
    return f"weights drawn from numpy default_rng([{SEED}, tensor index]), preset {preset!r}"


def _read_at(fd: int, offset: int, n: int) -> bytes:
    parts: list[bytes] = []
    while n > 0 and (chunk := os.pread(fd, n, offset)):
        parts.append(chunk)
        offset += len(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _check_written_model(fd: int, config: ByteLMConfig) -> None:
    """Read the header of the weights file just written back from ``fd`` and check it with the
    strict parser that sealing and the executors use, and against the tensors of ``config``.

    The generator writes its header by hand; this is what keeps it from ever putting a file in
    place that the worker would then refuse to seal or to run."""
    what = "generated example model"
    size = os.fstat(fd).st_size
    header_end = safetensors_header_size(_read_at(fd, 0, 8), size, what)
    header = parse_safetensors_header(_read_at(fd, 0, header_end), size, what)
    found = [(e.name, e.dtype, e.shape) for e in header.entries]
    expected = [(name, "F32", shape) for name, shape in config.tensor_shapes().items()]
    if found != expected:
        # Only a bug in file_image gets here: the preset is what the header was written from.
        raise ConfigError(f"{what}: its header lists other tensors than the preset describes")


def _write_atomic(path: Path, data: bytes | bytearray, check: Callable[[int], None] | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed over it; ``check`` (given the
    temporary file's descriptor, after the fsync) may refuse what was written before the rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            if check is not None:
                check(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)  # the rename itself survives a crash
    finally:
        os.close(dfd)


def _sha256_of(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except FileNotFoundError:
        return None
    return h.hexdigest()


def ensure_example(directory: Path, preset: str, algorithm: str) -> GeneratedModel:
    """Make ``directory`` hold exactly the generated files of ``preset``; rewrite what differs."""
    if preset not in PRESETS:
        raise InvalidInput(f"unknown example model preset {preset!r} (one of {', '.join(PRESETS)})")
    config = PRESETS[preset]
    # Each level made private (mkdir's parents=True would leave the upper ones at the umask).
    for d in reversed((directory, *directory.parents[:2])):
        d.mkdir(exist_ok=True, mode=0o700)
    if directory.is_symlink() or not directory.is_dir():
        raise InvalidInput(f"{directory} is not a plain directory")
    written = False
    # "untrained" makes the executor say so in its description (/worker/ready, serve's output).
    meta = {**config.to_json(), "untrained": True, "seed": seed_note(preset)}
    config_bytes = (json.dumps(meta, indent=2) + "\n").encode()
    if (directory / "config.json").is_file() and (directory / "config.json").read_bytes() == config_bytes:
        pass
    else:
        _write_atomic(directory / "config.json", config_bytes)
        written = True
    image = file_image(config)
    sha = hashlib.sha256(image).hexdigest()
    weights = directory / "model.safetensors"
    if weights.is_symlink() or _sha256_of(weights) != sha:
        with contextlib.suppress(FileNotFoundError):
            if weights.is_symlink():
                weights.unlink()
        _write_atomic(weights, image, check=lambda fd: _check_written_model(fd, config))
        written = True
    return GeneratedModel(directory, sha, digest(image, algorithm).hex(), algorithm, written)


def example_provider(directory: Path, preset: str, algorithm: str) -> Callable[[], GeneratedModel]:
    """A once-per-process generator for the model catalog: the first call checks or writes the
    files (under a lock: plan and commit may ask at the same time), later calls reuse that result
    (the commit's digest check still catches a file changed since)."""
    lock = threading.Lock()
    done: list[GeneratedModel] = []

    def provide() -> GeneratedModel:
        with lock:
            if not done:
                done.append(ensure_example(directory, preset, algorithm))
            return done[0]

    return provide
