"""Seal a safetensors file, catch a flipped bit by tensor name, and repair it from the file.

    python examples/seal_safetensors.py [FILE.safetensors]

Without an argument it writes a small model file of its own first. Runs on the best backend
present (CUDA when a GPU is usable, else the host emulation, which it says).
"""

from __future__ import annotations

import secrets
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from vram_residency import SealVerificationFailed, VramManager
from vram_residency.testing import flip_bit


def sample_model(directory: Path) -> Path:
    rng = np.random.default_rng(0)
    path = directory / "model.safetensors"
    save_file(
        {
            "embed.weight": rng.standard_normal((4096, 256), dtype=np.float32),
            "layer.0.weight": rng.standard_normal((256, 256), dtype=np.float32),
            "layer.0.bias": rng.standard_normal(256, dtype=np.float32),
        },
        str(path),
    )
    return path


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(argv[0]) if argv else sample_model(Path(tmp))
        token = secrets.token_urlsafe(32)  # a real worker reads its token from a 0600 file
        with VramManager(token, worker_id="example") as mgr:
            print("backend:", mgr.backend_description)
            shard = mgr.seal_file(path)
            print(f"sealed {path.name}: {shard.vram_bytes} bytes, {shard.digest_algorithm} {shard.digest}")
            mgr.verify_sealed(shard)
            print("verified")

            flip_bit(mgr, shard, 8 * (2 << 20) + 6)  # inside embed.weight (MiB 2 of the file)
            try:
                mgr.verify_sealed(shard)
            except SealVerificationFailed as exc:
                # Localization is per 1 MiB unit: the tensors named are those overlapping a changed unit.
                print("detected: changed bytes", exc.corrupted_ranges, "in tensors", exc.corrupted_tensors)
            else:
                print("the flip was NOT detected")
                return 1

            report = mgr.repair(shard, path)
            print(f"repaired {report.repaired_bytes} bytes from {path.name}")
            mgr.verify_sealed(shard)  # the original seal holds again
            print("verified with the original seal")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
