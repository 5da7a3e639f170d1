"""A child killed with SIGKILL during heavy logging loses no acknowledged critical event; the log
verifies up to a torn record, and reopening recovers with a LogRecovered marker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.audit.audit_helpers import TOKEN, read_lines, records
from vram_residency.audit import LOG_RECOVERED, AuditLog, rotated_paths, verify_log

CHILD = Path(__file__).with_name("audit_crash_child.py")


def _run_and_kill(path: Path, min_acked: int, delay: float) -> list[str]:
    env = dict(os.environ, AUDIT_TEST_TOKEN=TOKEN)
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(path)], stdout=subprocess.PIPE, env=env, bufsize=0
    )
    assert proc.stdout is not None
    acked: list[str] = []
    buf = b""
    deadline = time.monotonic() + 60
    try:
        assert proc.stdout.readline() == b"READY\n"
        while len(acked) < min_acked and time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\n")
            acked += [d.decode() for d in done]
        time.sleep(delay)  # let it run on a little, so the kill lands mid-flight
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    buf += rest
    *done, _partial = buf.split(b"\n")  # a line cut by the kill was never acknowledged
    acked += [d.decode() for d in done]
    assert len(acked) >= min_acked, "the child did not log enough before the deadline"
    return acked


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.013, 0.1])
def test_sigkill_loses_no_acknowledged_critical_event(tmp_path: Path, delay: float) -> None:
    path = tmp_path / "audit.jsonl"
    acked = _run_and_kill(path, min_acked=200, delay=delay)

    files = [*rotated_paths(path), path] if path.exists() else rotated_paths(path)
    # Before any recovery: the set verifies, up to (at most) a torn last record.
    report = verify_log(files, TOKEN)
    assert report.ok_until_torn, report.first_break
    logged = {o["id"] for o in records(*files)}
    missing = [i for i in acked if i not in logged]
    assert not missing, f"{len(missing)} acknowledged critical events lost"

    if not report.torn_tail:
        # The kill fell between two writes. Make the torn write it could have made: a prefix of
        # a record, no newline. (A SIGKILL can stop a large write() between pages.) The active
        # file may be empty if the kill came right after a rotation.
        last = [line for f in files for line in read_lines(f)][-1]
        with open(path, "ab") as f:
            f.write(last[: len(last) // 2])
        assert verify_log([*rotated_paths(path), path], TOKEN).torn_tail

    with AuditLog(path, token=TOKEN, worker_id="restarted") as log:
        recovery = log.recovery
        assert recovery is not None
        assert recovery.marker.event == LOG_RECOVERED
        assert recovery.last_good_hash == report.last_hash  # the chain continues from there
        assert Path(recovery.torn_file).stat().st_size == recovery.torn_bytes > 0
        log.emit("WorkerStateChanged", from_state=None, to_state="Starting", reason="restart")
    files = [*rotated_paths(path), path]
    final = verify_log(files, TOKEN)
    assert final.ok, final.first_break
    objs = records(*files)
    marker = next(o for o in objs if o["event"] == LOG_RECOVERED)
    before = objs[objs.index(marker) - 1] if objs.index(marker) else None
    assert marker["fields"]["last_good_hash"] == (before["hash"] if before else "0" * 64)
    assert all(i in {o["id"] for o in objs} for i in acked)
    assert json.loads(Path(str(path) + ".head").read_text())["seq"] == objs[-1]["seq"]
