"""Many threads writing at once keep one valid chain, with and without rotation."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.audit.audit_helpers import TOKEN, records
from vram_residency.audit import SEAL_VERIFICATION_FAILED, VRAM_SEALED, AuditLog, rotated_paths, verify_log

THREADS = 16
PER_THREAD = 300


@pytest.mark.parametrize("max_bytes", [None, 64 * 1024])
def test_sixteen_threads_keep_one_chain(tmp_path: Path, max_bytes: int | None) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(
        path, token=TOKEN, worker_id="w", max_bytes=max_bytes, batch_bytes=8192, flush_interval=0.01
    )
    start = threading.Barrier(THREADS)
    acked: list[list[str]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            start.wait()
            for i in range(PER_THREAD):
                critical = i % 10 == 0
                rec = log.emit(SEAL_VERIFICATION_FAILED if critical else VRAM_SEALED, shard_id=f"t{t}-{i}")
                if critical:
                    acked[t].append(rec.id)
        except BaseException as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    assert not errors

    files = [*rotated_paths(path), path]
    if max_bytes is not None:
        assert len(files) > 2
    report = verify_log(files, TOKEN)
    assert report.ok, report.first_break
    assert report.records == THREADS * PER_THREAD
    objs = records(*files)
    assert [o["seq"] for o in objs] == list(range(THREADS * PER_THREAD))
    # Every thread's events are all there, each exactly once, in that thread's own order.
    for t in range(THREADS):
        mine = [o["fields"]["shard_id"] for o in objs if o["fields"]["shard_id"].startswith(f"t{t}-")]
        assert mine == [f"t{t}-{i}" for i in range(PER_THREAD)]
    ids = {o["id"] for o in objs}
    assert all(i in ids for ack in acked for i in ack)
