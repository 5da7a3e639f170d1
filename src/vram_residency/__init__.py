"""vram-residency: keep model weights resident in VRAM, sealed, and verified on the GPU.

Usage::

    from vram_residency import VramManager

    with VramManager(worker_token, device=0) as mgr:       # CUDA if present, else host emulation
        shard = mgr.seal_model(weights, model_ref="llama-3-8b@sha256:...")
        mgr.verify_sealed(shard)                           # digest recomputed on the device
        mgr.verify_many(mgr.shards())                      # all of them in one batched pass
        record = shard.record()                            # JSON seal record for the orchestrator

The formats (``sha256-tree-v1``, ``blake3``, ``seal-v1``) are in :mod:`vram_residency.formats`;
errors in :mod:`vram_residency.errors`.
"""

from vram_residency._core import TensorSpan
from vram_residency.backends.base import Capabilities
from vram_residency.errors import (
    ConfigError,
    CudaAllocationFailed,
    InsufficientVram,
    IntegrityViolation,
    InvalidInput,
    NotSealed,
    PolicyViolation,
    SealVerificationFailed,
    ShardFailure,
    UnsupportedOperation,
    VramError,
)
from vram_residency.manager import VramManager
from vram_residency.scrub import Scrubber, verify_before_forward
from vram_residency.shard import SealedShard, check_seal_record
from vram_residency.sources.model import SealedModel, check_model_record
from vram_residency.sources.repair import RepairReport

__version__ = "0.1.0"

__all__ = [
    "Capabilities",
    "ConfigError",
    "CudaAllocationFailed",
    "InsufficientVram",
    "IntegrityViolation",
    "InvalidInput",
    "NotSealed",
    "PolicyViolation",
    "RepairReport",
    "Scrubber",
    "SealVerificationFailed",
    "SealedModel",
    "SealedShard",
    "ShardFailure",
    "TensorSpan",
    "UnsupportedOperation",
    "VramError",
    "VramManager",
    "__version__",
    "check_model_record",
    "check_seal_record",
    "verify_before_forward",
]
