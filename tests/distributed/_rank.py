"""One rank of a test group: run as a separate process by tests/distributed (never collected).

    python _rank.py SCENARIO RANK WORLD INIT_METHOD OUTDIR [ARGS as JSON]

Writes OUTDIR/result-RANK.json with what this rank saw; the tests compare every rank's file.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from safetensors.numpy import save_file

from vram_residency import VramManager
from vram_residency.distributed import RankUnresponsive, TPIncident, TPModel, TPVerificationFailed
from vram_residency.testing import flip_bit

TOKEN = "distributed-test-token-0123456789"


class ListAudit:
    """An audit sink that keeps the events in order (the real AuditLog writes files)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event_type: str, *, critical: bool | None = None, **fields: Any) -> None:
        self.events.append({"event": event_type, "critical": bool(critical), **fields})


def _part_file(out: Path, rank: int, size: int) -> tuple[Path, dict[str, tuple[int, int]]]:
    """A safetensors file of this rank's tensors (distinct per rank), and each tensor's bytes."""
    rng = np.random.default_rng([7, rank])
    n = max(size // 4 // 4, 1)
    tensors = {f"layers.{i}.rank{rank}.weight": rng.standard_normal(n, dtype=np.float32) for i in range(4)}
    path = out / f"part-{rank}.safetensors"
    save_file(tensors, str(path))
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    base = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    spans = {
        k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }
    return path, spans


def _incident(exc: TPIncident) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "failing_ranks": list(exc.failing_ranks),
        "tensors": {str(k): v for k, v in getattr(exc, "tensors", {}).items()},
        "local": exc.local,
        "message": str(exc),
    }


DECODER_PROMPTS = ["hello, tensor parallel world", "x"]
DECODER_TOKENS = 24


def _decoder(mgr: VramManager, rank: int, world: int, out: Path, audit: ListAudit) -> dict[str, Any]:
    """The TP decoder on this rank's sealed part; rank 0 also runs the single-process ByteLM on
    the whole model (sealed the same way) for the test to compare against."""
    from vram_residency.distributed import TPByteLM, split_byte_lm
    from vram_residency.service.executor import DeviceMemory, ModelFiles, SealedWeights, Token
    from vram_residency.service.executors.decoder import ByteLM, ByteLMConfig
    from vram_residency.service.executors.example_model import file_image

    # Heads must divide by the world size: 4 heads for 2 and 4 ranks, 8 for 8 ranks (issue 16).
    heads = 8 if world > 4 else 4
    cfg = ByteLMConfig(hidden_size=64, num_layers=2, num_heads=heads, intermediate_size=128, max_position=256)
    image = file_image(cfg)
    paths = split_byte_lm(image, cfg, world, out / f"parts-{rank}")
    shard = mgr.seal_file(paths[rank])
    tp = TPModel.seal(mgr, [shard], model_name="byte-lm-tp", token=TOKEN, audit=audit)
    res: dict[str, Any] = {}
    lm = TPByteLM(mgr, shard, cfg, rank=rank, world=world)
    try:
        tp.verify()
        res["tokens"] = [lm.generate(p.encode(), DECODER_TOKENS) for p in DECODER_PROMPTS]
        res["logits"] = lm.logits([256, *DECODER_PROMPTS[0].encode()]).tolist()
        res["all_reduces"] = lm.all_reduces
    finally:
        lm.close()
    if rank == 0:
        full = mgr.seal_model(image)
        files = ModelFiles(name="ref", weights=paths[0], format="safetensors", root=out)
        buf = mgr.device_buffer(full)
        host = buf.host_view() if mgr.capabilities.host_view else None
        dev = None if host is not None else DeviceMemory(buf.device_pointer, len(image), mgr.device, buf)
        weights = SealedWeights(files, mgr.backend, len(image), host_memory=host, device_memory=dev)
        ref = ByteLM(weights, cfg)
        try:
            toks: list[list[int]] = [[] for _ in DECODER_PROMPTS]
            jobs = [ref.prepare(p, DECODER_TOKENS) for p in DECODER_PROMPTS]
            for job, ids in zip(jobs, toks, strict=True):

                def sink(_job: int, token: Token, ids: list[int] = ids) -> None:
                    ids.append(token.id)

                ref.run_streaming([job], sink)
            res["ref_tokens"] = toks
            res["ref_logits"] = ref.logits([256, *DECODER_PROMPTS[0].encode()]).tolist()
        finally:
            ref.close()
    return res


def main() -> int:
    scenario, rank, world, init, outdir = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        sys.argv[4],
        sys.argv[5],
    )
    args: dict[str, Any] = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    out = Path(outdir)
    result: dict[str, Any] = {"rank": rank}
    timeout = float(args.get("timeout", 5.0))
    pg, vram = args.get("pg", "gloo"), args.get("vram", "host")
    if pg == "nccl":
        import torch

        torch.cuda.set_device(rank)
    dist.init_process_group(pg, init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=30))
    audit = ListAudit()
    incidents: list[str] = []
    try:
        with VramManager(TOKEN, device=rank, backend=vram, worker_id=f"w{rank}") as mgr:
            if scenario == "decoder":
                result.update(_decoder(mgr, rank, world, out, audit))
            else:
                path, spans = _part_file(out, rank, int(args.get("size", 1 << 16)))
                shard = mgr.seal_file(path)
                tp = TPModel.seal(
                    mgr,
                    [shard],
                    model_name="test-model",
                    token=TOKEN,
                    timeout_s=timeout,
                    verdict_transport=args.get("transport", "gloo"),
                    audit=audit,
                    on_incident=lambda e: incidents.append(type(e).__name__),
                )
                result["record"] = tp.record.record()
                tp.verify()
                result["first_verify"] = "passed"
                if scenario == "corrupt":
                    bad = int(args["bad_rank"])
                    if rank == bad:
                        name = f"layers.2.rank{rank}.weight"
                        # The middle of the tensor: localization is per 1 MiB unit, and the tensors are 2 MiB.
                        flip_bit(mgr, shard, 8 * ((spans[name][0] + spans[name][1]) // 2) + 3)
                    dist.barrier()
                    try:
                        tp.verify()
                        result["second_verify"] = "passed"
                    except TPVerificationFailed as exc:
                        result["incident"] = _incident(exc)
                        result["state"] = tp.state
                    try:
                        tp.verify()
                    except TPVerificationFailed as exc:
                        result["again"] = type(exc).__name__  # stopped: raises again, no collective
                elif scenario == "loop":
                    progress = out / f"progress-{rank}"
                    start = time.monotonic()
                    n = 0
                    try:
                        while time.monotonic() - start < 60:
                            t0 = time.monotonic()
                            tp.verify()
                            n += 1
                            progress.write_text(str(n))
                    except RankUnresponsive as exc:
                        result["incident"] = _incident(exc)
                        result["stuck_s"] = time.monotonic() - t0
                        result["state"] = tp.state
                    result["verifies"] = n
    except Exception:
        result["error"] = traceback.format_exc()
    result["audit"] = [e for e in audit.events if e["event"] != "TPVerified"]
    result["callbacks"] = incidents
    (out / f"result-{rank}.json").write_text(json.dumps(result))
    # A group with a dead peer cannot shut down cleanly; the result is written, so leave now.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
