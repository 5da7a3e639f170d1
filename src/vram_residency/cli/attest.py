"""``vram-residency attest``: ask workers, with fresh nonces, what their shards are now, and check
the answers (attest-v1) in one command.

For each worker: ``GET /worker/ready`` gives its id and seal records (each tag checked with the
token), or ``--seals`` gives the records this orchestrator kept; a nonce is issued for that
worker (``--nonce-store`` keeps them across runs, so a replayed answer is refused even later);
``POST /worker/attest`` asks for exactly those shards; ``check_attestation`` runs every check of
the spec, with the probes recomputed from ``--files`` when given.

Several workers are asked concurrently, at most ``--concurrency`` at a time. One line per worker:
worker | verdict | age | time taken. The exit status is 0 only if every worker answered in time
with an accepted statement; 1 if any did not; 2 if no worker was asked (a bad option, an
unusable token file, URL, --seals, --workers-file or --nonce-store).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vram_residency._regularfile import read_regular
from vram_residency._tokenfile import read_token_file
from vram_residency.attest import (
    AttestationRefused,
    NonceStore,
    WorkerRateLimited,
    check_attestation,
    fetch_seal_records,
    request_attestation,
)
from vram_residency.cli._args import integer_in, output_path, positive
from vram_residency.errors import ConfigError, InvalidInput, VramError

__all__ = ["FleetRow", "attest_fleet", "register"]

#: The most bytes read from --seals or --workers-file: far more than any fleet's records or URLs,
#: and a bound on what a wrong path (a disk image, a log) can make this command load.
_MAX_FILE_BYTES = 64 << 20
#: The longest --timeout and --max-delay-ms: a day (a socket timeout must fit the platform's time).
_DAY_S = 86_400.0
_EXIT_USAGE = 2


@dataclass(frozen=True, slots=True)
class FleetRow:
    url: str
    worker_id: str
    verdict: str  # "ok", or what went wrong: "REFUSED (check N: ...)", "NO ANSWER: ...", ...
    ok: bool
    age_ns: int | None
    seconds: float


def _load_seals(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(read_regular(path, _MAX_FILE_BYTES).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # deep nesting: RecursionError
        raise InvalidInput(f"cannot read seal records from {path}: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("seals"), list):
        doc = doc["seals"]  # a saved /worker/ready answer
    elif isinstance(doc, dict):
        doc = [doc]  # one record
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise InvalidInput(f"{path}: expected a seal record, a list of them, or a /worker/ready answer")
    return doc


def _match_files(files: Sequence[str], records: list[dict[str, Any]]) -> dict[str, str]:
    """``SHARD_ID=PATH`` entries name their shard; a bare PATH goes to the one shard of the same
    size among this worker's records (none: not this worker's file; several: say which)."""
    out: dict[str, str] = {}
    ids = {r["shard_id"] for r in records}
    for spec in files:
        shard, sep, path = spec.partition("=")
        if sep and shard.startswith("shard-"):
            if shard in ids:
                out[shard] = path
            continue
        try:
            size = os.stat(spec).st_size
        except OSError as exc:
            raise InvalidInput(f"cannot read model file {spec!r}: {exc.strerror}") from None
        same = [r["shard_id"] for r in records if r.get("vram_bytes") == size]
        if len(same) > 1:
            raise InvalidInput(f"{spec!r} matches several shards by size; name it as SHARD_ID={spec}")
        if same:
            out[same[0]] = spec
    return out


def attest_one(
    url: str,
    token: str,
    store: NonceStore,
    *,
    held: list[dict[str, Any]] | None,
    files: Sequence[str],
    probe: bool,
    max_delay_ns: int,
    timeout: float,
) -> FleetRow:
    t0 = time.perf_counter()
    worker_id = ""
    try:
        worker_id, shown = fetch_seal_records(url, token, timeout=timeout)
        records = shown if held is None else [r for r in held if r.get("worker_id") == worker_id]
        if not records:
            raise InvalidInput(f"no seal records held for worker {worker_id!r}")
        deadline = time.monotonic() + timeout
        while True:
            # A fresh nonce per attempt: the delay check counts from each nonce's issue.
            issued = store.issue(worker_id)
            try:
                doc = request_attestation(
                    url,
                    token,
                    issued.nonce,
                    shard_ids=[r["shard_id"] for r in records],
                    probe=probe or bool(files),
                    timeout=max(0.001, deadline - time.monotonic()),
                )
                break
            except WorkerRateLimited as exc:
                # The worker bounds its attestation rate; wait as it says while time is left.
                if time.monotonic() + exc.retry_after_s >= deadline:
                    raise
                time.sleep(exc.retry_after_s)
        res = check_attestation(
            doc,
            token,
            issued.nonce,
            records,
            issued.issued_at_ns,
            max_delay_ns,
            _match_files(files, records),
            nonces=store,
            worker_id=worker_id,
            probe=probe,
        )
        verdict = "ok" + (f" (probed {len(res.probed)})" if res.probed else "")
        return FleetRow(url, worker_id, verdict, True, res.age_ns, time.perf_counter() - t0)
    except AttestationRefused as exc:
        what = "LATE" if exc.check == 3 else "REFUSED"
        return FleetRow(url, worker_id, f"{what} ({exc})", False, None, time.perf_counter() - t0)
    except VramError as exc:
        return FleetRow(url, worker_id, f"NO ANSWER ({exc})", False, None, time.perf_counter() - t0)


def attest_fleet(
    urls: Sequence[str],
    token: str,
    store: NonceStore,
    *,
    held: list[dict[str, Any]] | None = None,
    files: Sequence[str] = (),
    probe: bool = False,
    max_delay_ns: int = 30 * 10**9,
    timeout: float = 30.0,
    concurrency: int = 8,
) -> list[FleetRow]:
    """Attest every worker, at most ``concurrency`` at a time; one row per worker, in order."""
    if concurrency < 1:
        raise InvalidInput("concurrency must be at least 1")
    with ThreadPoolExecutor(max_workers=min(concurrency, max(1, len(urls)))) as pool:
        futures = [
            pool.submit(
                attest_one,
                u,
                token,
                store,
                held=held,
                files=files,
                probe=probe,
                max_delay_ns=max_delay_ns,
                timeout=timeout,
            )
            for u in urls
        ]
        return [f.result() for f in futures]


def _fmt_age(ns: int | None) -> str:
    if ns is None:
        return "-"
    return f"{ns / 1e6:.1f} ms" if ns < 10**10 else f"{ns / 1e9:.1f} s"


def print_table(rows: Sequence[FleetRow], out: Any = None) -> None:
    out = out or sys.stdout
    head = ("worker", "verdict", "age", "time taken")
    table = [
        (f"{r.worker_id or '?'} {r.url}", r.verdict, _fmt_age(r.age_ns), f"{r.seconds * 1e3:.1f} ms")
        for r in rows
    ]
    widths = [max(len(head[i]), *(len(t[i]) for t in table)) if table else len(head[i]) for i in range(4)]
    for line in (head, tuple("-" * w for w in widths), *table):
        print(" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip(), file=out)


def _urls(args: argparse.Namespace) -> list[str]:
    urls = list(args.url)
    if args.workers_file is not None:
        try:
            lines = read_regular(args.workers_file, _MAX_FILE_BYTES).decode("utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.workers_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"cannot read {args.workers_file}: not UTF-8 text") from None
        urls += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not urls:
        raise InvalidInput("name at least one worker URL (arguments or --workers-file)")
    for u in urls:
        _check_url(u)
    return urls


def _check_url(url: str) -> None:
    """A base URL http.client can send: printable ASCII (a non-ASCII or spaced URL was a
    traceback from inside http.client), http or https, a host, a valid port."""
    if not url.startswith(("http://", "https://")):
        raise InvalidInput(f"worker URL must start with http:// or https://: {url!r}")
    if any(not 0x21 <= ord(c) <= 0x7E for c in url):
        raise InvalidInput(f"worker URL must be printable ASCII without spaces: {url!r}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # ValueError when out of range
    except ValueError as exc:
        raise InvalidInput(f"worker URL {url!r} is malformed: {exc}") from None
    if not parts.hostname or port == 0:
        raise InvalidInput(f"worker URL names no host and port: {url!r}")


def _run(args: argparse.Namespace) -> int:
    try:
        token = read_token_file(args.token_file)  # the one reader: same checks as serve and audit
        urls = _urls(args)
        held = _load_seals(args.seals) if args.seals is not None else None
        store = NonceStore(args.nonce_store)
    except (ConfigError, InvalidInput) as exc:
        # No worker was asked: exit 2 (usage), as audit verify does, so that 1 only ever means
        # a worker refused, answered late or did not answer.
        print(f"vram-residency: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    rows = attest_fleet(
        urls,
        token,
        store,
        held=held,
        files=args.files or (),
        probe=args.probe,
        max_delay_ns=int(args.max_delay_ms * 1e6),
        timeout=args.timeout,
        concurrency=args.concurrency,
    )
    if args.json:
        print(json.dumps([_row_json(r) for r in rows]))
    else:
        print_table(rows)
    return 0 if all(r.ok for r in rows) else 1


def _row_json(r: FleetRow) -> dict[str, Any]:
    return {
        "url": r.url,
        "worker_id": r.worker_id,
        "ok": r.ok,
        "verdict": r.verdict,
        "age_ns": r.age_ns,
        "seconds": r.seconds,
    }


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "attest",
        help="ask workers for a nonce-bound attestation (attest-v1) and check it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", nargs="*", help="worker base URL(s), e.g. http://127.0.0.1:8321")
    p.add_argument("--workers-file", type=Path, help="more worker URLs, one per line ('#' comments)")
    p.add_argument("--token-file", type=Path, required=True, help="the worker token (the fleet's)")
    p.add_argument("--probe", action="store_true", help="ask for the nonce-keyed BLAKE3 probes")
    p.add_argument(
        "--files",
        nargs="+",
        metavar="FILE",
        help="model files to recompute the probes from (implies --probe): SHARD_ID=PATH, or PATH "
        "matched to the shard of the same size",
    )
    p.add_argument(
        "--seals",
        type=Path,
        help="seal records this orchestrator kept (a record, a list, or a saved /worker/ready); "
        "default: the records each worker shows, tags checked with the token",
    )
    p.add_argument(
        "--nonce-store", type=output_path, help="file that keeps issued and used nonces across runs"
    )
    p.add_argument(
        "--max-delay-ms",
        type=positive(_DAY_S * 1e3, "ms"),
        default=30_000.0,
        help="latest accepted attested_at after the nonce was issued (default 30000)",
    )
    p.add_argument(
        "--timeout",
        type=positive(_DAY_S, "s"),
        default=30.0,
        help="seconds to wait for each answer (default 30)",
    )
    p.add_argument(
        "--concurrency", type=integer_in(1, 1024), default=8, help="workers asked at once (default 8)"
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.set_defaults(func=_run)
