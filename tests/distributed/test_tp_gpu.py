"""The distributed tests on real GPUs: NCCL ranks, one per GPU, CUDA backend (needs 2 GPUs).

Run on the lent nvidia-h200-x2 with NVLink multicast off::

    NCCL_NVLS_ENABLE=0 VRAM_RESIDENCY_REQUIRE_GPU=1 .venv/bin/python -m pytest tests/distributed/test_tp_gpu.py -v
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _gpus() -> int:
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


@pytest.fixture
def two_gpus() -> None:
    if _gpus() < 2:
        if os.environ.get("VRAM_RESIDENCY_REQUIRE_GPU") == "1":
            pytest.fail(f"needs 2 GPUs, found {_gpus()}")
        pytest.skip(f"needs 2 GPUs, found {_gpus()}")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


NCCL = {"pg": "nccl", "vram": "cuda"}


@pytest.mark.parametrize("transport", ["gloo", "group"])
def test_nccl_corrupted_rank_named_on_every_rank(
    two_gpus: None, group_dir: Path, launch: Callable[..., Any], transport: str
) -> None:
    g = launch("corrupt", 2, group_dir, {**NCCL, "transport": transport, "bad_rank": 1, "size": 8 << 20})
    g.wait(180)
    res = g.results()
    for r in (0, 1):
        assert res[r]["first_verify"] == "passed"
        inc = res[r]["incident"]
        assert inc["failing_ranks"] == [1] and inc["tensors"] == {"1": ["layers.2.rank1.weight"]}
        assert inc["local"] is (r == 1)


def test_nccl_tp_decoder_equals_single_gpu_decoder(
    two_gpus: None, group_dir: Path, launch: Callable[..., Any]
) -> None:
    pytest.importorskip("cupy", reason="the CUDA executors need CuPy")
    g = launch("decoder", 2, group_dir, NCCL)
    g.wait(300)
    res = g.results()
    for r in (0, 1):
        assert res[r]["tokens"] == res[0]["ref_tokens"]
        np.testing.assert_allclose(res[r]["logits"], res[0]["ref_logits"], rtol=1e-3, atol=1e-4)


def test_nccl_rank_killed_mid_verify_others_stop(
    two_gpus: None, group_dir: Path, launch: Callable[..., Any]
) -> None:
    import signal
    import time

    g = launch("loop", 2, group_dir, {**NCCL, "timeout": 5.0, "size": 64 << 20})
    try:
        deadline = time.monotonic() + 120
        while g.progress(1) < 3:
            assert time.monotonic() < deadline and g.procs[1].poll() is None, g.log(1)
            time.sleep(0.05)
        os.kill(g.procs[1].pid, signal.SIGKILL)
        g.procs[0].wait(40)
    finally:
        g.kill()
    res = g.results([0])
    assert res[0]["incident"]["type"] == "RankUnresponsive"
    assert res[0]["stuck_s"] < 7.0
