#!/usr/bin/env python3
"""Host throughput of nh-fast-v1 against the ``blake3`` package: same file, same threads.

Issue 15's host target: ours (``tree.hash_units(..., "nh-fast-v1", key=...)``: native leaf tags,
then keyed BLAKE3 of the tags per unit and of the unit digests) >= 1.5 x ``blake3.blake3`` with
``max_threads`` = the number of cores, both over the same page-cached file read through mmap.
In-memory numbers are shown beside them. One random file, each repetition runs every method once
in turn, medians are reported; measurements start on a quiet machine and are discarded and taken
again when other processes used more than --quiet of the cores meanwhile (the helpers of
``bench/host_digest.py``).

    .venv/bin/python bench/nhfast_host.py [--size-mib 512] [--reps 5]

Writes bench/results/nhfast-host-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import mmap
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import blake3

from vram_residency.formats import _nhfast_native, nhfast, tree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_digest import _cores, _cpu_flags, _cpu_model, _time, _wait_quiet, _write_random_file

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the temporary file")
    ap.add_argument("--quiet", type=float, default=0.1)
    ap.add_argument("--max-wait", type=float, default=20.0)
    ap.add_argument("--attempts", type=int, default=6)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    size = args.size_mib << 20
    cores = _cores()
    key = bytes(range(32))
    native_reason = _nhfast_native.unavailable_reason()
    with tempfile.TemporaryDirectory(prefix="nhfast-host-", dir=args.dir) as tmp:
        path = Path(tmp, "weights.bin")
        print(f"writing {size} random bytes to {path}", file=sys.stderr)
        _write_random_file(path, size)
        buf = path.read_bytes()
        view = memoryview(buf)

        def from_file(fn: Callable[[memoryview], bytes]) -> bytes:
            with (
                open(path, "rb") as f,
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m,
                memoryview(m) as mv,
            ):
                return fn(mv)

        def ours(v: memoryview) -> bytes:
            return tree.hash_units(v, tree.NH_FAST_V1, key=key, threads=cores).digest

        def b3(v: memoryview) -> bytes:
            return blake3.blake3(v, max_threads=cores).digest()

        sched = nhfast.key_schedule(key)

        def tags_only(v: memoryview) -> bytes:
            return nhfast.leaf_tags(v, sched, cores)

        methods: dict[str, Callable[[], object]] = {
            "blake3_package_file": lambda: from_file(b3),
            "ours_nh_fast_v1_file": lambda: from_file(ours),
            "blake3_package_memory": lambda: b3(view),
            "ours_nh_fast_v1_memory": lambda: ours(view),
            "ours_leaf_tags_only_memory": lambda: tags_only(view),
        }
        assert from_file(ours) == ours(view)
        for fn in methods.values():
            fn()
        times: dict[str, list[float]] = {k: [] for k in methods}
        foreign: dict[str, list[float]] = {k: [] for k in methods}
        discarded = dict.fromkeys(methods, 0)
        waited = 0.0
        for rep in range(args.reps):
            for name, fn in methods.items():
                for attempt in range(args.attempts):
                    waited += _wait_quiet(cores, args.quiet, args.max_wait)
                    wall, load = _time(fn, cores)
                    if load < args.quiet or attempt == args.attempts - 1:
                        break
                    discarded[name] += 1
                times[name].append(wall)
                foreign[name].append(load)
            print(
                f"rep {rep + 1}/{args.reps}: "
                + "  ".join(f"{k}={size / v[-1] / 1e9:.2f}" for k, v in times.items()),
                file=sys.stderr,
            )

    gbps = {k: size / statistics.median(v) / 1e9 for k, v in times.items()}
    ratio_file = gbps["ours_nh_fast_v1_file"] / gbps["blake3_package_file"]
    ratio_mem = gbps["ours_nh_fast_v1_memory"] / gbps["blake3_package_memory"]
    now = dt.datetime.now(dt.UTC)
    flags = _cpu_flags()
    result: dict[str, Any] = {
        "benchmark": "nhfast-host",
        "date": now.isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": _cpu_model(),
            "cores": cores,
            "avx2": "avx2" in flags,
            "avx512f": "avx512f" in flags,
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "versions": {
            "blake3": metadata.version("blake3"),
            "vram_residency": metadata.version("vram-residency"),
        },
        "setup": {
            "file_bytes": size,
            "repetitions": args.reps,
            "threads_both": cores,
            "statistic": "median of wall time per method; GB/s = 1e9 bytes/s",
            "native_nh_fast": native_reason is None,
            "native_unavailable_reason": native_reason,
            "native_path": _nhfast_native.path_name() if native_reason is None else None,
            "quiet_threshold": args.quiet,
            "seconds_waited_for_quiet": round(waited, 1),
            "discarded_noisy_measurements": discarded,
        },
        "throughput_gbps": {k: round(v, 3) for k, v in gbps.items()},
        "throughput_gbps_min_max": {
            k: [round(size / max(v) / 1e9, 3), round(size / min(v) / 1e9, 3)] for k, v in times.items()
        },
        "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "foreign_load_median": {k: round(statistics.median(v), 3) for k, v in foreign.items()},
        "acceptance": {
            "ours_over_blake3_file": round(ratio_file, 3),
            "ours_over_blake3_memory": round(ratio_mem, 3),
            "target": TARGET,
            "pass": ratio_file >= TARGET,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"nhfast-host-{now.date().isoformat()}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(_markdown(result))
    print(_markdown(result))
    print(f"wrote {args.out / stem}.json and .md", file=sys.stderr)
    return 0 if result["acceptance"]["pass"] else 1


def _markdown(r: dict[str, Any]) -> str:
    m, s, a, g, mm, fl = (
        r["machine"],
        r["setup"],
        r["acceptance"],
        r["throughput_gbps"],
        r["throughput_gbps_min_max"],
        r["foreign_load_median"],
    )
    labels = {
        "blake3_package_file": (
            f"blake3 package {r['versions']['blake3']}, max_threads={s['threads_both']}, file (mmap)"
        ),
        "ours_nh_fast_v1_file": f"ours: nh-fast-v1, threads={s['threads_both']}, file (mmap)",
        "blake3_package_memory": "blake3 package, in memory",
        "ours_nh_fast_v1_memory": "ours: nh-fast-v1, in memory",
        "ours_leaf_tags_only_memory": "ours: native leaf tags only (context)",
    }
    lines = [
        f"# nh-fast-v1 host throughput, {r['date']}",
        "",
        f"- CPU: {m['cpu_model']}, {m['cores']} cores, AVX2 {m['avx2']}, AVX-512F {m['avx512f']}",
        f"- Python {m['python']}; native nh-fast-v1: {s['native_nh_fast']} (path {s['native_path']})",
        f"- File: {s['file_bytes']} random bytes, page-cached; {s['repetitions']} repetitions, medians; "
        f"measurements start with other load < {s['quiet_threshold']:.0%} "
        f"(waited {s['seconds_waited_for_quiet']} s, "
        f"discarded {sum(s['discarded_noisy_measurements'].values())})",
        "",
        "| method | GB/s (median) | min .. max | other load |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k, v in g.items():
        lines.append(f"| {labels.get(k, k)} | {v:.2f} | {mm[k][0]:.2f} .. {mm[k][1]:.2f} | {fl[k]:.0%} |")
    lines += [
        "",
        "| acceptance | measured | target | pass |",
        "| --- | ---: | ---: | :---: |",
        f"| ours / blake3 package, same file, same threads | {a['ours_over_blake3_file']:.2f} "
        f"| >= {a['target']:.2f} | {'yes' if a['pass'] else 'NO'} |",
        f"| ours / blake3 package, in memory (context) | {a['ours_over_blake3_memory']:.2f} | | |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
