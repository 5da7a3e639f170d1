"""``examples/pool_manager.py`` against a real ``serve``: plan -> commit -> ready -> execute ->
drain, with the contract's shapes only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.service.serve_process import clean_env, run_serve
from vram_residency.formats.tree import SHA256_TREE_V1
from vram_residency.service.executors.example_model import EXAMPLE_NAMES, ensure_example

NEEDS_MINILM = False
_EXAMPLE = Path(__file__).parents[2] / "examples" / "pool_manager.py"


def test_the_pool_manager_example_drives_a_worker_through_its_life(tmp_path: Path) -> None:
    name = EXAMPLE_NAMES["small"]
    gen = ensure_example(tmp_path / "models" / name, "small", SHA256_TREE_V1)
    w = run_serve(tmp_path / "w", "--model-dir", str(tmp_path / "models"))
    r = subprocess.run(
        [
            sys.executable,
            str(_EXAMPLE),
            "--url",
            w.url,
            "--token-file",
            str(tmp_path / "w" / "worker.token"),
            "--model-ref",
            name,
            "--model-path",
            str(gen.directory / "model.safetensors"),
            "--pid",
            str(w.proc.pid),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "plan: feasible=True" in out and "commit: sealed=True handle=shard-0" in out
    assert "ready: ready=True handles=['shard-0']" in out and "execute: " in out and "drain: " in out
    assert w.proc.wait(60) == 0
    assert "stopped (shards zeroed and freed)" in w.log()
