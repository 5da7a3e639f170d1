"""Where the port A/B's pageable seals lose their 1-2% (issue 10): a diagnostic, one process.

Six interleaved port A/B runs on nvidia-h200-x2 (bench/results/port-ab-2026-11-30-{f..k}) agree
within 1% on every pinned seal, verify and hash figure, but the pageable seals of 64 MiB and more
came out below 1.0 on average: the geometric mean of the per-round new/old ratios, over 76
rounds, was 0.976 to 0.999 by row (standard error about 0.6%). With rounds spread +-5-10%, one
row of the 32 fell below 0.97 in three runs of four. The two trees' pageable path is the same
code: 16 threads copy each 64 MiB chunk into a pinned staging buffer (``parallel_copy``), then
one asynchronous copy per chunk, with the unit kernels launched as chunks land. What differs:
cuda.core calls (events, stream waits, launches) around each chunk, and each side's own staging
buffers, allocated the first time it seals from pageable memory (old first, in the A/B).

This separates the two, in the A/B's process layout (both backends, the same pinned buffers and
pageable source, pinned to the GPU's NUMA node), round after round with the order alternating:
- ``memcpy``: the staging copy alone, ``parallel_copy`` with one shared pool of 16 threads into
  each side's staging buffers (no GPU work): if one side's buffers are slower to write, it is
  their pages, not the code;
- ``seal``: ``write_and_hash`` from the pageable source (64 MiB, 1 GiB), with the time spent in
  ``parallel_copy`` counted apart from the rest (what the host does around the copies);
- ``swapped``: the same seals after the two sides exchange their staging buffers: a gap that
  follows the buffers is the buffers';
- ``new first``: both sides' staging freed and made again, the new side's first, then the
  memcpy and seals again: a gap that follows the order of allocation is the allocator's;
- each buffer's memory mapping from /proc/self/smaps (page size, transparent huge pages).

    python3 bench/staging_ab.py --old .portab/old --new . --out DIR [--rounds 20]

Writes ``DIR/staging-ab-DATE.json`` and prints a table. Not a gpu-check step: a one-off."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import port_ab
from port_ab import OLD_ALIAS, SIDES, GiB, MiB, log

SEAL_SIZES = (64 * MiB, GiB)
ALG = "sha256-tree-v1"


def smaps_range(addr: int, size: int, smaps: str | None = None) -> dict[str, Any]:
    """How the pages of ``[addr, addr + size)`` are backed, from /proc/self/smaps: the mappings
    (VMAs) that overlap it (the kernel splits one allocation into several when parts differ, as
    transparent huge pages make them), their pathnames and page sizes, and the sums of their size
    fields in kB (of the whole mappings, which may reach past the range)."""
    text = smaps if smaps is not None else Path("/proc/self/smaps").read_text()
    sums: dict[str, int] = {}
    paths: set[str] = set()
    pages: set[int] = set()
    vmas = 0
    inside = False
    for line in text.splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            lo, _, hi = head[0].partition("-")
            try:
                start, end = int(lo, 16), int(hi, 16)
            except ValueError:
                inside = False
                continue
            inside = start < addr + size and addr < end
            if inside:
                vmas += 1
                paths.add(head[5] if len(head) > 5 else "")
        elif inside and len(head) >= 2 and head[0].endswith(":") and head[1].isdigit():
            key = head[0][:-1]
            if key == "KernelPageSize":
                pages.add(int(head[1]))
            elif key in ("Size", "Rss", "AnonHugePages", "Locked"):
                sums[key] = sums.get(key, 0) + int(head[1])
    return {"vmas": vmas, "paths": sorted(paths), "kernel_page_kB": sorted(pages), **sums}


@contextmanager
def copy_timer(module: Any, spent: list[float]) -> Iterator[None]:
    """``module.parallel_copy`` (the name ``_backend`` calls) timed into ``spent`` for the block."""
    original = module.parallel_copy

    def timed(*args: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        try:
            original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    module.parallel_copy = timed
    try:
        yield
    finally:
        module.parallel_copy = original


def time_memcpy(
    pool: ThreadPoolExecutor,
    copy: Callable[..., None],
    dst: npt.NDArray[np.uint8],
    src: npt.NDArray[np.uint8],
) -> float:
    """Median seconds of ``copy(pool, dst, src, 16)`` over 8 repetitions after one warm-up."""
    return port_ab.median_time(lambda: copy(pool, dst, src, 16), 8)[0]


def time_seal(be: Any, module: Any, buf: Any, src: npt.NDArray[np.uint8], size: int) -> tuple[float, float]:
    """Median seconds of a pageable seal of ``size`` bytes, and the median seconds of it spent in
    ``parallel_copy`` (all its chunks)."""
    reps = port_ab.reps_for(size)
    view = src[:size].data
    be.write_and_hash(buf, view, ALG)  # warm-up (graphs, staging)
    totals: list[float] = []
    copies: list[float] = []
    for _ in range(reps):
        spent: list[float] = []
        with copy_timer(module, spent):
            t0 = time.perf_counter()
            be.write_and_hash(buf, view, ALG)
            totals.append(time.perf_counter() - t0)
        copies.append(sum(spent))
    return statistics.median(totals), statistics.median(copies)


def staging_of(be: Any) -> list[Any]:
    return [pinned for pinned, _event in be._staging]


def swap_staging(a: Any, b: Any) -> None:
    """Exchange the two backends' staging buffers, each keeping its own events (a raw CUevent in
    the old tree, a cuda.core Event in the new). Both trees' PinnedHostBuffer have ``array`` and
    ``address``, all ``_copy_in`` uses."""
    sa, sb = a._staging, b._staging
    a._staging = [(pb, ea) for (_pa, ea), (pb, _eb) in zip(sa, sb, strict=True)]
    b._staging = [(pa, eb) for (pa, _ea), (_pb, eb) in zip(sa, sb, strict=True)]


def drop_staging(be: Any) -> None:
    """Free ``be``'s staging buffers and copy threads; its next pageable seal makes new ones. Their
    events are left to the garbage collector (a raw CUevent of the old tree leaks: one-off)."""
    for pinned, _event in be._staging:
        pinned.close()
    be._staging = []
    if be._copy_pool is not None:
        be._copy_pool.shutdown()
        be._copy_pool = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--new", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=port_ab._arg_type(port_ab._positive_int), default=20)
    ap.add_argument(
        "--host-bytes",
        type=port_ab.parse_size,
        default=16 * GiB,
        help="each side's pinned buffer and the pageable source, as the A/B allocates them",
    )
    ap.add_argument("--device", type=int, default=0)
    args = ap.parse_args(argv)
    started = time.monotonic()
    cpus = port_ab.gpu_local_cpus(args.device)
    if cpus:
        os.sched_setaffinity(0, cpus)
    res: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "old_revision": port_ab.tree_revision(args.old),
        "new_revision": port_ab.tree_revision(args.new),
        "cpus": sorted(os.sched_getaffinity(0)),
        "rounds": [],
        "swapped_rounds": [],
        "new_first_rounds": [],
    }
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    res["thp"] = thp.read_text().strip() if thp.exists() else None
    with tempfile.TemporaryDirectory(prefix="staging-ab-") as tmp:
        port_ab.import_both(args.old, args.new, Path(tmp))
        mods = {
            "old": importlib.import_module(f"{OLD_ALIAS}.backends.cuda._backend"),
            "new": importlib.import_module("vram_residency.backends.cuda._backend"),
        }
        backends: dict[str, Any] = {}
        pinned: dict[str, Any] = {}
        bufs: dict[tuple[str, int], Any] = {}
        pool = ThreadPoolExecutor(16, thread_name_prefix="staging-ab")
        try:
            # The A/B's order: each side's backend and pinned buffer (old first), the pageable
            # source filled, the device buffers; staging comes with each side's first pageable
            # seal, old first.
            pageable = port_ab.open_sides(args.device, args.host_bytes, backends, pinned)
            for side in SIDES:
                for size in SEAL_SIZES:
                    bufs[side, size] = backends[side].allocate(size)
            for side in SIDES:
                backends[side].write_and_hash(bufs[side, 64 * MiB], pageable[: 64 * MiB].data, ALG)

            def mappings() -> dict[str, Any]:
                smaps = Path("/proc/self/smaps").read_text()
                found: dict[str, Any] = {
                    side: {
                        "staging": [
                            smaps_range(p.address, p.size, smaps) for p in staging_of(backends[side])
                        ],
                        "pinned": smaps_range(pinned[side].address, args.host_bytes, smaps),
                    }
                    for side in SIDES
                }
                found["pageable"] = smaps_range(int(pageable.ctypes.data), args.host_bytes, smaps)
                for side in SIDES:
                    for m in found[side]["staging"]:
                        log(f"  {side} staging {m}")
                return found

            log(f"set up in {time.monotonic() - started:.1f} s; THP {res['thp']}")
            res["mappings"] = mappings()
            log(f"  pageable {res['mappings']['pageable']}")
            copy = mods["new"].parallel_copy
            src64 = pageable[: 64 * MiB]

            def one_round(r: int, swapped: bool) -> dict[str, Any]:
                row: dict[str, Any] = {"round": r}
                for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                    be = backends[side]
                    if not swapped:
                        row[f"{side}_memcpy_GBps"] = [
                            64 * MiB / time_memcpy(pool, copy, p.array[: 64 * MiB], src64) / 1e9
                            for p in staging_of(be)
                        ]
                    for size in SEAL_SIZES:
                        total, in_copy = time_seal(be, mods[side], bufs[side, size], pageable, size)
                        row[f"{side}_{size >> 20}MiB"] = {
                            "GBps": size / total / 1e9,
                            "copy_s": in_copy,
                            "rest_s": total - in_copy,
                            "chunks": -(-size // (64 * MiB)),
                        }
                log(json.dumps(row))
                return row

            for r in range(args.rounds):
                res["rounds"].append(one_round(r, swapped=False))
            swap_staging(backends["old"], backends["new"])
            try:
                for r in range(args.rounds):
                    res["swapped_rounds"].append(one_round(r, swapped=True))
            finally:
                swap_staging(backends["old"], backends["new"])
            # Staging made again, the new side's first this time: a gap that follows the order of
            # allocation is the allocator's, not either tree's.
            for side in SIDES:
                drop_staging(backends[side])
            for side in SIDES[::-1]:
                backends[side].write_and_hash(bufs[side, 64 * MiB], pageable[: 64 * MiB].data, ALG)
            log("staging made again, new first")
            res["mappings_new_first"] = mappings()
            for r in range(args.rounds):
                res["new_first_rounds"].append(one_round(r, swapped=False))
        finally:
            pool.shutdown()
            port_ab.close_sides(bufs, pinned, backends)
    res["seconds"] = time.monotonic() - started
    summary = summarize(res)
    res["summary"] = summary
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"staging-ab-{res['date']}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    for line in summary:
        log(line)
    log(f"wrote {out}")
    return 0


def summarize(res: dict[str, Any]) -> list[str]:
    """A few lines: per figure, the median over rounds of new/old."""
    lines = []

    def ratio(rounds: list[dict[str, Any]], get: Callable[[dict[str, Any], str], float]) -> str:
        rs = [get(r, "new") / get(r, "old") for r in rounds]
        return f"{statistics.median(rs):.3f} (rounds {min(rs):.3f}..{max(rs):.3f})"

    for name, rounds in (("", res["rounds"]), (" (made new first)", res.get("new_first_rounds", []))):
        if rounds:
            lines.append(
                f"memcpy into staging{name}, new/old: "
                + ratio(rounds, lambda r, s: float(statistics.median(r[f"{s}_memcpy_GBps"])))
            )

    def gbps(key: str) -> Callable[[dict[str, Any], str], float]:
        return lambda r, s: float(r[f"{s}_{key}"]["GBps"])

    for size in SEAL_SIZES:
        key = f"{size >> 20}MiB"
        for name, rounds in (
            ("own staging", res["rounds"]),
            ("swapped staging", res["swapped_rounds"]),
            ("own staging made new first", res.get("new_first_rounds", [])),
        ):
            if not rounds:
                continue
            lines.append(
                f"seal {key} pageable ({name}), new/old GB/s: "
                + ratio(rounds, gbps(key))
                + "; rest (not copying) ms old/new: "
                + f"{statistics.median(r[f'old_{key}']['rest_s'] for r in rounds) * 1e3:.3f}/"
                + f"{statistics.median(r[f'new_{key}']['rest_s'] for r in rounds) * 1e3:.3f}"
                + "; copying ms old/new: "
                + f"{statistics.median(r[f'old_{key}']['copy_s'] for r in rounds) * 1e3:.3f}/"
                + f"{statistics.median(r[f'new_{key}']['copy_s'] for r in rounds) * 1e3:.3f}"
            )
    return lines


if __name__ == "__main__":
    sys.exit(main())
