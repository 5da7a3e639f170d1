"""``vram-residency seal FILE...``: stream model files into device memory, seal, verify, print.

One FILE is sealed as one shard; several FILEs, a directory of a sharded checkpoint or its
``*.safetensors.index.json`` are sealed as one ``vram-model-v1`` model. The seals are then
verified from device memory and printed as JSON on stdout; progress and throughput go to stderr.
The memory is freed when the command exits: this shows and measures sealing, it does not keep a
model resident (the worker service does that).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from vram_residency._tokenfile import read_token_file
from vram_residency.cli._args import device_ordinal
from vram_residency.errors import InvalidInput
from vram_residency.formats.tree import SEAL_ALGORITHMS, SHA256_TREE_V1
from vram_residency.manager import VramManager
from vram_residency.sources.index import INDEX_SUFFIX, resolve_model_files, total_size
from vram_residency.sources.layout import FORMATS
from vram_residency.sources.manifest import load_manifest
from vram_residency.sources.model import SealedModel
from vram_residency.sources.stream import MAX_STAGING_BYTES

TOKEN_ENV = "WORKER_API_TOKEN_FILE"  # noqa: S105 - the name of a variable, not a secret


def _token(args: argparse.Namespace, err: Console) -> tuple[bytes | str, bool]:
    path = args.token_file or os.environ.get(TOKEN_ENV)
    if path:
        return read_token_file(path), False
    err.print(
        f"[yellow]no --token-file and no ${TOKEN_ENV}:[/] sealing with an ephemeral token; "
        "nobody can check these seal records after this command exits"
    )
    return secrets.token_urlsafe(32), True


def _is_model(files: list[str]) -> bool:
    return len(files) > 1 or Path(files[0]).is_dir() or files[0].endswith(INDEX_SUFFIX)


def _run(args: argparse.Namespace) -> int:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if args.public_key and not args.manifest:
        # Without a bundle there is no signature to check: sealing anyway would let the user
        # believe the files were checked against the signer's key.
        raise InvalidInput("--public-key checks the signature of a --manifest bundle; no --manifest given")
    token, ephemeral = _token(args, err)
    manifest = load_manifest(args.manifest, public_key=args.public_key) if args.manifest else None
    as_model = _is_model(args.files)
    files = resolve_model_files(args.files if as_model else args.files[0])
    total = total_size(files)
    staging = int(args.staging_mib * (1 << 20))
    out: dict[str, Any]
    model: SealedModel | None = None
    with VramManager(token, args.device, backend=args.backend, worker_id=args.worker_id) as mgr:
        err.print(f"backend: {mgr.backend_description}")
        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        )
        t0 = time.perf_counter()
        with progress:
            task = progress.add_task("sealing", total=total)

            copied = 0

            def advance(n: int) -> None:
                nonlocal copied
                copied += n
                progress.advance(task, n)
                if copied >= total:
                    # Copying is done; the digest of the device memory follows before the seal.
                    progress.update(task, description="digesting in device memory")

            common: dict[str, Any] = {
                "format": args.format,
                "manifest": manifest,
                "digest_algorithm": args.algorithm,
                "progress": advance,
                "staging_bytes": staging,
            }
            if as_model:
                model = mgr.seal_files(args.files, model_name=args.model_name, **common)
                shards = list(model.shards)
            else:
                shard = mgr.seal_file(args.files[0], model_ref=args.model_name, **common)
                shards = [shard]
        t1 = time.perf_counter()
        for s in shards:
            mgr.verify_sealed(s)
        if model is not None:
            model.check_binding()
        t2 = time.perf_counter()
        sealed = sum(s.vram_bytes for s in shards)
        err.print(
            f"sealed {sealed} bytes in {len(shards)} shard(s) in {t1 - t0:.2f} s "
            f"({sealed / max(t1 - t0, 1e-9) / 2**30:.2f} GiB/s); verified from device memory in "
            f"{t2 - t1:.2f} s ({sealed / max(t2 - t1, 1e-9) / 2**30:.2f} GiB/s)"
        )
        out = {
            "backend": mgr.backend,
            "backend_description": mgr.backend_description,
            "ephemeral_token": ephemeral,
            "verified": True,
            "records": [s.record() for s in shards],
            "model": model.record() if model is not None else None,
        }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _staging_mib(text: str) -> float:
    # Named for argparse's message on a non-number; NaN fails the range check (every comparison
    # with it is False), infinity its upper bound.
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= v * (1 << 20) <= MAX_STAGING_BYTES:
        raise argparse.ArgumentTypeError(
            f"staging must be at least 1 byte and at most {MAX_STAGING_BYTES >> 20} MiB"
        )
    return v


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "seal",
        help="stream model files into device memory, seal, verify, print the seal records",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "files", nargs="+", metavar="FILE", help="model file(s), a checkpoint directory or its index"
    )
    p.add_argument("--format", choices=FORMATS, default="auto", help="file format (default: by name/magic)")
    p.add_argument("-a", "--algorithm", choices=SEAL_ALGORITHMS, default=SHA256_TREE_V1)
    p.add_argument(
        "--manifest", metavar="PATH", help="expected digests: a vram-residency manifest or OpenSSF bundle"
    )
    p.add_argument(
        "--public-key", metavar="PEM", help="public key that signed an OpenSSF model-signing bundle"
    )
    p.add_argument("--token-file", metavar="PATH", help=f"worker token file (default: ${TOKEN_ENV})")
    p.add_argument("--backend", choices=("auto", "cuda", "host"), default="auto")
    p.add_argument("--device", type=device_ordinal, default=0, help="GPU ordinal (default 0)")
    p.add_argument("--worker-id", default="", help="worker id recorded in the seals")
    p.add_argument("--model-name", help="model name (several files) or model_ref (one file)")
    p.add_argument(
        "--staging-mib", type=_staging_mib, default=128.0, help="host staging memory in MiB (max 256)"
    )
    p.set_defaults(func=_run)
