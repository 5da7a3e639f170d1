"""vram-residency: keep model weights resident in VRAM, sealed, and verified on the GPU.

Usage::

    from vram_residency import VramManager

    with VramManager(worker_token, device=0) as mgr:       # CUDA if present, else host emulation
        shard = mgr.seal_model(weights, model_ref="llama-3-8b@sha256:...")
        mgr.verify_sealed(shard)                           # digest recomputed on the device
        record = shard.record()                            # JSON seal record for the orchestrator

The formats (``sha256-tree-v1``, ``blake3``, ``seal-v1``) are in :mod:`vram_residency.formats`;
errors in :mod:`vram_residency.errors`.
"""

from vram_residency._core import TensorSpan
from vram_residency.errors import (
    ConfigError,
    CudaAllocationFailed,
    InsufficientVram,
    IntegrityViolation,
    InvalidInput,
    NotSealed,
    PolicyViolation,
    SealVerificationFailed,
    VramError,
)
from vram_residency.manager import VramManager
from vram_residency.shard import SealedShard, check_seal_record

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CudaAllocationFailed",
    "InsufficientVram",
    "IntegrityViolation",
    "InvalidInput",
    "NotSealed",
    "PolicyViolation",
    "SealVerificationFailed",
    "SealedShard",
    "TensorSpan",
    "VramError",
    "VramManager",
    "__version__",
    "check_seal_record",
]
