"""``serve`` as a tensor-parallel group: real rank processes (torchrun's environment, gloo, host
backend), real HTTP against rank 0.

One 2-rank group commits a small byte-level decoder, shows both ranks in /worker/ready, plans
``tensor_parallel``, executes with the same greedy tokens as a single-process serve of the same
model, and then has a bit flipped on rank 1 (the test-only hook ``VRAM_RESIDENCY_TEST_FLIP_DIR``):
the next execute answers SEAL_VERIFICATION_FAILED naming rank 1, and both ranks stop. A second
group loses rank 1 to SIGKILL: rank 0 stops within the timeout and keeps answering HTTP.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from vram_residency.service.executors.decoder import ByteLMConfig
from vram_residency.service.executors.example_model import file_image

TOKEN = "tp-serve-test-token-0123456789abcdef"
MODEL = "tiny-byte-lm"
TIMEOUT_S = 6.0
# VRAM_RESIDENCY_TEST_BACKEND=cuda runs the same processes on GPUs (one per rank; CuPy needed to
# execute), as tests/service does.
BACKEND = os.environ.get("VRAM_RESIDENCY_TEST_BACKEND", "host")
_LISTENING = re.compile(r"listening:\s+(http://\S+)")
# 4 heads and 128 MLP columns split over 2 ranks; 2 layers keep every process quick.
CONFIG = ByteLMConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position=256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model_dir(root: Path) -> Path:
    d = root / "models" / MODEL
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(file_image(CONFIG))
    (d / "config.json").write_text(json.dumps({**CONFIG.to_json(), "untrained": True}))
    (root / "models" / "blob.bin").write_bytes(bytes(range(256)) * 64)
    return root / "models"


def _token_file(root: Path) -> Path:
    path = root / "worker.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(TOKEN + "\n")
    return path


@dataclass
class Serve:
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]
    root: Path
    url: str = ""
    client: httpx.Client = field(init=False)

    def log(self, r: int) -> str:
        return self.logs[r].read_text(errors="replace")[-4000:]

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r, p in enumerate(self.procs):
                assert p.poll() is None, f"rank {r} exited early:\n{self.log(r)}"
            m = _LISTENING.search(self.logs[0].read_text(errors="replace"))
            if m:
                self.url = m.group(1)
                self.client = httpx.Client(
                    base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
                )
                return
            time.sleep(0.1)
        raise AssertionError(f"rank 0 did not start listening:\n{self.log(0)}\n{self.log(-1)}")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()


def _start(
    root: Path,
    world: int,
    *,
    flip_dir: Path | None = None,
    extra: tuple[str, ...] = (),
    rank_extra: dict[int, tuple[str, ...]] | None = None,
) -> Serve:
    """``world`` ranks of ``serve`` in torchrun's environment (what torchrun would set);
    ``rank_extra``: options for one rank only (after ``extra``)."""
    root.mkdir(parents=True, exist_ok=True)
    models = _model_dir(root)
    token = _token_file(root)
    port = free_port()
    procs, logs = [], []
    for r in range(world):
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("WORKER_") and k != "CREDENTIALS_DIRECTORY"
        }
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE=str(world),
            GLOO_SOCKET_IFNAME="lo",
            OMP_NUM_THREADS="1",
        )
        if flip_dir is not None:
            env["VRAM_RESIDENCY_TEST_FLIP_DIR"] = str(flip_dir)
        cmd = [
            sys.executable, "-m", "vram_residency.cli.main", "serve", "--backend", BACKEND, "--port", "0",
            "--token-file", str(token), "--state-dir", str(root / "state"), "--model-dir", str(models),
            "--model", MODEL, "--scrub-interval", "0", "--tp-timeout", str(TIMEOUT_S), *extra,
            *(rank_extra or {}).get(r, ()),
        ]  # fmt: skip
        log = root / f"rank{r}.log"
        with log.open("wb") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
        logs.append(log)
    return Serve(procs, logs, root)


def _single(root: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """The same model in one ordinary serve process (no torch, no group)."""
    root.mkdir(parents=True, exist_ok=True)
    models = _model_dir(root)
    token = _token_file(root)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("WORKER_") and k not in ("WORLD_SIZE", "RANK")
    }
    cmd = [
        sys.executable, "-m", "vram_residency.cli.main", "serve", "--backend", BACKEND, "--port", "0",
        "--token-file", str(token), "--state-dir", str(root / "state"), "--model-dir", str(models),
        "--model", MODEL, "--scrub-interval", "0",
    ]  # fmt: skip
    log = root / "single.log"
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env), log


def _sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    event = ""
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])


def _execute(client: httpx.Client, prompt: str, n: int) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
    body = {"prompt": prompt, "params": {"max_tokens": n, "temperature": 0}}
    with client.stream("POST", "/worker/execute", json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [("error", r.json())]
        return 200, list(_sse(r.iter_lines()))


def _token_ids(events: list[tuple[str, dict[str, Any]]]) -> list[int]:
    assert events[-1][0] == "end", events[-3:]
    return [d["id"] for e, d in events if e == "token"]


PROMPTS = ["hello, tensor-parallel serve", "x"]


def test_tp_serve_commit_ready_execute_and_a_flip_on_rank_1(tmp_path: Path) -> None:
    flip_dir = tmp_path / "flip"
    flip_dir.mkdir()
    group = _start(tmp_path / "tp", 2, flip_dir=flip_dir)
    single, single_log = _single(tmp_path / "single")
    try:
        group.wait_listening(90)
        c = group.client

        # -- /worker/ready: both ranks' shards, and the group's id ---------------------------------
        ready = c.get("/worker/ready").json()
        assert ready["ready"] is True and ready["state"] == "Ready"
        assert ready["nccl_group_id"] and ready["nccl_group_id"].startswith(f"tp-{MODEL}-")
        handles = ready["handles"]
        assert [(h["shard_index"], h["total_shards"], h["gpu_device"]) for h in handles] == [
            (0, 2, 0),
            (1, 2, 1),
        ]
        assert all(h["model_ref"] == MODEL and h["sealed"] for h in handles)
        assert len({h["seal_shard_id"] for h in handles}) == 2
        assert len({h["digest"] for h in handles}) == 2  # each rank seals its own part

        # -- /worker/plan ------------------------------------------------------------------------
        plan = c.post(
            "/worker/plan", json={"model_ref": MODEL, "shard_layout": "tensor_parallel", "tp_degree": 2}
        )
        assert plan.status_code == 200 and plan.json()["feasible"] is True, plan.text
        assert [e["gpu_device"] for e in plan.json()["shard_plan"]] == [0, 1]
        plan = c.post(
            "/worker/plan", json={"model_ref": MODEL, "shard_layout": "tensor_parallel", "tp_degree": 4}
        )
        assert plan.json()["feasible"] is False and "group of 2" in plan.json()["reason"]
        # Each rank holds half: a size above one rank's free memory fits over two.
        free = plan.json()["available_bytes"]
        # Under the largest allocation per rank too (serve's default --max-model-bytes, 100 GiB):
        # an H200's free memory (~139 GiB) times 3/4 would exceed it.
        one_rank = min(free, 100 * 2**30)
        big = {"vram_bytes": one_rank * 3 // 2, "shard_layout": "tensor_parallel", "tp_degree": 2}
        plan = c.post("/worker/plan", json=big)
        assert plan.json()["feasible"] is True, plan.text
        assert all(e["vram_bytes"] <= free for e in plan.json()["shard_plan"])
        plan = c.post("/worker/plan", json={"model_ref": MODEL, "shard_layout": "single"})
        assert plan.json()["feasible"] is False and "tp_degree 2" in plan.json()["reason"]

        # -- execute: the same greedy tokens as one process --------------------------------------
        tp_tokens = []
        for prompt in PROMPTS:
            status, events = _execute(c, prompt, 16)
            assert status == 200, events
            started = events[0][1]
            assert "TENSOR-PARALLEL over 2 ranks" in started["executor"]
            assert started["verified"]["shards"] == 2  # both ranks' parts, one collective verdict
            tp_tokens.append(_token_ids(events))
        assert all(len(t) > 0 for t in tp_tokens)

        deadline = time.monotonic() + 60
        url = ""
        while not url:
            assert single.poll() is None, single_log.read_text()[-3000:]
            assert time.monotonic() < deadline, single_log.read_text()[-3000:]
            m = _LISTENING.search(single_log.read_text(errors="replace"))
            url = m.group(1) if m else ""
            time.sleep(0.1)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as sc:
            ref = [_token_ids(_execute(sc, p, 16)[1]) for p in PROMPTS]
        assert tp_tokens == ref

        # -- a bit flipped on rank 1: SEAL_VERIFICATION_FAILED naming rank 1, every rank stops ----
        # The bit lies in the middle of rank 1's part (its header is small: this is in the weights).
        part = handles[1]["vram_bytes"]
        (flip_dir / "flip-rank1").write_text(str(8 * (part // 2) + 5))
        deadline = time.monotonic() + 3 * TIMEOUT_S
        while (flip_dir / "flip-rank1").exists():  # rank 1 takes it before its next command
            assert time.monotonic() < deadline, group.log(1)
            time.sleep(0.05)
        status, events = _execute(c, PROMPTS[0], 4)
        assert status == 500, events
        err = events[0][1]
        assert err["code"] == "SEAL_VERIFICATION_FAILED"
        assert "rank(s) 1" in err["message"] and "stopped because rank 1 failed" in err["message"]
        assert err["details"]["failing_ranks"] == [1]
        assert err["details"]["corrupted_tensors"]["1"], err
        ready = c.get("/worker/ready").json()
        assert ready["state"] == "Stopped" and ready["ready"] is False
        assert ready["incident"]["error_type"] == "TPVerificationFailed"
        assert c.get("/health").json()["status"] == "stopped"
        # Rank 1 stopped too (exit status 3: Stopped after an incident), having said why.
        assert group.procs[1].wait(3 * TIMEOUT_S) == 3, group.log(1)
        assert "rank 1 FAILED verification" in group.log(1)
        audit1 = (tmp_path / "tp" / "state" / "audit-rank1.jsonl").read_text()
        assert "TPIncident" in audit1 and "TPVerified" in audit1
        audit0 = (tmp_path / "tp" / "state" / "audit.jsonl").read_text()
        assert "TPIncident" in audit0 and "SecurityIncident" in audit0
        status, events = _execute(c, PROMPTS[0], 4)
        assert status == 503 and events[0][1]["code"] == "WORKER_STOPPED"
        # A SIGTERM still shuts rank 0 down cleanly.
        group.procs[0].send_signal(signal.SIGTERM)
        assert group.procs[0].wait(30) in (0, 1), group.log(0)
    finally:
        single.kill()
        single.wait()
        group.kill()


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_tp_serve_rank_1_lost_rank_0_stops_within_the_timeout(tmp_path: Path, how: str) -> None:
    group = _start(tmp_path / "tp", 2, extra=("--scrub-interval", "0.5"))
    try:
        group.wait_listening(90)
        c = group.client
        # The scrubber is collective too: its passes cover both ranks' shards.
        deadline = time.monotonic() + 20
        while (c.get("/worker/ready").json()["last_scrub"] or {}).get("shards") != 2:
            assert time.monotonic() < deadline, group.log(0)
            time.sleep(0.1)
        # A rank's part does not move (it is bound to its rank's device by the record).
        first = c.get("/worker/ready").json()
        moved = c.post(f"/worker/shards/{first['handles'][0]['shard_id']}/offload", json={"to": "host"})
        assert moved.status_code == 400 and "tensor-parallel" in moved.json()["message"], moved.text
        # A shard freed on every rank, and committed again: a new record, a new group id.
        r = c.delete(f"/worker/shards/{first['handles'][0]['shard_id']}")
        assert r.status_code == 200, r.text
        assert c.get("/worker/ready").json()["handles"] == []
        # Only the byte-level decoder runs tensor-parallel: anything else is refused, nothing held.
        r = c.post("/worker/commit", json={"model_ref": "blob.bin"})
        assert r.status_code == 422 and r.json()["code"] == "MODEL_LOAD_FAILED", r.text
        assert "byte-level decoder only" in r.json()["message"]
        r = c.post("/worker/commit", json={"model_ref": MODEL})
        assert r.status_code == 200, r.text
        again = c.get("/worker/ready").json()
        assert len(again["handles"]) == 2 and again["nccl_group_id"] != first["nccl_group_id"]
        assert _execute(c, "before", 4)[0] == 200

        os.kill(group.procs[1].pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        t_lost = time.monotonic()
        # The heartbeat (or a scrub pass) notices; HTTP answers all along, never hangs.
        while True:
            t0 = time.monotonic()
            health = c.get("/health", timeout=5).json()
            assert time.monotonic() - t0 < 2.0
            if health["status"] == "stopped":
                break
            assert time.monotonic() - t_lost < TIMEOUT_S + 5, group.log(0)
            time.sleep(0.1)
        status, events = _execute(c, "after", 4)
        assert status == 503 and events[0][1]["code"] == "WORKER_STOPPED", events
        ready = c.get("/worker/ready").json()
        assert ready["incident"]["error_type"] == "RankUnresponsive"
        assert time.monotonic() - t_lost < TIMEOUT_S + 8
        if how == "hung":
            # Rank 1 wakes up to a group whose rank 0 has stopped: it stops too, within the timeout.
            os.kill(group.procs[1].pid, signal.SIGCONT)
            assert group.procs[1].wait(3 * TIMEOUT_S) == 3, group.log(1)
            assert "RankUnresponsive" in group.log(1)
    finally:
        group.kill()


@pytest.mark.skipif(BACKEND != "host", reason="--host-capacity-gib sizes the host emulation only")
def test_tp_plan_counts_the_free_memory_of_every_rank(tmp_path: Path) -> None:
    # Rank 1's device is much smaller than rank 0's (emulated: 64 MiB against 1 GiB). A part that
    # fits on rank 0 but not on rank 1 must not be planned as feasible: rank 1's free memory
    # reaches rank 0 with every message (the startup commit's, then the heartbeats').
    mib = 2**20
    small = ("--host-capacity-gib", str(64 / 1024))
    group = _start(tmp_path / "tp", 2, rank_extra={0: ("--host-capacity-gib", "1"), 1: small})
    try:
        group.wait_listening(90)
        c = group.client

        def plan(n: int) -> dict[str, Any]:
            body = {"vram_bytes": n, "shard_layout": "tensor_parallel", "tp_degree": 2}
            r = c.post("/worker/plan", json=body)
            assert r.status_code == 200, r.text
            out: dict[str, Any] = r.json()
            return out

        held = c.get("/worker/ready").json()["handles"][1]["vram_bytes"]  # rank 1's part
        free = plan(mib)["available_bytes"]
        assert 64 * mib - 2 * held <= free <= 64 * mib - held
        assert plan(2 * 32 * mib)["feasible"] is True
        over = plan(2 * (free + mib))  # each part fits rank 0's ~1 GiB, not rank 1's 64 MiB
        assert over["feasible"] is False, over
        # After a heartbeat (a quarter of the timeout) the figure is still rank 1's.
        time.sleep(TIMEOUT_S / 4 + 0.5)
        assert plan(mib)["available_bytes"] == free
    finally:
        group.kill()


def test_torchrun_environment() -> None:
    from vram_residency.errors import ConfigError
    from vram_residency.service.tp import TPEnv, tp_env

    assert tp_env({}) is None
    assert tp_env({"WORLD_SIZE": "1", "RANK": "0"}) is None  # one rank: an ordinary serve
    assert tp_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == TPEnv(2, 4, 0)
    for bad in ({"WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "x", "RANK": "0"}):
        with pytest.raises(ConfigError):
            tp_env(bad)
