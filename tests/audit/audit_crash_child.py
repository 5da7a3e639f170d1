"""Child process of the SIGKILL test: logs heavily from several threads until it is killed.

After each *critical* emit returns, it prints the record id on stdout and flushes: a printed id
is an acknowledged critical event, which must be in the log whatever happens next.
Usage: python audit_crash_child.py LOG_PATH  (the token comes from AUDIT_TEST_TOKEN)
"""

from __future__ import annotations

import os
import sys
import threading

from vram_residency.audit import SEAL_VERIFICATION_FAILED, VRAM_ALLOCATED, AuditLog


def main() -> None:
    path = sys.argv[1]
    log = AuditLog(
        path,
        token=os.environ["AUDIT_TEST_TOKEN"],
        worker_id="child",
        max_bytes=256 * 1024,  # rotate often, so a kill can land in a rotation too
        batch_bytes=64 * 1024,
        flush_interval=0.05,
    )
    out_lock = threading.Lock()

    def spin(t: int) -> None:
        i = 0
        while True:
            i += 1
            if i % 8 == 0:
                rec = log.emit(
                    SEAL_VERIFICATION_FAILED,
                    shard_id=f"t{t}-{i}",
                    expected_digest="a" * 64,
                    actual_digest="b" * 64,
                    corrupted_ranges=[[0, 4096]],
                )
                with out_lock:
                    sys.stdout.write(rec.id + "\n")
                    sys.stdout.flush()
            else:
                log.emit(VRAM_ALLOCATED, shard_id=f"t{t}-{i}", vram_bytes=i, pad="x" * (i % 200))

    sys.stdout.write("READY\n")
    sys.stdout.flush()
    for t in range(3):
        threading.Thread(target=spin, args=(t,), daemon=True).start()
    spin(3)


if __name__ == "__main__":
    main()
