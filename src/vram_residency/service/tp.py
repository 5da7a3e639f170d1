"""The worker as a tensor-parallel group: one process per rank, rank 0 serves the API.

Launch with torchrun (or anything that sets its environment: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)::

    torchrun --nproc-per-node 2 -m vram_residency.cli.main serve --tp-timeout 30

Every rank runs ``serve`` with the same options. Rank 0 binds the HTTP port and runs the usual
worker (a :class:`TPWorker`); ranks 1..N-1 bind nothing and run :func:`run_follower`, a loop that
executes what rank 0 sends. Each rank has its own ``VramManager`` on device ``LOCAL_RANK`` (CUDA;
NCCL for the decoder's all-reduces) or on the host backend (gloo), and its own audit log
(``STATE_DIR/audit-rank<k>.jsonl``; rank 0 keeps the usual one).

Commands travel from rank 0 over a gloo group created with the timeout: each is one variable-size
all_gather (every rank takes part, so a rank that died or hangs makes it fail within the timeout,
on every rank). When idle, rank 0 sends a ``noop`` every quarter of the timeout: a lost rank is
noticed within about one timeout even with no traffic, and the other ranks notice a lost rank 0
the same way. The commands:

* ``commit``: rank 0 splits the byte-level decoder (``split_byte_lm``) into one part per rank in
  ``STATE_DIR/tp-parts/`` (one host, or a state directory every host shares) and sends each part's
  path and digest; every rank seals its part (the digest must match), the ranks agree that all of
  them did, bind the parts into one ``tp-record-v1`` record (``TPModel.seal``) and verify once;
* ``verify``: ``TPModel.verify`` on every rank: one verdict; on a failure every rank is Stopped and
  every rank's incident names the failing rank (rank 0 answers ``SEAL_VERIFICATION_FAILED``);
* ``execute``: ``TPByteLM.generate`` on every rank over its verified part in place (one
  all-reduce per block); rank 0 streams the tokens;
* ``free``, ``stop``, ``noop``.

Anything that fails to reach every rank within the timeout is a :class:`RankUnresponsive`
incident: rank 0 moves to Stopped (and keeps answering HTTP: errors, never a hang).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

from vram_residency._core import DEFAULT_MAX_TENSORS, Check
from vram_residency.distributed import (
    RankUnresponsive,
    TPByteLM,
    TPIncident,
    TPModel,
    TPVerificationFailed,
    split_byte_lm,
)
from vram_residency.errors import ConfigError, InvalidInput, NotSealed, VramError
from vram_residency.formats.tree import digest
from vram_residency.manager import BackendName, VramManager
from vram_residency.service.commit import DigestCheck
from vram_residency.service.errors import ModelLoadFailed
from vram_residency.service.executor import JobInput, JobOutput, ModelFiles, Sampling, Token, TokenSink
from vram_residency.service.executors.decoder import (
    MODEL_TYPE,
    ByteLMConfig,
    byte_prompt,
)
from vram_residency.service.worker import CommitSpec, CommittedModel, VerifyPass, Worker, WorkerConfig
from vram_residency.shard import SealedShard

if TYPE_CHECKING:
    from vram_residency.audit.log import AuditLog
    from vram_residency.service.catalog import ModelCatalog

__all__ = [
    "TEST_FLIP_ENV",
    "TPEnv",
    "TPExecutor",
    "TPGroup",
    "TPLeader",
    "TPWorker",
    "init_group",
    "run_follower",
    "tp_env",
]

log = logging.getLogger("vram_residency.service.tp")

#: TEST ONLY, off unless set: a directory where a file ``flip-rank<k>`` holding a bit index makes
#: rank k (k >= 1) flip that bit of its sealed part before its next command, then delete the file.
#: It exists so that the tests can corrupt a follower's memory from outside the process; nothing
#: reads it unless the variable is set.
TEST_FLIP_ENV: Final = "VRAM_RESIDENCY_TEST_FLIP_DIR"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


# -- the group -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TPEnv:
    """This process's place in the group, from torchrun's environment."""

    rank: int
    world: int
    local_rank: int


def tp_env(environ: dict[str, str] | None = None) -> TPEnv | None:
    """The group from torchrun's variables; None when not launched as a group of 2 or more."""
    env = dict(os.environ) if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env["RANK"])
        local = int(env.get("LOCAL_RANK", env["RANK"]))
    except (KeyError, ValueError):
        raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"RANK {rank} / WORLD_SIZE {world} / LOCAL_RANK {local} are inconsistent")
    return None if world == 1 else TPEnv(rank, world, local)


