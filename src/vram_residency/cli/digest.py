"""``vram-residency digest FILE...``: stream files and print their digests."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from vram_residency.cli._args import output_path
from vram_residency.errors import InvalidInput
from vram_residency.formats.stream import StreamHasher
from vram_residency.formats.tree import ALGORITHMS, SHA256_TREE_V1, HashResult

_CHUNK = 64 << 20
_PROGRESS_FROM = 256 << 20


def hash_file(path: Path, algorithm: str = SHA256_TREE_V1, *, show_progress: bool = False) -> HashResult:
    """Digest a file by streaming it in 64 MiB pieces (host memory stays bounded)."""
    if path.is_dir():
        raise InvalidInput(f"{path} is a directory")
    try:
        f = path.open("rb", buffering=0)
    except OSError as exc:
        raise InvalidInput(f"cannot open {path}: {exc.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        hasher = StreamHasher(algorithm)
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            transient=True,
            disable=not show_progress or size < _PROGRESS_FROM,
            console=None,
        )
        with progress:
            task = progress.add_task(path.name, total=size)
            while True:
                try:
                    got = f.readinto(view)
                except OSError as exc:
                    raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
                if not got:
                    break
                hasher.update(view[:got])
                progress.advance(task, got)
        return hasher.finalize()


def _run(args: argparse.Namespace) -> int:
    if args.manifest:
        return _run_manifest(args)
    rc = 0
    for name in args.files:
        try:
            res = hash_file(Path(name), args.algorithm, show_progress=sys.stderr.isatty())
        except InvalidInput as exc:
            print(f"vram-residency digest: {exc}", file=sys.stderr)
            rc = 1
            continue
        print(f"{res.digest.hex()}  {args.algorithm}  {name}")
    return rc


def _run_manifest(args: argparse.Namespace) -> int:
    # All files or none: a manifest that silently lacks an unreadable file would be worse than
    # no manifest. Errors propagate (InvalidInput -> exit 1 with the message).
    from vram_residency.cli.manifest import make_manifest

    manifest = make_manifest(args.files, args.manifest, [args.algorithm], None)
    for entry in manifest.files:
        print(f"{entry.digests[args.algorithm]}  {args.algorithm}  {entry.name}")
    print(f"wrote manifest {args.manifest}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("digest", help="print the digest of files (streamed; any size)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-a", "--algorithm", choices=ALGORITHMS, default=SHA256_TREE_V1)
    p.add_argument(
        "--manifest",
        metavar="OUT",
        type=output_path,
        help="also write a manifest of the files' and the model's digests to OUT "
        "(both algorithms: the 'manifest' command)",
    )
    p.set_defaults(func=_run)
