"""Two simulated hosts: network namespaces joined by a veth pair, ranks on each side.

The group's traffic crosses a real (virtual) link, as between nodes; taking the link down
mid-verify must make every rank, on both sides, stop within the timeout. Needs root and iproute2
(CI runs as root); skipped with the reason otherwise. The namespaces are always deleted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

IP = shutil.which("ip") or "/usr/sbin/ip"


def _ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=20)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    if not os.path.exists(IP):
        pytest.skip("iproute2's ip is not installed")
    tag = f"{os.getpid() % 100000}"
    ns = (f"vrtp-{tag}-a", f"vrtp-{tag}-b")
    veth = (f"vr{tag}a", f"vr{tag}b")
    try:
        _ip("netns", "add", ns[0])
    except (subprocess.CalledProcessError, OSError) as exc:
        err = (
            exc.stderr.decode(errors="replace").strip()
            if isinstance(exc, subprocess.CalledProcessError)
            else exc
        )
        pytest.skip(f"cannot create a network namespace here (needs root / CAP_SYS_ADMIN): {err}")
    try:
        _ip("netns", "add", ns[1])
        _ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for i in (0, 1):
            _ip("link", "set", veth[i], "netns", ns[i])
            _ip("-n", ns[i], "addr", "add", f"10.213.7.{i + 1}/24", "dev", veth[i])
            _ip("-n", ns[i], "link", "set", "lo", "up")
            _ip("-n", ns[i], "link", "set", veth[i], "up")
        yield ns
    finally:
        for n in ns:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run([IP, "netns", "del", n], capture_output=True, timeout=20, check=False)


def test_collective_verify_across_hosts_and_a_link_down_stops_every_rank(
    two_hosts: tuple[str, str], group_dir: Path, launch: Callable[..., Any]
) -> None:
    ns = two_hosts
    # One rank per "host" keeps the test inside the suite's time budget on 2 cores (every rank
    # process imports torch); the traffic between them crosses the veth link either way.
    world, timeout = 2, 3.0
    host_of = [0, 1]  # rank 0 on "host" a, rank 1 on "host" b
    tag = ns[0].split("-")[1]
    g = launch(
        "loop",
        world,
        group_dir,
        {"timeout": timeout, "size": 1 << 20},
        host="10.213.7.1",
        prefix=lambda r: [IP, "netns", "exec", ns[host_of[r]]],
        env_of=lambda r: {"GLOO_SOCKET_IFNAME": f"vr{tag}{'ab'[host_of[r]]}"},
    )
    try:
        deadline = time.monotonic() + 60
        while min(g.progress(r) for r in range(world)) < 3:
            assert time.monotonic() < deadline, [g.log(r) for r in range(world)]
            assert all(p.poll() is None for p in g.procs), [g.log(r) for r in range(world)]
            time.sleep(0.05)
        _ip("-n", ns[1], "link", "set", f"vr{tag}b", "down")
        t_down = time.monotonic()
        for p in g.procs:
            p.wait(timeout + 20)
        waited = time.monotonic() - t_down
    finally:
        g.kill()
    res = g.results()
    for r in range(world):
        assert res[r]["verifies"] >= 3, "verifies across the two hosts passed before the link went down"
        assert res[r]["incident"]["type"] == "RankUnresponsive", res[r]["incident"]
        assert res[r]["state"] == "stopped"
        assert res[r]["stuck_s"] < timeout + 2.0, (r, res[r]["stuck_s"])
    assert waited < timeout + 15
