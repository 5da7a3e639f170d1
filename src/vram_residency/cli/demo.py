"""``vram-residency demo``: seal a sample, verify it, flip one bit, show the detection."""

from __future__ import annotations

import argparse
import json
import secrets
import time

from rich.console import Console

from vram_residency.cli._args import device_ordinal, mib
from vram_residency.errors import SealVerificationFailed
from vram_residency.manager import VramManager
from vram_residency.testing import flip_bit


def _run(args: argparse.Namespace) -> int:
    out = Console(highlight=False, soft_wrap=True)
    size = max(1, int(args.size_mib * (1 << 20)))
    # A throwaway token: the demo's seals mean nothing outside this process.
    token = secrets.token_urlsafe(32)
    with VramManager(token, args.device, backend=args.backend, worker_id="demo") as mgr:
        out.print(f"[bold]backend[/]: {mgr.backend_description}")
        sample = secrets.token_bytes(size)
        t0 = time.perf_counter()
        shard = mgr.seal_model(sample, model_ref="demo-sample", digest_algorithm=args.algorithm)
        t1 = time.perf_counter()
        out.print(f"sealed {size} bytes as {shard.shard_id} in {1e3 * (t1 - t0):.1f} ms")
        out.print(f"  {shard.digest_algorithm} {shard.digest}")
        mgr.verify_sealed(shard)
        t2 = time.perf_counter()
        out.print(f"[green]verified[/] from device memory in {1e3 * (t2 - t1):.1f} ms")
        bit = secrets.randbelow(8 * size)
        flip_bit(mgr, shard, bit)
        out.print(f"flipped bit {bit} (byte {bit // 8}) behind the seal's back")
        try:
            mgr.verify_sealed(shard)
        except SealVerificationFailed as exc:
            out.print("[bold red]detected[/]: SealVerificationFailed")
            out.print(f"  expected {exc.expected_digest}")
            out.print(f"  actual   {exc.actual_digest}")
            for start, end in exc.corrupted_ranges:
                hit = "contains the flipped byte" if start <= bit // 8 < end else "UNEXPECTED"
                out.print(f"  changed bytes in [{start}, {end}): {hit}")
        else:
            out.print("[bold red]the flip was NOT detected[/]")
            return 1
        out.print("seal record (for the orchestrator):")
        out.print(json.dumps(shard.record(), indent=2))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="seal a random sample, verify, flip a bit, show the detection")
    p.add_argument(
        "--size-mib",
        type=mib(65536),
        default=64.0,
        help="sample size in MiB (default 64, max 65536)",
    )
    p.add_argument("--backend", choices=("auto", "cuda", "host"), default="auto")
    p.add_argument("--device", type=device_ordinal, default=0, help="GPU ordinal (default 0)")
    p.add_argument("-a", "--algorithm", choices=("sha256-tree-v1", "blake3"), default="sha256-tree-v1")
    p.set_defaults(func=_run)