@dataclass(frozen=True, slots=True)
class TPGroup:
    env: TPEnv
    #: gloo, with the timeout: the commands (and, on CPUs, the decoder's all-reduces).
    command: Any
    #: Where the decoder's all-reduces run: the command group (gloo) or an NCCL group.
    decoder: Any
    timeout_s: float
    backend: BackendName


def init_group(env: TPEnv, backend: BackendName, timeout_s: float) -> TPGroup:
    """``init_process_group`` from torchrun's environment, then the groups every rank makes in the
    same order. ``backend``: "cuda" (NCCL for the decoder) or "host" (gloo)."""
    import torch
    import torch.distributed as dist

    if not timeout_s > 0:
        raise ConfigError("--tp-timeout must be above 0")
    cuda = backend == "cuda"
    if cuda:
        torch.cuda.set_device(env.local_rank)
    # The rendezvous waits for every rank to start (each imports torch): longer than a command.
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if cuda else "gloo",
        init_method="env://",
        rank=env.rank,
        world_size=env.world,
        timeout=timedelta(seconds=max(timeout_s, 120.0)),
    )
    timeout = timedelta(seconds=timeout_s)
    command = dist.new_group(backend="gloo", timeout=timeout)
    decoder = dist.new_group(backend="nccl", timeout=timeout) if cuda else command
    return TPGroup(env, command, decoder, float(timeout_s), backend)


