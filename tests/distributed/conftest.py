"""Launching real rank processes for the distributed tests (gloo over TCP, host backend)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
RANK_SCRIPT = HERE / "_rank.py"

pytest.importorskip("torch", reason="the distributed tests need torch (the 'distributed' extra)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Group:
    procs: list[subprocess.Popen[bytes]]
    out: Path

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(deadline - time.monotonic(), 0.1))
        self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()

    def results(self, ranks: Sequence[int] | None = None) -> dict[int, dict[str, Any]]:
        out = {}
        for r in ranks if ranks is not None else range(len(self.procs)):
            f = self.out / f"result-{r}.json"
            assert f.exists(), f"rank {r} wrote no result: {self.log(r)}"
            out[r] = json.loads(f.read_text())
            assert "error" not in out[r], out[r]["error"]
        return out

    def log(self, r: int) -> str:
        f = self.out / f"log-{r}.txt"
        return f.read_text()[-3000:] if f.exists() else ""

    def progress(self, r: int) -> int:
        f = self.out / f"progress-{r}"
        try:
            return int(f.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0


def _launch(
    scenario: str,
    world: int,
    out: Path,
    args: dict[str, Any] | None = None,
    *,
    host: str = "127.0.0.1",
    prefix: Callable[[int], list[str]] = lambda _r: [],
    env_of: Callable[[int], dict[str, str]] = lambda _r: {},
) -> Group:
    """Start ``world`` rank processes (rank 0 hosts the TCP rendezvous)."""
    init = f"tcp://{host}:{free_port('127.0.0.1' if host == '127.0.0.1' else '')}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    if host == "127.0.0.1":
        # One machine: keep gloo and NCCL's bootstrap on loopback. Left to themselves they pick the
        # interface the hostname resolves to, which on some machines (a lent GPU VM here) does not
        # connect, and every group creation then times out.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    procs = []
    for r in range(world):
        cmd = [*prefix(r), sys.executable, str(RANK_SCRIPT), scenario, str(r), str(world), init, str(out)]
        cmd.append(json.dumps(args or {}))
        log = (out / f"log-{r}.txt").open("wb")
        procs.append(subprocess.Popen(cmd, env={**env, **env_of(r)}, stdout=log, stderr=subprocess.STDOUT))
    return Group(procs, out)


@pytest.fixture
def group_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def launch() -> Callable[..., Group]:
    """``launch(scenario, world, outdir, args, ...)``: start a group of rank processes."""
    return _launch
