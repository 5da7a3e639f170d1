"""Errors raised by vram-residency.

One flat module of small classes, in the style of ``cryptography.exceptions``. Every error carries
the facts a caller needs as attributes (bytes needed and available, changed ranges); none ever
carries a token, a key, a tag or a device pointer.

Classification follows the starting design: a *retriable* error may succeed if tried again later
(memory may be freed meanwhile); a *fatal* error means the worker can no longer trust its VRAM and
must stop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AttestationMismatch",
    "ConfigError",
    "CudaAllocationFailed",
    "InsufficientVram",
    "IntegrityViolation",
    "InvalidInput",
    "NotSealed",
    "PolicyViolation",
    "SealVerificationFailed",
    "ShardFailure",
    "StaleSeal",
    "UnsupportedOperation",
    "VramError",
]


class VramError(Exception):
    """Base class of every error this library raises on purpose."""

    _retriable = False
    _fatal = False

    @property
    def retriable(self) -> bool:
        """True when the same call may succeed later (for example once memory is freed)."""
        return self._retriable

    @property
    def fatal(self) -> bool:
        """True when the worker must stop: its sealed memory can no longer be trusted."""
        return self._fatal


class InvalidInput(VramError, ValueError):
    """An argument is malformed, out of range or of the wrong type."""


class ConfigError(VramError):
    """The manager or service is misconfigured (bad token, unusable backend, bad settings)."""


class InsufficientVram(VramError):
    """Not enough device memory for the request. Nothing was allocated."""

    _retriable = True

    def __init__(self, needed: int, available: int, message: str | None = None) -> None:
        self.needed = int(needed)
        self.available = int(available)
        super().__init__(
            message or f"insufficient VRAM: {self.needed} bytes needed, {self.available} available"
        )


class CudaAllocationFailed(VramError):
    """The CUDA driver refused an allocation for a reason other than plain capacity."""

    _retriable = True


class NotSealed(VramError):
    """The shard is unknown to this manager, already deallocated, or was never sealed."""


@dataclass(frozen=True, slots=True)
class ShardFailure:
    """One shard that failed verification: what ``SealVerificationFailed`` says about it."""

    shard_id: str
    expected_digest: str = ""
    actual_digest: str = ""
    corrupted_ranges: tuple[tuple[int, int], ...] = ()
    corrupted_tensors: tuple[str, ...] = ()
    tag_valid: bool = True


class SealVerificationFailed(VramError):
    """The seal's tag or the digest of the bytes in device memory does not match.

    ``corrupted_ranges`` lists half-open ``(start, end)`` byte ranges of the shard that changed,
    when the tag was intact and the digest mismatched; it is empty when the tag itself failed.
    ``corrupted_tensors`` names the tensors overlapping those ranges where the shard has a tensor
    index (sealed from a safetensors or GGUF file, or adopted from framework tensors).

    A batched verification (``verify_many``, ``verify_model``) that finds several shards changed
    raises one error: ``failures`` holds every failed shard, in the order they were given, and the
    single-shard attributes above describe the first of them. ``audit_error`` is set (and is the
    ``__cause__``) when writing the failure to the audit log failed as well: the seal failure is
    still the error raised, never replaced by the audit error.
    """

    _fatal = True

    def __init__(
        self,
        message: str,
        *,
        shard_id: str = "",
        expected_digest: str = "",
        actual_digest: str = "",
        corrupted_ranges: Sequence[tuple[int, int]] = (),
        corrupted_tensors: Sequence[str] = (),
        tag_valid: bool = True,
        failures: Sequence[ShardFailure] = (),
    ) -> None:
        self.shard_id = shard_id
        self.expected_digest = expected_digest
        self.actual_digest = actual_digest
        self.corrupted_ranges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in corrupted_ranges]
        self.corrupted_tensors: list[str] = list(corrupted_tensors)
        self.tag_valid = tag_valid
        if not failures and shard_id:
            failures = (
                ShardFailure(
                    shard_id,
                    expected_digest,
                    actual_digest,
                    tuple(self.corrupted_ranges),
                    tuple(self.corrupted_tensors),
                    tag_valid,
                ),
            )
        self.failures: tuple[ShardFailure, ...] = tuple(failures)
        self.audit_error: BaseException | None = None
        super().__init__(message)

    @property
    def shard_ids(self) -> list[str]:
        """Every failed shard's id, in order."""
        return [f.shard_id for f in self.failures]

    @property
    def audit_failed(self) -> bool:
        """True when the audit log could not record this failure (see ``audit_error``)."""
        return self.audit_error is not None


class IntegrityViolation(VramError):
    """Device memory or the manager's own bookkeeping is inconsistent (for example a bounds
    check failed inside the library, or a pointer stopped being device memory)."""

    _fatal = True


class PolicyViolation(VramError):
    """Memory would not be plain, device-resident VRAM (managed, host, or integrated memory)."""

    _fatal = True


class UnsupportedOperation(VramError):
    """This backend cannot do what was asked (for example a device pointer of emulated memory).
    Check ``Backend.capabilities`` first instead of catching it."""


class StaleSeal(VramError):
    """A shard's last successful verification is older than the configured maximum seal age,
    and the policy is to refuse rather than re-verify. Retriable: a verification makes it fresh."""

    _retriable = True

    def __init__(self, message: str, *, shard_ids: Sequence[str] = (), age_ns: int = 0) -> None:
        self.shard_ids = list(shard_ids)
        self.age_ns = age_ns
        super().__init__(message)


class AttestationMismatch(SealVerificationFailed):
    """An attestation found a shard whose digest in device memory no longer matches its seal.

    Raised, like any failed verification, so that every caller stops the worker the same way;
    ``attestation`` is the tagged ``attest-v1`` statement (JSON form, verdict ``mismatch``) that
    still tells the orchestrator, authentically, which shard failed."""

    def __init__(self, message: str, *, attestation: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.attestation: dict[str, Any] = dict(attestation)