class _Channel:
    """Variable-size JSON objects, one from every rank, in one exchange (two all_gathers).

    ``report`` (a follower's): fields added to every object this rank sends, so that rank 0
    learns them from every exchange without a collective of its own (its free device memory)."""

    def __init__(
        self, group: Any, timeout_s: float, report: Callable[[], dict[str, Any]] | None = None
    ) -> None:
        self._group = group
        self._timeout = timedelta(seconds=timeout_s)
        self.report = report

    def _fixed(self, payload: bytes) -> list[bytes]:
        import torch
        import torch.distributed as dist

        world = dist.get_world_size(self._group)
        src = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        out = torch.empty(world * len(payload), dtype=torch.uint8)
        # all_gather_single where this torch has it (all_gather_into_tensor is deprecated there).
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        work = gather(out, src, group=self._group, async_op=True)
        if not work.wait(timeout=self._timeout):
            raise TimeoutError("all_gather did not complete in time")
        flat = out.numpy().tobytes()
        n = len(payload)
        return [flat[i * n : (i + 1) * n] for i in range(world)]

    def exchange(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        if self.report is not None:
            obj = {**self.report(), **obj}
        raw = json.dumps(obj, separators=(",", ":")).encode()
        sizes = [int.from_bytes(s, "little") for s in self._fixed(len(raw).to_bytes(8, "little"))]
        padded = self._fixed(raw + bytes(max(sizes) - len(raw)))
        out = []
        for p, n in zip(padded, sizes, strict=True):
            value = json.loads(p[:n])
            if not isinstance(value, dict):
                raise InvalidInput("a rank sent a malformed message")
            out.append(value)
        return out


def _failures(statuses: Sequence[dict[str, Any]]) -> dict[int, str]:
    return {r: str(s.get("error", "")) for r, s in enumerate(statuses) if not s.get("ok")}


def _part_ref(name: str, rank: int, world: int) -> str:
    return f"{name}#tp{rank}of{world}"


# -- rank 0 ------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Held:
    """What this rank holds of the committed model."""

    name: str
    shard: SealedShard
    tp: TPModel
    lm: TPByteLM
    config: ByteLMConfig


class TPLeader:
    """Rank 0's side of the group: sends the commands, runs its own part, watches the others.

    Every command and the collective work that follows it run under ``lock``, so that rank 0
    issues collectives in one order from any thread (HTTP handlers, the scheduler, the scrubber,
    the heartbeat)."""

    def __init__(self, group: TPGroup, token: bytes, part_root: Path) -> None:
        if group.env.rank != 0:
            raise ConfigError("TPLeader runs on rank 0")
        self.group = group
        self._token = token
        self._part_root = part_root
        self._channel = _Channel(group.command, group.timeout_s)
        self.lock = threading.RLock()
        self._held: _Held | None = None
        self._broken: TPIncident | None = None
        #: Each follower's free device memory as its last message reported it (rank k at index
        #: k; None until heard from). Every exchange carries it, the idle heartbeat included, so
        #: it is at most about a quarter of the timeout old when nothing runs.
        self._free: list[int | None] = [None] * group.env.world
        #: Called with the incident when the heartbeat finds the group broken (the worker's
        #: ``lifecycle.report_failure``: Stopped, audited).
        self.on_failure: Callable[[BaseException], object] | None = None
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="vram-tp-heartbeat", daemon=True)
        self._beat.start()

    def __repr__(self) -> str:
        return f"TPLeader(world={self.world}, held={self.held is not None}, broken={self.broken})"

    @property
    def world(self) -> int:
        return self.group.env.world

    @property
    def held(self) -> _Held | None:
        return self._held

    @property
    def broken(self) -> bool:
        return self._broken is not None

    # -- commands ---------------------------------------------------------------------------------
    def _lost(self, exc: BaseException, what: str) -> NoReturn:
        incident = RankUnresponsive(
            f"rank 0: {what} did not complete on every rank of the tensor-parallel group within "
            f"{self.group.timeout_s:g} s ({type(exc).__name__}): a rank died, hangs or is "
            "unreachable; stopping",
            rank=0,
        )
        self._broken = incident
        raise incident from None

    def _exchange(self, obj: dict[str, Any], what: str) -> list[dict[str, Any]]:
        if self._broken is not None:
            raise self._broken
        try:
            replies = self._channel.exchange(obj)
        except Exception as exc:  # DistBackendError, a timeout, a peer gone: all the same here
            self._lost(exc, what)
        for rank, reply in enumerate(replies[1:], start=1):
            free = reply.get("free")
            if isinstance(free, int) and not isinstance(free, bool) and free >= 0:
                self._free[rank] = free
        return replies

    def group_free(self, own: int) -> int:
        """The least free device memory of any rank: ``own`` (rank 0's, read now) and each
        follower's as last reported. A follower not heard from yet counts as rank 0 (the group
        starts with an exchange, so that lasts until the first command or heartbeat only)."""
        return min([own, *(f for f in self._free[1:] if f is not None)])

    def _send(self, op: str, **fields: Any) -> None:
        self._exchange({"op": op, **fields}, f"the {op!r} command")

    def _heartbeat(self) -> None:
        interval = self.group.timeout_s / 4
        while not self._stop.wait(interval):
            if self._broken is not None:
                return
            if not self.lock.acquire(blocking=False):
                continue  # a command is running: the others are busy with it, not waiting
            try:
                self._send("noop")
            except TPIncident as exc:
                log.error("tensor-parallel group lost: %s", exc)
                if self.on_failure is not None:
                    self.on_failure(exc)
                return
            finally:
                self.lock.release()

    def commit(
        self,
        mgr: VramManager,
        files: ModelFiles,
        config: ByteLMConfig,
        *,
        algorithm: str,
        expected: str | None,
        sha256: str | None,
        audit: AuditLog | None,
    ) -> _Held:
        """Split, seal every rank's part, bind them into the group's record, verify once."""
        if self._held is not None:
            raise ModelLoadFailed("a tensor-parallel worker holds one model (DELETE its shard first)")
        # The split runs before the lock is taken: the heartbeat keeps the others waiting.
        try:
            image = files.weights.read_bytes()
        except OSError as exc:
            raise ModelLoadFailed(f"cannot read model files: {exc.strerror}") from None
        if sha256 is not None and hashlib.sha256(image).hexdigest() != sha256:
            raise ModelLoadFailed("the model's bytes do not match expected_digest (sha256)")
        if expected is not None and digest(image, algorithm).hex() != expected:
            raise ModelLoadFailed(f"the model's bytes do not match the expected {algorithm} digest")
        out = self._part_root / f"{_SAFE.sub('_', files.name)}-tp{self.world}"
        for d in reversed((out, out.parent)):
            d.mkdir(exist_ok=True, mode=0o700)
        try:
            paths = split_byte_lm(image, config, self.world, out)
        except InvalidInput as exc:
            raise ModelLoadFailed(
                f"model {files.name!r} cannot be split over {self.world} ranks: {exc}"
            ) from None
        del image
        digests = [digest(p.read_bytes(), algorithm).hex() for p in paths]
        with self.lock:
            self._send(
                "commit",
                name=files.name,
                paths=[str(p) for p in paths],
                digests=digests,
                algorithm=algorithm,
                config=dataclasses.asdict(config),
            )
            shard: SealedShard | None = None
            lm: TPByteLM | None = None
            status: dict[str, Any] = {"ok": True}
            try:
                shard = mgr.seal_file(
                    paths[0],
                    format="safetensors",
                    model_ref=_part_ref(files.name, 0, self.world),
                    shard_index=0,
                    total_shards=self.world,
                    expected_digest=digests[0],
                    digest_algorithm=algorithm,
                )
                lm = TPByteLM(mgr, shard, config, rank=0, world=self.world, group=self.group.decoder)
            except Exception as exc:  # any failure must reach the exchange, or the others wait
                status = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            try:
                failed = _failures(self._exchange(status, "the commit"))
                if failed:
                    detail = "; ".join(f"rank {r}: {e}" for r, e in failed.items())
                    raise ModelLoadFailed(f"tensor-parallel commit of {files.name!r} failed: {detail}")
                assert shard is not None
                assert lm is not None
                try:
                    tp = TPModel.seal(
                        mgr,
                        [shard],
                        model_name=files.name,
                        token=self._token,
                        timeout_s=self.group.timeout_s,
                        audit=audit,
                    )
                    tp.verify()  # the commit ends verified, on every rank
                except TPIncident as exc:
                    self._broken = exc
                    raise
                except Exception as exc:  # the group is in an unknown state: nobody goes on
                    self._lost(exc, "binding the parts into one record")
            except BaseException:
                if lm is not None:
                    lm.close()
                if shard is not None:
                    with contextlib.suppress(VramError):
                        mgr.deallocate(shard)
                raise
            self._held = _Held(files.name, shard, tp, lm, config)
            return self._held

    def verify(self) -> TPModel:
        held = self._need()
        with self.lock:
            self._send("verify")
            try:
                held.tp.verify()
            except TPIncident as exc:
                self._broken = exc
                raise
            return held.tp

    def generate(self, prompt: bytes, max_tokens: int, on_token: Callable[[int], object]) -> list[int]:
        held = self._need()
        with self.lock:
            self._send("execute", prompt=prompt.hex(), max_tokens=max_tokens)
            try:
                return held.lm.generate(prompt, max_tokens, on_token)
            except Exception as exc:  # an all-reduce that did not complete
                self._lost(exc, "the decoder's all-reduce")

    def free(self, mgr: VramManager) -> None:
        held = self._need()
        with self.lock:
            self._held = None
            held.lm.close()
            try:
                with contextlib.suppress(TPIncident):
                    self._send("free")
            finally:
                mgr.deallocate(held.shard)

    def close_views(self) -> None:
        """Drop this rank's views of its part (before its memory is freed)."""
        if self._held is not None:
            self._held.lm.close()

    def close(self) -> None:
        """Tell every rank to stop (best effort: a broken group has stopped already)."""
        self._stop.set()
        if self.lock.acquire(timeout=self.group.timeout_s):
            try:
                if self._broken is None:
                    with contextlib.suppress(TPIncident):
                        self._send("stop")
                        self._broken = RankUnresponsive("rank 0: the group was stopped", rank=0)
            finally:
                self.lock.release()
        self._beat.join(self.group.timeout_s)

    def _need(self) -> _Held:
        if self._broken is not None:
            raise self._broken
        if self._held is None:
            raise NotSealed("no model is committed on this tensor-parallel worker")
        return self._held


