"""Pure formats: the ``sha256-tree-v1`` and ``blake3`` digests, the ``seal-v1`` tag, and keys.

No I/O and no CUDA here: an orchestrator can import this layer alone to check seal records.
"""

from vram_residency.formats._fields import check_utf8
from vram_residency.formats._fields import field as encode_field
from vram_residency.formats.keys import AUDIT_KEY_INFO, SEAL_KEY_INFO, SecretKey, derive_key
from vram_residency.formats.seal import SealFields, seal_key, seal_message, seal_tag, verify_tag
from vram_residency.formats.tree import (
    ALGORITHMS,
    BLAKE3,
    LEAF_SIZE,
    SHA256_TREE_V1,
    UNIT_SIZE,
    HashResult,
    digest,
    hash_units,
)

__all__ = [
    "ALGORITHMS",
    "AUDIT_KEY_INFO",
    "BLAKE3",
    "LEAF_SIZE",
    "SEAL_KEY_INFO",
    "SHA256_TREE_V1",
    "UNIT_SIZE",
    "HashResult",
    "SealFields",
    "SecretKey",
    "check_utf8",
    "derive_key",
    "digest",
    "encode_field",
    "hash_units",
    "seal_key",
    "seal_message",
    "seal_tag",
    "verify_tag",
]
