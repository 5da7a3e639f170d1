"""Issue one verify (digest) per algorithm and shard size, for a profiler (Nsight Compute).

    ncu --clock-control none --kernel-name regex:units --metrics ... \\
        python3 bench/profile_kernels.py --size-mib 1024 16384

Nothing is timed here: the profiler replays each kernel and reads the hardware counters itself
(issue slots, pipe utilisation, occupancy, clocks), which is what says what bounds the digest
kernels. A warm-up round compiles the kernels first; every digest is checked against the warm-up's.
scripts/gpu-check runs it under ncu when ncu is installed.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from vram_residency.backends.cuda import open_backend
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, nargs="+", default=[1024])
    ap.add_argument("--device", type=int, default=0)
    args = ap.parse_args()
    backend = open_backend(args.device)
    try:
        backend.warm_up()
        rng = np.random.default_rng(1)
        block = rng.integers(0, 256, size=256 << 20, dtype=np.uint8).tobytes()
        for mib in args.size_mib:
            size = mib << 20
            buf = backend.allocate(size)
            try:
                for off in range(0, size, len(block)):
                    buf.write(off, block[: min(len(block), size - off)])
                for alg in (SHA256_TREE_V1, BLAKE3):
                    want = backend.digest(buf, alg)  # warm-up: grows the scratch buffer
                    if backend.digest(buf, alg) != want:
                        print(f"{alg} {mib} MiB: digests differ between two runs", file=sys.stderr)
                        return 1
                    print(f"{alg} {mib} MiB: {backend.last_units_kernel}", flush=True)
            finally:
                buf.close()
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