class TPExecutor:
    """The byte-level decoder run tensor-parallel: rank 0's executor, driving every rank."""

    kind = "generation"

    def __init__(self, leader: TPLeader, name: str, config: ByteLMConfig, *, untrained: bool) -> None:
        self._leader, self._name, self._config, self._untrained = leader, name, config, untrained

    @property
    def description(self) -> str:
        c = self._config
        random = "; RANDOM untrained weights: its tokens are noise" if self._untrained else ""
        return (
            f"{self._name}: byte-level decoder ({c.num_layers} layers, {c.hidden_size} hidden, "
            f"{c.num_heads} heads), GENERATION model, greedy decoding, TENSOR-PARALLEL over "
            f"{self._leader.world} ranks (column/row-parallel linears, one all-reduce per block), "
            f"each rank on its own sealed part in place{random}"
        )

    def prepare(self, prompt: str, max_tokens: int | None, sampling: Sampling | None = None) -> JobInput:
        if sampling is not None and sampling.temperature > 0:
            raise InvalidInput("the tensor-parallel decoder decodes greedily only (temperature 0)")
        data, n = byte_prompt(prompt, max_tokens, self._config)
        return JobInput(tokens=(), data=(data, n))

    def run(self, jobs: Sequence[JobInput]) -> list[JobOutput]:
        return self.run_streaming(jobs, lambda _i, _t: None)

    def run_streaming(self, jobs: Sequence[JobInput], emit: TokenSink) -> list[JobOutput]:
        outputs = []
        for i, job in enumerate(jobs):
            prompt, n = job.data
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            wanted = [True]

            def on_token(tok: int, i: int = i, decoder: Any = decoder, wanted: list[bool] = wanted) -> None:
                # A job that wants no more tokens still runs to its end: every rank must make the
                # same steps. Its tokens are just not sent.
                if wanted[0] and emit(i, Token(decoder.decode(bytes((tok,))), tok)) is False:
                    wanted[0] = False

            ids = self._leader.generate(prompt, n, on_token)
            raw = bytes(ids)
            stop = "cancelled" if not wanted[0] else ("max_tokens" if len(ids) >= n else "eos")
            outputs.append(
                JobOutput(
                    end={
                        "kind": "generation",
                        "tokens_in": 1 + len(prompt),
                        "tokens_out": len(ids),
                        "stop_reason": stop,
                        "text": raw.decode("utf-8", errors="replace"),
                        "output_sha256": hashlib.sha256(raw).hexdigest()[:16],
                        "tp_world_size": self._leader.world,
                    }
                )
            )
        return outputs

    def close(self) -> None:
        self._leader.close_views()


