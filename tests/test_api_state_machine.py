"""A model-based (stateful) test of the public library API on the host backend.

Hypothesis drives random sequences of the calls an application makes (``seal_model``,
``seal_file``, ``seal_files``, ``verify_sealed``/``verify_many``/``verify_model``, ``repair``,
``offload``/``restore``, ``migrate`` between two managers, ``deallocate``, ``attest``,
``check_seal_record``, ``close``) over two ``VramManager(backend="host")`` instances with a
small emulated capacity, so that ``InsufficientVram`` is reached often. Beside them it keeps a
plain model of what must be true: which shards are resident, offloaded or gone, on which manager,
and the bytes each one should hold (bit flips through ``vram_residency.testing.flip_bit``
included). Unit tests check each call alone; this finds the orderings nobody wrote down (a
restore after a migrate, a repair of a restored shard, a close with a file offload pending).

Every call's outcome is predicted from the model before it is made: success, or the documented
typed error (``NotSealed`` for a shard that is not resident there, ``InsufficientVram`` when the
rounded allocation does not fit, ``SealVerificationFailed`` naming the changed ranges and tensors,
``InvalidInput`` for a repair without a source). Any other exception fails the test. After every
step the invariants compare the managers with the model: free emulated capacity, the set of
resident and offloaded shards, the offload files on disk, and the bytes in "device" memory
themselves (read through the public ``device_buffer(...).host_view()``), so that a refused
operation that leaked memory or left half a shard behind is caught at once.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
)

from vram_residency import (
    InsufficientVram,
    InvalidInput,
    NotSealed,
    SealedModel,
    SealedShard,
    SealVerificationFailed,
    VramManager,
    check_seal_record,
)
from vram_residency.errors import AttestationMismatch
from vram_residency.sources.layout import HEADER_SPAN
from vram_residency.testing import flip_bit

TOKEN = "state-machine-token-0123456789abcdef"
OTHER_TOKEN = "state-machine-other-token-fedcba987654"
MiB = 1 << 20
UNIT = MiB  # the seal's localization unit (formats.tree.UNIT_SIZE), restated as the spec fixes it
ALIGN = 256  # the host backend rounds every allocation up to 256 bytes (backends.base.ALIGNMENT)
CAPACITY = (4 * MiB, 3 * MiB)  # two emulated devices, small enough that OOM is common
ALGORITHMS = ("sha256-tree-v1", "blake3", "nh-fast-v1")
#: A shard-directed call goes to the manager the shard lives (or lived) on, one time in four to
#: the other one: the NotSealed paths are reached without starving the resident ones.
ELSEWHERE = st.sampled_from((False, False, False, True))
SIZES = (1, 255, 257, 4096, 65_537, MiB - 1, MiB + 7, 2 * MiB + 123)

Where = Literal["resident", "offloaded", "gone"]


def rounded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def changed_ranges(a: bytes | bytearray, b: bytes | bytearray) -> list[tuple[int, int]]:
    """The 1 MiB units where ``a`` and ``b`` differ, as merged half-open byte ranges."""
    n = len(a)
    ranges: list[tuple[int, int]] = []
    for start in range(0, n, UNIT):
        end = min(start + UNIT, n)
        if a[start:end] != b[start:end]:
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
    return ranges


def safetensors_file(seed: int, sizes: list[tuple[str, int]]) -> tuple[bytes, list[tuple[str, int, int]]]:
    """A safetensors file built by hand (8-byte little-endian header length, JSON header, data)
    and the byte span of its header and of each tensor in the file, in file order."""
    header: dict[str, Any] = {}
    off = 0
    for name, n in sizes:
        header[name] = {"dtype": "U8", "shape": [n], "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data_start = 8 + len(text)
    spans = [(HEADER_SPAN, 0, data_start)]
    pos = data_start
    for name, n in sizes:
        spans.append((name, pos, pos + n))
        pos += n
    return struct.pack("<Q", len(text)) + text + payload(seed, off), spans


@dataclass
class ShardState:
    """What the model knows of one shard the API handed out."""

    shard: SealedShard
    manager: int  # index of the manager it lives on (or lived on)
    generation: int  # that manager's generation (a close and reopen makes a new one)
    original: bytes
    current: bytearray
    source: str | None  # the file it was sealed from (repair's default source), else None
    spans: list[tuple[str, int, int]] = field(default_factory=list)
    where: Where = "resident"
    offload_path: Path | None = None

    @property
    def damaged(self) -> bool:
        return self.current != self.original

    def expected_tensors(self, ranges: list[tuple[int, int]]) -> list[str]:
        return [n for n, s, e in self.spans if any(s < re and rs < e for rs, re in ranges)]


class ApiMachine(RuleBasedStateMachine):
    shards = Bundle("shards")
    models = Bundle("models")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="vram-sm-"))
        self.managers = [self._open(0), self._open(1)]
        self.generation = [0, 0]
        self.state: dict[str, ShardState] = {}
        self.model_parts: dict[int, list[str]] = {}
        self.files = 0

    # -- helpers ------------------------------------------------------------------------------
    def _open(self, i: int) -> VramManager:
        return VramManager(TOKEN, i, backend="host", worker_id=f"sm-{i}", capacity_bytes=CAPACITY[i])

    def _new_path(self, suffix: str) -> Path:
        self.files += 1
        return self.tmp / f"f{self.files}{suffix}"

    def _resident(self, i: int) -> list[ShardState]:
        return [
            s for s in self.state.values()
            if s.where == "resident" and s.manager == i and s.generation == self.generation[i]
        ]  # fmt: skip

    def _is_at(self, st_: ShardState, i: int, where: Where) -> bool:
        return st_.where == where and st_.manager == i and st_.generation == self.generation[i]

    def _free(self, i: int) -> int:
        return CAPACITY[i] - sum(rounded(s.shard.vram_bytes) for s in self._resident(i))

    def _track(self, shard: SealedShard, i: int, data: bytes, source: str | None, spans: Any = ()) -> None:
        assert shard.shard_id not in self.state, "a shard id was handed out twice"
        assert shard.gpu_device == i and shard.vram_bytes == len(data)
        self.state[shard.shard_id] = ShardState(
            shard, i, self.generation[i], data, bytearray(data), source, list(spans)
        )

    def _check_failure(self, exc: SealVerificationFailed, damaged: list[ShardState]) -> None:
        """``exc`` names exactly the damaged shards, in order, each with its changed byte ranges
        and the tensors overlapping them."""
        assert exc.tag_valid
        assert exc.shard_ids == [s.shard.shard_id for s in damaged]
        for f, s in zip(exc.failures, damaged, strict=True):
            ranges = changed_ranges(s.original, s.current)
            assert list(f.corrupted_ranges) == ranges, (f.corrupted_ranges, ranges)
            assert list(f.corrupted_tensors) == s.expected_tensors(ranges)
            assert f.expected_digest == s.shard.digest and f.actual_digest != s.shard.digest

    # -- sealing ------------------------------------------------------------------------------
    @rule(
        target=shards,
        m=st.integers(0, 1),
        size=st.sampled_from(SIZES),
        seed=st.integers(0, 2**16),
        algorithm=st.sampled_from(ALGORITHMS),
    )
    def seal_model(self, m: int, size: int, seed: int, algorithm: str) -> Any:
        mgr, data = self.managers[m], payload(seed, size)
        if rounded(size) > self._free(m):
            event("seal_model: InsufficientVram")
            with pytest.raises(InsufficientVram):
                mgr.seal_model(data, digest_algorithm=algorithm)
            return multiple()
        shard = mgr.seal_model(data, model_ref=f"bytes@{seed}", digest_algorithm=algorithm)
        self._track(shard, m, data, None)
        return shard

    @rule(target=shards, m=st.integers(0, 1), size=st.sampled_from(SIZES), seed=st.integers(0, 2**16))
    def seal_raw_file(self, m: int, size: int, seed: int) -> Any:
        path, data = self._new_path(".bin"), payload(seed, size)
        path.write_bytes(data)
        if rounded(size) > self._free(m):
            event("seal_raw_file: InsufficientVram")
            with pytest.raises(InsufficientVram):
                self.managers[m].seal_file(path, format="raw")
            return multiple()
        shard = self.managers[m].seal_file(path, format="raw")
        self._track(shard, m, data, str(path))
        return shard

    @rule(
        target=shards,
        m=st.integers(0, 1),
        seed=st.integers(0, 2**16),
        first=st.sampled_from((1, 4000, MiB + 100)),
        second=st.sampled_from((3, 700_000, MiB)),
    )
    def seal_safetensors(self, m: int, seed: int, first: int, second: int) -> Any:
        data, spans = safetensors_file(seed, [("a.weight", first), ("b.weight", second)])
        path = self._new_path(".safetensors")
        path.write_bytes(data)
        if rounded(len(data)) > self._free(m):
            event("seal_safetensors: InsufficientVram")
            with pytest.raises(InsufficientVram):
                self.managers[m].seal_file(path)
            return multiple()
        shard = self.managers[m].seal_file(path)
        self._track(shard, m, data, str(path), spans)
        return shard

    @rule(
        target=models,
        m=st.integers(0, 1),
        sizes=st.lists(st.sampled_from(SIZES[:6]), min_size=1, max_size=3),
        seed=st.integers(0, 2**16),
    )
    def seal_files(self, m: int, sizes: list[int], seed: int) -> Any:
        paths, blobs = [], []
        for k, size in enumerate(sizes):
            path, data = self._new_path(".bin"), payload(seed + k, size)
            path.write_bytes(data)
            paths.append(path)
            blobs.append(data)
        if sum(rounded(n) for n in sizes) > self._free(m):
            # All or nothing: no part may stay allocated (the invariants check the capacity).
            event("seal_files: InsufficientVram")
            with pytest.raises(InsufficientVram):
                self.managers[m].seal_files(paths, model_name=f"model-{seed}", format="raw")
            return multiple()
        model = self.managers[m].seal_files(paths, model_name=f"model-{seed}", format="raw")
        assert isinstance(model, SealedModel) and len(model.shards) == len(sizes)
        for shard, path, data in zip(model.shards, paths, blobs, strict=True):
            self._track(shard, m, data, str(path))
        self.model_parts[id(model)] = [s.shard_id for s in model.shards]
        return model

    @rule(target=shards, model=models)
    def model_parts_as_shards(self, model: SealedModel) -> Any:
        return multiple(*model.shards)

    # -- damage and verification --------------------------------------------------------------
    @rule(shard=shards, other=ELSEWHERE, where=st.floats(0, 1, exclude_max=True))
    def flip(self, shard: SealedShard, other: bool, where: float) -> None:
        s = self.state[shard.shard_id]
        m = s.manager ^ other
        bit = int(where * 8 * shard.vram_bytes)
        if not self._is_at(s, m, "resident"):
            event("flip: NotSealed")
            with pytest.raises(NotSealed):
                flip_bit(self.managers[m], shard, bit)
            return
        flip_bit(self.managers[m], shard, bit)
        s.current[bit // 8] ^= 1 << (bit % 8)

    @precondition(lambda self: any(s.where == "resident" for s in self.state.values()))
    @rule(data=st.data(), where=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=3))
    def flip_resident(self, data: st.DataObject, where: list[float]) -> None:
        # Most bundle entries are gone after a while: this one damages a shard that is resident
        # now, so that verify, repair, offload and migrate meet damage often enough.
        s = data.draw(st.sampled_from([s for s in self.state.values() if s.where == "resident"]))
        for w in where:
            bit = int(w * 8 * s.shard.vram_bytes)
            flip_bit(self.managers[s.manager], s.shard, bit)
            s.current[bit // 8] ^= 1 << (bit % 8)

    @rule(shard=shards, other=ELSEWHERE)
    def verify_sealed(self, shard: SealedShard, other: bool) -> None:
        s = self.state[shard.shard_id]
        m = s.manager ^ other
        mgr = self.managers[m]
        if not self._is_at(s, m, "resident"):
            event("verify_sealed: NotSealed")
            with pytest.raises(NotSealed):
                mgr.verify_sealed(shard)
        elif s.damaged:
            event("verify_sealed: SealVerificationFailed")
            with pytest.raises(SealVerificationFailed) as exc:
                mgr.verify_sealed(shard)
            self._check_failure(exc.value, [s])
        else:
            mgr.verify_sealed(shard)

    @rule(m=st.integers(0, 1), data=st.data())
    def verify_many(self, m: int, data: st.DataObject) -> None:
        resident = self._resident(m)
        if not resident:
            self.managers[m].verify_many([])
            return
        batch = data.draw(
            st.lists(st.sampled_from(resident), min_size=1, unique_by=lambda s: s.shard.shard_id)
        )
        damaged = [s for s in batch if s.damaged]
        if damaged:
            event("verify_many: SealVerificationFailed")
            with pytest.raises(SealVerificationFailed) as exc:
                self.managers[m].verify_many([s.shard for s in batch])
            self._check_failure(exc.value, damaged)
        else:
            self.managers[m].verify_many([s.shard for s in batch])

    @rule(model=models, m=st.integers(0, 1))
    def verify_model(self, model: SealedModel, m: int) -> None:
        parts = [self.state[sid] for sid in self.model_parts[id(model)]]
        mgr = self.managers[m]
        if not all(self._is_at(p, m, "resident") for p in parts):
            event("verify_model: NotSealed")
            with pytest.raises(NotSealed):
                mgr.verify_model(model)
        elif any(p.damaged for p in parts):
            event("verify_model: SealVerificationFailed")
            with pytest.raises(SealVerificationFailed) as exc:
                mgr.verify_model(model)
            self._check_failure(exc.value, [p for p in parts if p.damaged])
        else:
            event("verify_model: passed")
            mgr.verify_model(model)

    @rule(m=st.integers(0, 1), nonce=st.binary(min_size=16, max_size=64))
    def attest(self, m: int, nonce: bytes) -> None:
        resident = self._resident(m)
        damaged = [s for s in resident if s.damaged]
        mgr = self.managers[m]
        if damaged:
            event("attest: AttestationMismatch")
            with pytest.raises(AttestationMismatch) as exc:
                mgr.attest(nonce)
            statement = exc.value.attestation
            assert statement["verdict"] == "mismatch"
            assert {f.shard_id for f in exc.value.failures} == {s.shard.shard_id for s in damaged}
        else:
            statement = mgr.attest(nonce)
            assert statement["verdict"] == "ok"
        assert statement["nonce"] == nonce.hex()
        assert {x["shard_id"] for x in statement["shards"]} == {s.shard.shard_id for s in resident}

    @rule(shard=shards, other=ELSEWHERE, nonce=st.binary(min_size=16, max_size=64), by_id=st.booleans())
    def attest_one(self, shard: SealedShard, other: bool, nonce: bytes, by_id: bool) -> None:
        s = self.state[shard.shard_id]
        m = s.manager ^ other
        mgr = self.managers[m]
        named: SealedShard | str = shard.shard_id if by_id else shard
        if not self._is_at(s, m, "resident"):
            event("attest_one: NotSealed")
            with pytest.raises(NotSealed):
                mgr.attest(nonce, [named])
            return
        if s.damaged:
            with pytest.raises(AttestationMismatch) as exc:
                mgr.attest(nonce, [named])
            self._check_failure(exc.value, [s])
            return
        statement = mgr.attest(nonce, [named], probe=True)
        assert statement["verdict"] == "ok"
        assert [x["shard_id"] for x in statement["shards"]] == [shard.shard_id]

    @rule(shard=shards, as_text=st.booleans())
    def check_record(self, shard: SealedShard, as_text: bool) -> None:
        # A record stays checkable whatever happened to the shard since: it is the seal, not
        # the memory (an orchestrator may hold it long after a migrate or deallocate).
        record = shard.record()
        given: Any = json.dumps(record) if as_text else record
        assert check_seal_record(given, TOKEN) == shard
        with pytest.raises(SealVerificationFailed):
            check_seal_record(given, OTHER_TOKEN)

    # -- repair, moves, release ---------------------------------------------------------------
    @rule(shard=shards, other=ELSEWHERE, pass_bytes=st.booleans())
    def repair(self, shard: SealedShard, other: bool, pass_bytes: bool) -> None:
        s = self.state[shard.shard_id]
        self._repair(s, s.manager ^ other, pass_bytes)

    @precondition(lambda self: any(s.where == "resident" and s.damaged for s in self.state.values()))
    @rule(data=st.data(), pass_bytes=st.booleans())
    def repair_damaged(self, data: st.DataObject, pass_bytes: bool) -> None:
        damaged = [s for s in self.state.values() if s.where == "resident" and s.damaged]
        s = data.draw(st.sampled_from(damaged))
        self._repair(s, s.manager, pass_bytes)

    def _repair(self, s: ShardState, m: int, pass_bytes: bool) -> None:
        shard = s.shard
        mgr = self.managers[m]
        source = s.original if pass_bytes else None
        if not self._is_at(s, m, "resident"):
            event("repair: NotSealed")
            with pytest.raises(NotSealed):
                mgr.repair(shard, source)
            return
        if not s.damaged:
            report = mgr.repair(shard, source)
            assert report.repaired_ranges == () and report.repaired_units == 0
            return
        if source is None and s.source is None:
            event("repair: InvalidInput")
            with pytest.raises(InvalidInput):
                mgr.repair(shard)
            return
        ranges = changed_ranges(s.original, s.current)
        event("repair: repaired")
        report = mgr.repair(shard, source)
        assert list(report.repaired_ranges) == ranges and report.shard_id == shard.shard_id
        s.current[:] = s.original
        mgr.verify_sealed(shard)

    @rule(shard=shards, other=ELSEWHERE, to_file=st.booleans())
    def offload(self, shard: SealedShard, other: bool, to_file: bool) -> None:
        s = self.state[shard.shard_id]
        m = s.manager ^ other
        mgr = self.managers[m]
        path = self._new_path(".offload") if to_file else None
        to: Literal["host", "file"] = "file" if to_file else "host"
        if not self._is_at(s, m, "resident"):
            event("offload: NotSealed")
            with pytest.raises(NotSealed):
                mgr.offload(shard, to, path)
            assert path is None or not path.exists()
            return
        if s.damaged:
            # The copy is proven against the seal before the VRAM goes: a damaged shard stays.
            event("offload: SealVerificationFailed")
            with pytest.raises(SealVerificationFailed) as exc:
                mgr.offload(shard, to, path)
            self._check_failure(exc.value, [s])
            assert path is None or not path.exists()
            return
        event(f"offload: to {to}")
        mgr.offload(shard, to, path)
        s.where, s.offload_path = "offloaded", path

    @rule(shard=shards, other=ELSEWHERE)
    def restore(self, shard: SealedShard, other: bool) -> None:
        s = self.state[shard.shard_id]
        m = s.manager ^ other
        mgr = self.managers[m]
        if not self._is_at(s, m, "offloaded"):
            event("restore: NotSealed")
            with pytest.raises(NotSealed):
                mgr.restore(shard)
            return
        if rounded(shard.vram_bytes) > self._free(m):
            event("restore: InsufficientVram")
            with pytest.raises(InsufficientVram):
                mgr.restore(shard)
            return
        event("restore: restored")
        assert mgr.restore(shard) == 0
        s.where = "resident"
        # Files are discarded at once ("callers see the file gone when restore returns").
        assert s.offload_path is None or not s.offload_path.exists()
        s.offload_path = None
        mgr.verify_sealed(shard)

    @rule(target=shards, shard=shards, other=ELSEWHERE)
    def migrate(self, shard: SealedShard, other: bool) -> Any:
        s = self.state[shard.shard_id]
        m = s.manager ^ other
        src, dst = self.managers[m], self.managers[1 - m]
        if not self._is_at(s, m, "resident"):
            event("migrate: NotSealed")
            with pytest.raises(NotSealed):
                src.migrate(shard, dst)
            return multiple()
        if rounded(shard.vram_bytes) > self._free(1 - m):
            event("migrate: InsufficientVram")
            with pytest.raises(InsufficientVram):
                src.migrate(shard, dst)
            return multiple()
        if s.damaged:
            event("migrate: SealVerificationFailed")
            with pytest.raises(SealVerificationFailed) as exc:
                src.migrate(shard, dst)
            self._check_failure(exc.value, [s])
            return multiple()
        event("migrate: migrated")
        new = src.migrate(shard, dst)
        assert new.shard_id != shard.shard_id and new.digest_algorithm == shard.digest_algorithm
        assert (new.model_ref, new.shard_index, new.total_shards) == (
            shard.model_ref, shard.shard_index, shard.total_shards,
        )  # fmt: skip
        if shard.digest_algorithm != "nh-fast-v1":  # keyed per shard id: a new id, a new digest
            assert new.digest == shard.digest
        s.where = "gone"
        self._track(new, 1 - m, s.original, s.source, s.spans)
        return new

    @rule(shard=shards, other=ELSEWHERE)
    def deallocate(self, shard: SealedShard, other: bool) -> None:
        s = self.state[shard.shard_id]
        m = s.manager ^ other
        mgr = self.managers[m]
        if not self._is_at(s, m, "resident"):
            event("deallocate: NotSealed")
            with pytest.raises(NotSealed):
                mgr.deallocate(shard)
            return
        event("deallocate: freed")
        mgr.deallocate(shard)
        s.where = "gone"

    @precondition(lambda self: any(s.where != "gone" for s in self.state.values()))
    @rule(m=st.integers(0, 1), now=st.integers(0, 5))
    def close_and_reopen(self, m: int, now: int) -> None:
        if now:  # one time in six: a close wipes a manager's state, which the other rules build up
            return
        event("close_and_reopen")
        old = self.managers[m]
        held = [s for s in self.state.values() if s.manager == m and s.generation == self.generation[m]]
        with old:  # the context manager closes it
            pass
        old.close()  # idempotent
        for s in held:
            if s.where == "offloaded" and s.offload_path is not None:
                assert not s.offload_path.exists(), "close left an offloaded copy on disk"
            s.where = "gone"
        with pytest.raises(NotSealed):
            old.available_vram()
        with pytest.raises(NotSealed):
            old.seal_model(b"x")
        for s in held[:3]:
            with pytest.raises(NotSealed):
                old.verify_sealed(s.shard)
        self.managers[m] = self._open(m)
        self.generation[m] += 1

    # -- invariants ---------------------------------------------------------------------------
    @invariant()
    def capacity_matches_the_resident_shards(self) -> None:
        for i, mgr in enumerate(self.managers):
            assert mgr.available_vram() == self._free(i), f"manager {i} leaked or lost capacity"
            assert mgr.total_vram() == CAPACITY[i]

    @invariant()
    def shard_sets_match(self) -> None:
        for i, mgr in enumerate(self.managers):
            want = {s.shard.shard_id for s in self._resident(i)}
            assert {s.shard_id for s in mgr.shards()} == want
            offloaded = {s.shard.shard_id for s in self.state.values() if self._is_at(s, i, "offloaded")}
            assert {s.shard_id for s in mgr.offloaded_shards()} == offloaded
        for s in self.state.values():
            if s.offload_path is not None and s.where == "offloaded":
                assert s.offload_path.exists()

    @invariant()
    def device_bytes_match(self) -> None:
        # What is in "device" memory is exactly what the model says: sealed bytes plus the
        # flips made since. A refused repair, restore or migrate must not have written anything.
        for i, mgr in enumerate(self.managers):
            for s in self._resident(i):
                view = mgr.device_buffer(s.shard).host_view()
                try:
                    assert view.nbytes >= s.shard.vram_bytes
                    assert view[: s.shard.vram_bytes] == s.current
                finally:
                    view.release()

    def teardown(self) -> None:
        try:
            for i, mgr in enumerate(self.managers):
                if mgr.store.closed:
                    continue
                for s in self._resident(i):
                    mgr.deallocate(s.shard)
                assert mgr.available_vram() == CAPACITY[i], "capacity not back to its baseline"
                assert mgr.shards() == []
                mgr.close()
            for s in self.state.values():
                if s.offload_path is not None:
                    assert not s.offload_path.exists(), "an offload file outlived its manager"
        finally:
            for mgr in self.managers:
                mgr.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


# About 10 s on a shared 2-core machine. No project-wide hypothesis profile exists (the other
# property tests set their own settings), so none is loaded here; a failure prints its seed and
# the shrunk sequence of calls, which reproduce it.
ApiMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestApiStateMachine = ApiMachine.TestCase
