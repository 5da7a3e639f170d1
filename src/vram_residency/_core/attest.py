"""The worker's side of ``attest-v1``: recompute every shard's digest (and, asked for, its probe)
from device memory for an orchestrator's nonce, and tag the statement under KA.

One batched pass (``digest_many``) covers every shard: the seal-algorithm digests and, with the
probe, the BLAKE3 keyed-mode segments (key ``KP``), one synchronization at the end. A mismatch is
a failed verification: it is audited as such and raised (``AttestationMismatch``, a
``SealVerificationFailed``) so that every caller stops the worker the same way, carrying the
tagged statement (verdict ``mismatch``) that still tells the orchestrator which shard failed.
"""

from __future__ import annotations

import contextlib
import hmac
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from vram_residency._core.store import ShardStore, changed_units, merge_ranges
from vram_residency._core.types import ShardRecord
from vram_residency.audit.events import ATTESTATION_ISSUED, SEAL_VERIFICATION_FAILED
from vram_residency.backends.base import Segment
from vram_residency.errors import (
    AttestationMismatch,
    InvalidInput,
    NotSealed,
    SealVerificationFailed,
    ShardFailure,
    StaleSeal,
)
from vram_residency.formats.attest import (
    AttestedShard,
    Statement,
    attest_tag,
    check_nonce,
    probe_key,
    statement_to_json,
)
from vram_residency.formats.keys import SecretKey
from vram_residency.shard import SealedShard

__all__ = ["attest_shards", "check_seal_age"]


def _records(store: ShardStore, shards: Sequence[SealedShard | str] | None) -> list[ShardRecord]:
    held = {s.shard_id: s for s in store.shards()}
    if shards is None:
        return [store.lookup(s) for s in held.values()]
    # Not iterable at all (an int, a bool) would be a TypeError from the loop below; bytes
    # would iterate as ints.
    if isinstance(shards, (str, bytes, bytearray, SealedShard)) or not isinstance(shards, Iterable):
        raise InvalidInput("shards must be a sequence of shards or shard ids")
    out: list[ShardRecord] = []
    for s in shards:
        sid = s.shard_id if isinstance(s, SealedShard) else s
        if not isinstance(sid, str):
            raise InvalidInput(f"expected a SealedShard or shard id, not {type(s).__name__}")
        if sid not in held:
            raise NotSealed(f"shard {sid!r} is not sealed by this manager")
        record = store.lookup(held[sid])
        if isinstance(s, SealedShard) and not hmac.compare_digest(s.tag, record.tag):
            raise InvalidInput(f"shard {sid!r} does not carry this manager's seal")
        if any(r is record for r in out):
            raise InvalidInput(f"shard {sid!r} is listed twice")
        out.append(record)
    return out


def attest_shards(
    store: ShardStore,
    ka: SecretKey,
    nonce: bytes,
    shards: Sequence[SealedShard | str] | None = None,
    probe: bool = False,
) -> dict[str, Any]:
    """See ``VramManager.attest``."""
    nonce = check_nonce(nonce)
    if not isinstance(probe, bool):
        raise InvalidInput("probe must be a bool")
    records = _records(store, shards)
    # Locks in one global order (by shard id), as verify_many takes them.
    with contextlib.ExitStack() as stack:
        for r in sorted(records, key=lambda r: r.shard.shard_id):
            stack.enter_context(r.lock)
        return _attest_held(store, ka, nonce, records, probe)