class TPWorker(Worker):
    """The worker of rank 0: the usual service, with every check and execution collective."""

    def __init__(
        self,
        config: WorkerConfig,
        token: bytes,
        catalog: ModelCatalog,
        *,
        leader: TPLeader,
        **kwargs: Any,
    ) -> None:
        self._leader = leader
        super().__init__(config, token, catalog, **kwargs)
        leader.on_failure = self.lifecycle.report_failure
        if leader.broken:
            raise ConfigError("the tensor-parallel group was lost while the worker started")

    # -- the group's facts -------------------------------------------------------------------------
    @property
    def tp_degree(self) -> int:
        return self._leader.world

    def tp_devices(self) -> list[int]:
        held = self._leader.held
        if held is not None:
            return [p.device for p in held.tp.record.parts]
        return list(range(self._leader.world))  # torchrun's one device per local rank

    def group_id(self) -> str | None:
        held = self._leader.held
        if held is None:
            return None
        rec = held.tp.record
        # Names the group and its sealed record (a hash of the record's tag: nothing secret).
        return f"tp-{rec.model_name}-{hashlib.sha256(bytes.fromhex(rec.signature)).hexdigest()[:16]}"

    def rank_handles(self, m: CommittedModel) -> list[dict[str, Any]] | None:
        held = self._leader.held
        if held is None or held.name != m.name:
            return None
        seen = m.last_verified_ns
        out = []
        for part in held.tp.record.parts:
            for s in part.shards:
                out.append(
                    {
                        "shard_id": m.handle_id if part.rank == 0 else s.shard_id,
                        "gpu_device": part.device,
                        "vram_bytes": s.vram_bytes,
                        "sealed": True,
                        # Prefixed: bare hex would read as SHA-256 of the bytes (status.handle).
                        "digest": f"{s.digest_algorithm}:{s.digest}",
                        "model_ref": m.name,
                        "shard_index": part.rank,
                        "total_shards": held.tp.world_size,
                        "digest_algorithm": s.digest_algorithm,
                        "seal_shard_id": s.shard_id,
                        "seal_digest": f"{s.digest_algorithm}:{s.digest}",
                        "last_verified_at": seen / 1e9 if seen else None,
                        "seal_age_s": round((time.time_ns() - seen) / 1e9, 3) if seen else None,
                    }
                )
        return out

    def plan(self, model: str | None, vram_bytes: int | None) -> dict[str, Any]:
        """As one worker's, but each rank holds about 1/N of the model: it fits when that part
        fits in the free device memory of every rank. ``available_bytes`` is the least of rank
        0's (read now) and each other rank's as its last message to rank 0 reported it (a plan
        never waits on the group; see ``TPLeader.group_free``)."""
        out = super().plan(model, vram_bytes)
        free = self._leader.group_free(out["available_bytes"])
        out["available_bytes"] = free
        per_rank = self.needed_bytes(-(-out["model_bytes"] // self.tp_degree))
        out["fits"] = 0 < per_rank <= free and per_rank <= self.manager.max_model_bytes
        return out

    # -- commit, verify, free ----------------------------------------------------------------------
    def _commit_files(self, files: ModelFiles, check: DigestCheck, spec: CommitSpec) -> CommittedModel:
        if files.format != "safetensors" or files.config is None:
            raise ModelLoadFailed(
                "a tensor-parallel worker runs the byte-level decoder only (safetensors with config.json)"
            )
        try:
            meta = json.loads(files.config.read_text(encoding="utf-8"))
            config = ByteLMConfig.from_file(files.config)
        except (OSError, ValueError, InvalidInput) as exc:
            raise ModelLoadFailed(f"model {files.name!r}: config.json: {exc}") from None
        if not isinstance(meta, dict) or meta.get("model_type") != MODEL_TYPE:
            raise ModelLoadFailed(
                f"model {files.name!r} is not a {MODEL_TYPE} model: a tensor-parallel worker runs the "
                "byte-level decoder only"
            )
        size = files.weights.stat().st_size
        if size > self.config.max_model_bytes:
            raise ModelLoadFailed(
                f"model is {size} bytes, above this worker's limit of {self.config.max_model_bytes}"
            )
        algorithm = check.seal_algorithm or self.config.digest_algorithm
        expected = check.seal_digest
        if expected is None and algorithm == self.config.digest_algorithm:
            expected = files.expected_digest
        t0 = time.perf_counter()
        held = self._leader.commit(
            self.manager,
            files,
            config,
            algorithm=algorithm,
            expected=expected,
            sha256=check.sha256,
            audit=self.audit,
        )
        t1 = time.perf_counter()
        executor = TPExecutor(self._leader, files.name, config, untrained=meta.get("untrained") is True)
        shard = held.shard
        self.metrics.seals.labels(backend=self.manager.backend).inc()
        self.metrics.sealed_bytes.inc(shard.vram_bytes)
        model = CommittedModel(
            name=files.name,
            files=files,
            shard=shard,
            executor=executor,
            executor_note=executor.description,
            side_files={"config.json": hashlib.sha256(files.config.read_bytes()).hexdigest()},
            seal_seconds=t1 - t0,
            verify_seconds=held.tp.last_local_ns / 1e9,
            handle_id=spec.handle_id or shard.shard_id,
            shard_index=0,
            total_shards=self._leader.world,
            sha256=check.sha256,
            last_verified_ns=time.time_ns(),
        )
        self._emit(
            "ModelCommitted",
            model=files.name,
            shard_id=shard.shard_id,
            handle_id=model.handle_id,
            digest=shard.digest,
            vram_bytes=shard.vram_bytes,
            file_format=files.format,
            executor=executor.description,
            tp_world_size=self._leader.world,
            tp_record=held.tp.record.record(),
            correlation_id=spec.correlation_id or None,
        )
        return model

    def _verify_all(self, trigger: str, shard_id: str | None = None, check: Check = "full") -> VerifyPass:
        held = self._leader.held
        if held is None:
            return super()._verify_all(trigger, shard_id, check)
        parts = held.tp.record.parts
        if shard_id is not None:
            known = {s.shard_id for p in parts for s in p.shards} | {m.handle_id for m in self.models()}
            if shard_id not in known:
                raise NotSealed(f"shard {shard_id!r} is not sealed on this worker")
        # Every rank's every shard, whatever was asked: one collective verdict for the model.
        t0 = time.perf_counter()
        try:
            self._leader.verify()
        except TPVerificationFailed:
            self.metrics.verifications.labels(result="failed", trigger=trigger).inc()
            raise
        dt = time.perf_counter() - t0
        self.metrics.verifications.labels(result="passed", trigger=trigger).inc()
        self.metrics.verify_seconds.labels(trigger=trigger).observe(dt)
        now = time.time_ns()
        for m in self.models():
            m.last_verified_ns = now
        return VerifyPass(
            shards=sum(len(p.shards) for p in parts),
            bytes=sum(s.vram_bytes for p in parts for s in p.shards),
            seconds=dt,
            trigger=trigger,
        )

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """What the shard moves (migrate, offload, restore) take first: refused here, before
        anything moves. A rank's part is bound to its rank's device by the group's record, and the
        other ranks' parts cannot be moved from rank 0."""
        if self._leader.held is not None:
            raise InvalidInput(
                "the shards of a tensor-parallel group do not move: each rank's part stays on its "
                "rank's device (DELETE and commit again to re-seal)"
            )
        with super().exclusive():
            yield

    def deallocate(self, shard_id: str) -> SealedShard:
        if self._leader.held is None:
            return super().deallocate(shard_id)
        with self._commit_lock, self._exec_lock:
            model = self._by_handle(shard_id)
            if model is None:
                raise NotSealed(f"shard {shard_id!r} is not sealed on this worker")
            model.executor = None
            del self._models[model.name]
            self._leader.free(self.manager)
            return model.shard

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._leader.close()


def make_tp_worker(leader: TPLeader) -> Callable[..., Worker]:
    """What ``ServeOptions.make_worker`` takes: builds rank 0's worker over ``leader``."""

    def make(config: WorkerConfig, token: bytes, catalog: ModelCatalog, **kwargs: Any) -> Worker:
        return TPWorker(config, token, catalog, leader=leader, **kwargs)

    return make


# -- ranks 1 .. N-1 ----------------------------------------------------------------------------------
def _flip_if_asked(flip_dir: Path | None, rank: int, mgr: VramManager, held: _Held | None) -> None:
    """TEST ONLY (see ``TEST_FLIP_ENV``)."""
    if flip_dir is None or held is None:
        return
    f = flip_dir / f"flip-rank{rank}"
    if not f.is_file():
        return
    from vram_residency.testing import flip_bit

    bit = int(f.read_text().strip())
    flip_bit(mgr, held.shard, bit)
    log.warning("TEST HOOK: rank %d flipped bit %d of its sealed part", rank, bit)
    f.unlink()


class _CommitRefused(Exception):
    """Some rank could not seal its part: every rank drops the commit (rank 0 says why)."""


def _follower_commit(
    cmd: dict[str, Any],
    group: TPGroup,
    mgr: VramManager,
    channel: _Channel,
    token: bytes,
    audit: AuditLog | None,
) -> _Held | None:
    rank, world = group.env.rank, group.env.world
    shard: SealedShard | None = None
    lm: TPByteLM | None = None
    status: dict[str, Any] = {"ok": True}
    try:
        config = ByteLMConfig(**cmd["config"]).check()
        shard = mgr.seal_file(
            cmd["paths"][rank],
            format="safetensors",
            model_ref=_part_ref(str(cmd["name"]), rank, world),
            shard_index=rank,
            total_shards=world,
            expected_digest=str(cmd["digests"][rank]),
            digest_algorithm=str(cmd["algorithm"]),
        )
        lm = TPByteLM(mgr, shard, config, rank=rank, world=world, group=group.decoder)
    except Exception as exc:  # any failure must reach the exchange, or the others wait
        status = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    try:
        if _failures(channel.exchange(status)):
            raise _CommitRefused  # rank 0 reports which rank, and why
        assert shard is not None
        assert lm is not None
        tp = TPModel.seal(
            mgr, [shard], model_name=str(cmd["name"]), token=token, timeout_s=group.timeout_s, audit=audit
        )
        tp.verify()
    except _CommitRefused:
        if lm is not None:
            lm.close()
        if shard is not None:
            with contextlib.suppress(VramError):
                mgr.deallocate(shard)
        return None
    except BaseException:
        if lm is not None:
            lm.close()
        raise
    return _Held(str(cmd["name"]), shard, tp, lm, config)


def run_follower(
    group: TPGroup,
    token: bytes,
    *,
    worker_id: str,
    audit_path: Path | None,
    capacity_bytes: int | None = None,
    max_tensors: int = DEFAULT_MAX_TENSORS,
) -> int:
    """Rank k >= 1: hold and verify this rank's part, run what rank 0 sends, until told to stop
    (0) or until the group fails (3: Stopped, the incident is logged and audited)."""
    from vram_residency.audit.log import AuditLog

    rank = group.env.rank

    def on_signal(sig: int, _frame: object) -> None:
        # torchrun sends SIGTERM to every rank at once; rank 0 drains its running jobs, which
        # need this rank until they end. So this rank waits for rank 0's "stop" (or, should rank 0
        # be gone, stops on its own within the timeout).
        log.info(
            "rank %d: %s: waiting for rank 0 to drain and stop the group", rank, signal.Signals(sig).name
        )

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    flip = os.environ.get(TEST_FLIP_ENV)
    flip_dir = Path(flip) if flip else None
    channel = _Channel(group.command, group.timeout_s)
    audit = AuditLog(audit_path, worker_id=worker_id, token=token) if audit_path is not None else None
    held: _Held | None = None
    status = 0
    try:
        with VramManager(
            token,
            group.env.local_rank,
            backend=group.backend,
            worker_id=worker_id,
            capacity_bytes=capacity_bytes,
            audit=audit,
            max_tensors=max_tensors,  # the same bound as rank 0's (serve --max-tensors)
        ) as mgr:

            def report() -> dict[str, Any]:
                # Rank 0 plans with every rank's free memory (TPWorker.plan): it rides on every
                # message this rank sends. A failed read leaves the field out; it never fails
                # the exchange.
                try:
                    return {"free": mgr.available_vram()}
                except VramError:
                    return {}

            channel.report = report
            try:
                while True:
                    _flip_if_asked(flip_dir, rank, mgr, held)
                    try:
                        cmd = channel.exchange({})[0]
                    except Exception as exc:  # rank 0 (or another rank) is gone
                        raise RankUnresponsive(
                            f"rank {rank}: no command from rank 0 within {group.timeout_s:g} s "
                            f"({type(exc).__name__}): stopping",
                            rank=rank,
                        ) from None
                    op = cmd.get("op")
                    if op == "noop":
                        continue
                    if op == "stop":
                        log.info("rank %d: stop requested by rank 0", rank)
                        break
                    if op == "commit":
                        held = _follower_commit(cmd, group, mgr, channel, token, audit)
                    elif op == "verify" and held is not None:
                        held.tp.verify()
                    elif op == "execute" and held is not None:
                        try:
                            held.lm.generate(bytes.fromhex(cmd["prompt"]), int(cmd["max_tokens"]))
                        except Exception as exc:
                            raise RankUnresponsive(
                                f"rank {rank}: the decoder's all-reduce failed "
                                f"({type(exc).__name__}): stopping",
                                rank=rank,
                            ) from None
                    elif op == "free" and held is not None:
                        held.lm.close()
                        mgr.deallocate(held.shard)
                        held = None
                    else:
                        raise InvalidInput(f"rank {rank}: unexpected command {op!r} from rank 0")
            except TPIncident as exc:
                status = 3
                if audit is not None and not isinstance(exc, TPVerificationFailed):
                    # TPModel audits its own incidents; a lost rank 0 is audited here.
                    with contextlib.suppress(VramError):
                        audit.emit(
                            "TPIncident",
                            critical=True,
                            rank=rank,
                            reason="rank unresponsive",
                            message=str(exc),
                        )
                print(
                    f"vram-residency rank {rank}: STOPPED: {type(exc).__name__}: {exc}",
                    file=sys.stderr,
                    flush=True,
                )
            finally:
                if held is not None:
                    held.lm.close()
    finally:
        if audit is not None:
            audit.close()
    return status


# -- launching -------------------------------------------------------------------------------------
def resolve_backend(backend: BackendName) -> BackendName:
    """The one backend every rank uses: "auto" is decided once, the same way on every rank."""
    if backend != "auto":
        return backend
    import torch

    return "cuda" if torch.cuda.is_available() else "host"


def group_token(token_file: Path | None, state_dir: Path, *, spec_mode: bool, create: bool) -> bytes:
    """The worker token every rank reads. Rank 0 (``create``) makes the default token file before
    the rendezvous, so that the others, which read it after, find it."""
    from vram_residency.service.auth import (
        TokenOrigin,
        TokenSource,
        create_token_file,
        find_token_file,
        read_token_file,
    )
    from vram_residency.service.config import DEFAULT_TOKEN_PATH

    if spec_mode:
        source = TokenSource(token_file or DEFAULT_TOKEN_PATH, TokenOrigin.ARGUMENT, False)
    else:
        source = find_token_file(token_file, state_dir)
    if create and source.may_create and not (source.path.exists() or source.path.is_symlink()):
        return create_token_file(source.path)
    return read_token_file(source.path)
