"""``vram-residency digest FILE...``: stream files and print their digests.

``--algorithm nh-fast-v1`` is the keyed fast check (docs/specs/nh-fast-v1.md): its key is derived
from the worker token and the shard id, so it needs ``--token-file`` and ``--shard-id`` (the
``shard_id`` of the seal record) and takes exactly one FILE; the printed digest is what a worker
holding that token sealed, or attested as ``digest_now``, for that shard."""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import sys
from pathlib import Path
from typing import Final

from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from vram_residency._regularfile import open_regular
from vram_residency.cli._args import output_path
from vram_residency.cli._output import digest_line
from vram_residency.errors import InvalidInput
from vram_residency.formats.stream import StreamHasher
from vram_residency.formats.tree import ALGORITHMS, NH_FAST_V1, SHA256_TREE_V1, HashResult

_CHUNK = 64 << 20
_PROGRESS_FROM = 256 << 20


def hash_file(path: Path, algorithm: str = SHA256_TREE_V1, *, show_progress: bool = False) -> HashResult:
    """Digest a file by streaming it in 64 MiB pieces (host memory stays bounded)."""
    if path.is_dir():
        raise InvalidInput(f"{path} is a directory")
    try:
        # Regular files only: a FIFO would block, /dev/zero never ends (and has size 0).
        f = open_regular(path)
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


def keyed_hash_file(path: Path, token: str | bytes, shard_id: str) -> HashResult:
    """nh-fast-v1 of a file under shard ``shard_id``'s key from ``token`` (on the host, native
    where built; the file is memory-mapped, so host memory is the page cache, not a copy)."""
    from vram_residency.formats import keys, nhfast

    key = nhfast.shard_key(nhfast.manager_key(keys.token_bytes(token)), shard_id)
    if path.is_dir():
        raise InvalidInput(f"{path} is a directory")
    try:
        # Regular files only: a FIFO would block, /dev/zero never ends (and has size 0).
        f = open_regular(path)
    except OSError as exc:
        raise InvalidInput(f"cannot open {path}: {exc.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            dig, units = nhfast.hash_units(b"", key)
            return HashResult(dig, units)
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot map {path}: {exc}") from None
        try:
            view = memoryview(mm)
            try:
                dig, units = nhfast.hash_units(view, key)
            finally:
                view.release()
        except BaseException:
            # An interrupt (Ctrl-C) inside the hash: views made there live on in the traceback,
            # and closing the map under them raises BufferError over the real error. The map
            # goes with the last view.
            with contextlib.suppress(BufferError):
                mm.close()
            raise
        mm.close()
        return HashResult(dig, units)


_EXIT_USAGE: Final = 2


def _usage(message: str) -> int:
    """Options that do not go together: a usage error, exit 2, as the CLI's help says of a bad
    option (1 is a digest that could not be made or a file refused)."""
    print(f"vram-residency digest: error: {message}", file=sys.stderr)
    return _EXIT_USAGE


def _run_keyed(args: argparse.Namespace) -> int:
    from vram_residency._tokenfile import read_token_file

    if not args.token_file or not args.shard_id:
        return _usage(
            "nh-fast-v1 is keyed by the worker token and the shard id: give --token-file and "
            "--shard-id (the seal record's shard_id)"
        )
    if len(args.files) != 1:
        return _usage("nh-fast-v1 is keyed per shard: give exactly one FILE with its --shard-id")
    if args.manifest:
        return _usage("manifests record unkeyed digests; nh-fast-v1 cannot be written to one")
    token = read_token_file(args.token_file)
    name = args.files[0]
    res = keyed_hash_file(Path(name), token, args.shard_id)
    print(digest_line(res.digest.hex(), args.algorithm, name))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.algorithm == NH_FAST_V1:
        return _run_keyed(args)
    if args.token_file or args.shard_id:
        return _usage("--token-file and --shard-id apply to --algorithm nh-fast-v1 only")
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
        print(digest_line(res.digest.hex(), args.algorithm, name))
    return rc


def _run_manifest(args: argparse.Namespace) -> int:
    # All files or none: a manifest that silently lacks an unreadable file would be worse than
    # no manifest. Errors propagate (InvalidInput -> exit 1 with the message).
    from vram_residency.cli.manifest import make_manifest

    manifest = make_manifest(args.files, args.manifest, [args.algorithm], None)
    for entry in manifest.files:
        print(digest_line(entry.digests[args.algorithm], args.algorithm, entry.name))
    print(f"wrote manifest {args.manifest}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("digest", help="print the digest of files (streamed; any size)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-a", "--algorithm", choices=(*ALGORITHMS, NH_FAST_V1), default=SHA256_TREE_V1)
    p.add_argument(
        "--token-file",
        metavar="PATH",
        help="worker token file: required by nh-fast-v1 (keyed), refused by the other algorithms",
    )
    p.add_argument("--shard-id", metavar="ID", help="the seal record's shard_id: required by nh-fast-v1")
    p.add_argument(
        "--manifest",
        metavar="OUT",
        type=output_path,
        help="also write a manifest of the files' and the model's digests under --algorithm to OUT "
        "(for both algorithms: the 'manifest' command)",
    )
    p.set_defaults(func=_run)