def _attest_held(
    store: ShardStore, ka: SecretKey, nonce: bytes, records: list[ShardRecord], probe: bool
) -> dict[str, Any]:
    for r in records:
        if r.buf.closed:
            raise NotSealed(f"shard {r.shard.shard_id!r} was deallocated")
        if not store.tag_matches(r.shard, r):
            store.emit(
                SEAL_VERIFICATION_FAILED, critical=True, shard_id=r.shard.shard_id, reason="tag mismatch",
                expected_digest=r.shard.digest, actual_digest="", corrupted_ranges=[],
            )  # fmt: skip
            raise SealVerificationFailed(
                f"seal tag of shard {r.shard.shard_id} does not match its fields",
                shard_id=r.shard.shard_id,
                tag_valid=False,
            )
    backend = store.backend
    kp = probe_key(ka, nonce) if probe else None
    # An nh-fast-v1 seal's digest_now is keyed by the shard's key (formats.nhfast.shard_key of
    # the token's nh-fast key and the shard id): the orchestrator, holding the token and the
    # statement's shard ids, recomputes it from the file.
    segments = [store.segment(r) for r in records]
    start = time.perf_counter_ns()
    # Every recomputation of the batch finishes at its one synchronization: each shard's
    # verified_at_ns is the batch's end.
    digests = backend.digest_many(segments) if segments else []
    if kp is not None and records:
        # The probes as a second table, not mixed into the first: on an H200 one mixed table of
        # a 16 GiB shard's sha256-tree-v1 digest and its keyed-BLAKE3 probe took 36.9 ms, against
        # 20.5 ms + 9.7 ms for the two alone (bench/results/attest-gpu-2026-11-29-*.json).
        probes = [Segment(r.buf, r.shard.vram_bytes, "blake3", key=kp) for r in records]
        digests = digests + backend.digest_many(probes)
    done_ns = time.time_ns()
    elapsed_ns = time.perf_counter_ns() - start
    n = len(records)
    rows: list[AttestedShard] = []
    failed: list[ShardRecord] = []
    for i, r in enumerate(records):
        if not hmac.compare_digest(digests[i].hex(), r.shard.digest):
            failed.append(r)
        rows.append(
            AttestedShard(
                shard_id=r.shard.shard_id,
                seal_signature=r.tag,
                digest_now=digests[i],
                probe=digests[n + i] if kp is not None else None,
                verified_at_ns=done_ns,
            )
        )
    statement = Statement(
        nonce=nonce,
        worker_id=store.worker_id,
        attested_at_ns=done_ns,
        shards=tuple(rows),
        verdict="mismatch" if failed else "ok",
    )
    doc = statement_to_json(statement, attest_tag(ka, statement))
    if not failed:
        for r in records:
            r.last_verified_ns = done_ns
            r.last_full_ns = done_ns  # digest_now is the seal's own digest: a full check
    failures: list[ShardFailure] = []
    if failed:
        results = backend.hash_many([store.segment(r) for r in failed])
        for r, result in zip(failed, results, strict=True):
            ranges = merge_ranges(changed_units(r.unit_digests, result.unit_digests), r.shard.vram_bytes)
            f = ShardFailure(
                r.shard.shard_id,
                r.shard.digest,
                result.digest.hex(),
                tuple(ranges),
                tuple(r.tensors_in(ranges)),
            )
            failures.append(f)
            store.emit(
                SEAL_VERIFICATION_FAILED, critical=True, shard_id=f.shard_id,
                reason="digest mismatch (attestation)", expected_digest=f.expected_digest,
                actual_digest=f.actual_digest, corrupted_ranges=[list(x) for x in f.corrupted_ranges],
                corrupted_tensors=list(f.corrupted_tensors),
            )  # fmt: skip
    store.emit(
        ATTESTATION_ISSUED,
        critical=bool(failed),
        nonce=nonce.hex(),
        verdict=statement.verdict,
        shard_ids=[r.shard.shard_id for r in records],
        probe=kp is not None,
        failed_shard_ids=[r.shard.shard_id for r in failed],
        duration_ns=elapsed_ns,
    )
    if failures:
        first = failures[0]
        raise AttestationMismatch(
            "attestation: digest of device memory changed for shard(s) "
            + ", ".join(f.shard_id for f in failures),
            attestation=doc,
            shard_id=first.shard_id,
            expected_digest=first.expected_digest,
            actual_digest=first.actual_digest,
            corrupted_ranges=first.corrupted_ranges,
            corrupted_tensors=first.corrupted_tensors,
            failures=failures,
        )
    return doc


def check_seal_age(
    store: ShardStore,
    max_age_ns: int,
    *,
    policy: Literal["reverify", "refuse"] = "reverify",
    now_ns: int | None = None,
) -> list[str]:
    """See ``VramManager.check_seal_age``."""
    if isinstance(max_age_ns, bool) or not isinstance(max_age_ns, int) or max_age_ns <= 0:
        raise InvalidInput("max_age_ns must be a positive integer")
    if policy not in ("reverify", "refuse"):
        raise InvalidInput("policy must be 'reverify' or 'refuse'")
    if now_ns is not None and (isinstance(now_ns, bool) or not isinstance(now_ns, int) or now_ns < 0):
        raise InvalidInput("now_ns must be a non-negative integer (ns since the epoch) or None")
    now = time.time_ns() if now_ns is None else now_ns
    last = store.last_verified_ns()
    stale = [s for s in store.shards() if now - last.get(s.shard_id, now) > max_age_ns]
    if not stale:
        return []
    if policy == "refuse":
        oldest = max(now - last[s.shard_id] for s in stale)
        raise StaleSeal(
            f"{len(stale)} shard(s) last verified more than {max_age_ns / 1e9:.3f} s ago "
            f"(oldest {oldest / 1e9:.3f} s); verify them first",
            shard_ids=[s.shard_id for s in stale],
            age_ns=oldest,
        )
    store.verify_many(stale)
    return [s.shard_id for s in stale]
