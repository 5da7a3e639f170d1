"""The seal core: the one place that allocates, seals, looks up, verifies and audits shards.

Its package-level API is what the rest of the library uses (``VramManager`` is its public face;
``sources``, ``testing`` and the service call it): nothing outside this package imports its
modules directly, and nothing anywhere reads another module's underscore-private names.
"""

from vram_residency._core.attest import attest_shards, check_seal_age
from vram_residency._core.backend_select import BackendName, open_backend
from vram_residency._core.store import CHECKS, SEAL_FAILED, Check, ShardStore, changed_units, merge_ranges
from vram_residency._core.types import DEFAULT_MAX_TENSORS, AuditSink, ShardRecord, TensorSpan

__all__ = [
    "CHECKS",
    "DEFAULT_MAX_TENSORS",
    "SEAL_FAILED",
    "AuditSink",
    "BackendName",
    "Check",
    "ShardRecord",
    "ShardStore",
    "TensorSpan",
    "attest_shards",
    "changed_units",
    "check_seal_age",
    "merge_ranges",
    "open_backend",
]
