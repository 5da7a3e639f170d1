"""Entry point of the ``vram-residency`` command.

Each subcommand lives in its own module under ``vram_residency.cli`` with two functions:
``register(subparsers) -> None`` adds its parser and sets ``func`` (taking the parsed namespace and
returning an exit code). Adding a command is one line in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import signal
import sys
import traceback
from types import FrameType
from typing import Final

from vram_residency import __version__
from vram_residency.errors import VramError

_COMMANDS = [
    "vram_residency.cli.digest",
    "vram_residency.cli.demo",
    "vram_residency.cli.seal",
    "vram_residency.cli.manifest",
    "vram_residency.cli.serve",
    "vram_residency.cli.attest",
    "vram_residency.audit.cli",
]


#: Exit statuses of every command. The verifiers (attest, audit verify) keep 1 for a failed
#: check only, so that a script can tell "tampered or refused" from "called wrongly" and from a bug.
EXIT_INTERNAL: Final = 70  # EX_SOFTWARE (sysexits.h)
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, as a shell reports it
EXIT_TERMINATED: Final = 143  # 128 + SIGTERM

EXIT_STATUS_HELP: Final = """\
exit status:
  0    success
  1    a check failed, or the input was refused (one line on stderr; audit prints
       on stdout): seal or manifest mismatch, a worker refused, late or not
       answering (attest), a broken audit log (audit verify), an unreadable or
       invalid file
  2    usage: a bad option or value; for attest and audit verify also a token, log,
       anchor, seals or nonce file they cannot use (there 1 is a failed check only)
  70   internal error: a bug (the traceback on stderr)
  130  interrupted (SIGINT)
  143  terminated (SIGTERM). Either way the command unwinds first: device memory
       is zeroed and freed, and no manifest is left half-written.
serve drains on SIGTERM or SIGINT and exits 0; 1 if its start or its shutdown failed;
3 with --exit-on-stop once the worker entered Stopped (a seal failure, a CUDA/driver
error), after the same shutdown (docs/worker-api.md).
"""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt so that every ``with``
    unwinds: killed outright, a seal never zeroes the device memory it filled."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vram-residency",
        description="Keep model weights resident in VRAM, sealed, and verified on the GPU.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vram-residency {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug information")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        # File names are bytes: one that is not UTF-8 arrives as lone surrogates, and a strict
        # UTF-8 stdout (any UTF-8 locale but C/POSIX) raised UnicodeEncodeError printing it.
        # Written back as its own bytes, as coreutils do.
        sys.stdout.reconfigure(errors="surrogateescape")
    if sys.stdout is None and args.command != "serve":
        # File descriptor 1 closed (`>&-`): Python then drops every print() silently, and a
        # digest or seal would "succeed" with its result lost. (The worker only prints a banner.)
        print("vram-residency: standard output is closed; the result would be lost", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command != "serve":  # the worker drains on SIGTERM its own way
        signal.signal(signal.SIGTERM, _terminate)
    try:
        rc: int = args.func(args)
    except VramError as exc:
        print(f"vram-residency: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # A file the command had to read or write (an output directory that vanished, a full
        # disk): one line naming it, not a traceback. Programming errors still show theirs.
        where = f" {exc.filename}" if exc.filename else ""
        print(f"vram-residency: cannot use{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except _Terminated:
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:
        # A bug: the traceback is what a report needs, and the status is not 1, which the
        # verifiers use for a failed check.
        traceback.print_exc()
        print("vram-residency: internal error (a bug; please report the traceback above)", file=sys.stderr)
        return EXIT_INTERNAL
    return rc


if __name__ == "__main__":
    sys.exit(main())
