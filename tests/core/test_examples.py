"""The runnable examples in examples/, run as real processes so that they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vram_residency import VramManager

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOKEN = "example-test-token-0123456789abcdef"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_seal_safetensors_example() -> None:
    out = run(str(EXAMPLES / "seal_safetensors.py"))
    assert out.returncode == 0, out.stderr
    assert "detected: changed bytes [(2097152, 3145728)] in tensors ['embed.weight']" in out.stdout
    assert "verified with the original seal" in out.stdout


def test_orchestrator_example(tmp_path: Path) -> None:
    with VramManager(TOKEN, backend="host", worker_id="w") as mgr:
        records = [mgr.seal_model(b"weights" * 1000, model_ref="m").record() for _ in range(2)]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    good = tmp_path / "records.json"
    good.write_text(json.dumps(records))
    out = run(str(EXAMPLES / "orchestrator_check.py"), str(token_file), str(good))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok: shard-") == 2
    records[1]["vram_bytes"] += 1
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(records))
    out = run(str(EXAMPLES / "orchestrator_check.py"), str(token_file), str(bad))
    assert out.returncode == 1
    assert "FORGED OR EDITED" in out.stdout
