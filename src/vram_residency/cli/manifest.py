"""``vram-residency manifest --out OUT FILES...``: write the expected digests of a model.

The manifest (``vram-residency-manifest-v1``, see ``vram_residency.sources.manifest``) records
each file's size and digest under every chosen algorithm, and the model digest that
``vram-residency seal`` / ``VramManager.seal_files`` will bind when sealing exactly these files
in this order. Pass it back as ``--manifest`` (or ``manifest=``) to refuse any other bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from vram_residency.cli._args import output_path
from vram_residency.cli._output import digest_line
from vram_residency.errors import InvalidInput
from vram_residency.formats.tree import ALGORITHMS
from vram_residency.sources.index import resolve_model_files, total_size
from vram_residency.sources.manifest import Manifest, build_manifest, write_manifest


def _not_an_input(out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse to write the manifest over a file it describes (``manifest -o w.bin w.bin``
    replaced the weights with their own manifest), under any name: a symlink, a hard link."""
    for p in inputs:
        with contextlib.suppress(OSError):  # what does not exist yet cannot be overwritten
            if os.path.samefile(out, p):
                raise InvalidInput(f"{out} is one of the model files ({p}); write the manifest elsewhere")


def make_manifest(files: Sequence[str], out: str, algorithms: Sequence[str], name: str | None) -> Manifest:
    """Build and write the manifest, with a progress bar on a terminal. Shared with ``digest``."""
    err = Console(stderr=True, highlight=False)
    paths = files[0] if len(files) == 1 else list(files)
    resolved = resolve_model_files(paths)
    _not_an_input(out, [*files, *(f.path for f in resolved)])
    total = total_size(resolved)
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    with progress:
        task = progress.add_task("digesting", total=total)
        manifest = build_manifest(paths, algorithms, name=name, progress=lambda n: progress.advance(task, n))
    write_manifest(manifest, out)
    return manifest


def _run(args: argparse.Namespace) -> int:
    algorithms = args.algorithm or ["sha256-tree-v1"]
    manifest = make_manifest(args.files, args.out, algorithms, args.name)
    for entry in manifest.files:
        for alg, dig in entry.digests.items():
            print(digest_line(dig, alg, entry.name))
    for alg, dig in manifest.model_digests.items():
        print(digest_line(dig, alg, f"(model {manifest.name}, {len(manifest.files)} files)"))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "manifest",
        help="write a manifest of per-file and per-model digests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "files", nargs="+", metavar="FILE", help="model file(s), a checkpoint directory or its index"
    )
    p.add_argument(
        "-o",
        "--out",
        required=True,
        metavar="OUT",
        type=output_path,
        help="where to write the manifest (JSON)",
    )
    p.add_argument(
        "-a",
        "--algorithm",
        action="append",
        choices=ALGORITHMS,
        help="digest algorithm; repeat for both (default: sha256-tree-v1)",
    )
    p.add_argument("--name", help="model name recorded in the manifest (default: the directory's)")
    p.set_defaults(func=_run)
