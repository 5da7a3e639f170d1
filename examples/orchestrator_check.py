"""What an orchestrator runs: check a worker's seal records with the token it issued.

    python examples/orchestrator_check.py TOKEN_FILE RECORDS.json

RECORDS.json holds one seal record or a list of them (as `vram-residency seal` prints, or as the
service's GET /worker/ready returns under "models"). Exit status 0 when every record's tag holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vram_residency import SealVerificationFailed, VramError, check_seal_record


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    token = Path(argv[0]).read_text(encoding="utf-8").strip()
    data = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    records = data if isinstance(data, list) else [data]
    bad = 0
    for record in records:
        try:
            shard = check_seal_record(record, token)
        except SealVerificationFailed:
            bad += 1
            print(f"FORGED OR EDITED: {record.get('shard_id')!r}")
        except VramError as exc:
            bad += 1
            print(f"MALFORMED: {exc}")
        else:
            print(f"ok: {shard.shard_id} {shard.vram_bytes} bytes {shard.digest_algorithm} {shard.digest}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
