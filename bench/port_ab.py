#!/usr/bin/env python3
"""Same-run A/B of the CUDA backend's port to cuda.core (issue 10): the raw-driver backend (the
old tree, ``scripts/portab-prepare`` puts it in ``.portab/old``) and this tree's backend, measured
alternately on one machine in one run, so that a difference between them is not a difference
between two lent machines or two days (bench/compare_gpu.py compares against a file measured
elsewhere; host-bound figures such as pageable H2D move more than 3% between machines).

Each measurement is a separate process that imports one tree's ``vram_residency`` only (two
trees' packages cannot share one interpreter: they have the same name). The processes run in the
order old, new, new, old, old, new, ... (``--rounds`` pairs), so a slow drift of the machine
(clocks, heat, page cache, neighbours) falls on both sides alike. With ``--budget-s`` (seconds for
the whole run; a lent GPU machine's call is bounded) more rounds follow, two at a time, while the
slowest process so far says they fit: more processes per side narrow the spread between them.

``--mode rows`` (default, about 25-35 s a process with the 16 GiB shard): each process opens the
tree's backend, fills pinned and pageable host memory as gpu_bench.py does, and times
``write_and_hash`` (seal from pinned and from pageable memory), ``digest`` (verify) and ``hash``
(hash with unit digests) the way ``gpu_bench.measure_one`` does: same repetitions, one warm-up,
the median of each process's repetitions. The seal digests of every process must agree.

``--mode interleaved`` (gpu-check's default): one process imports both trees, the old one under
another name (``alias_tree``: a copy of its package with the package name rewritten in its
sources), opens both backends on the device and measures every row with each side in turn, round
after round, the side that goes first flipping from row to row and round to round. Separate
processes differ in where their host memory lies and which cores they run on: their 1 MiB
pageable seals spread by up to 35% from process to process (port-ab-2026-11-30-e), more than the
3% the target allows between medians of a few processes. In one process both sides seal the same
pageable array; each keeps its own pinned buffer and device buffers.

``--mode gpu-bench``: each process is the tree's whole ``bench/gpu_bench.py`` (about 60-90 s;
the old one has no flag to measure only the seal and verify rows), and its ``gpu`` rows are read.

The report is, per algorithm, shard size and wall figure (those bench/compare_gpu.py counts), the
median over each side's processes, new / old, and whether that is within the issue's target
(new >= 0.97 x old). Writes port-ab-DATE.json and port-ab-DATE.md to --out; exit code 1 when a
wall figure misses or the digests disagree.

    scripts/portab-prepare
    PYTHONPATH=src python3 bench/port_ab.py --out /tmp/results [--rounds 4] [--sizes 1M,64M,1G,16G] \
        [--mode rows|interleaved|gpu-bench] [--budget-s S]

``pool``: several runs' port-ab-DATE.json files (the same trees, sizes and algorithms; e.g. the
runs of several GPU sessions) summarized as one run of all their processes, each run's rounds
numbered after the previous run's. Writes port-ab-DATE-pooled.json/.md (DATE: the last run's)
and exits as a run does. Pooling adds processes, not a new measurement: the report names its
runs, and each run's own file stays the record of that run.

    python3 bench/port_ab.py pool --out bench/results RUN_A.json RUN_B.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

MiB = 1 << 20
GiB = 1 << 30
SIDES = ("old", "new")
ALGS = ("sha256-tree-v1", "blake3")
DEFAULT_SIZES = (MiB, 64 * MiB, GiB, 16 * GiB)
#: The sizes gpu_bench.py measures (``--quick``: the first three); --mode gpu-bench can report no other.
GPU_BENCH_SIZES = (MiB, 64 * MiB, GiB, 16 * GiB)
#: The wall-clock figures bench/compare_gpu.py holds to the 3% target, in its order.
WALL = ("seal_pinned_GBps", "seal_pageable_GBps", "verify_GBps", "hash_with_units_GBps")
#: Kept in the JSON, not a target: the verify kernels' device time (CUDA events).
DEVICE = ("verify_device_GBps",)
FIGURE_NAMES = {
    "seal_pinned_GBps": "seal pinned",
    "seal_pageable_GBps": "seal pageable",
    "verify_GBps": "verify (wall)",
    "hash_with_units_GBps": "hash + unit digests",
    "verify_device_GBps": "verify (device)",
}
#: Threads that fill and copy each process's host memory (at most; fewer on fewer cores).
FILL_THREADS = 16
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": MiB, "g": GiB}


def log(msg: str) -> None:
    print(msg, flush=True)


# -- arguments ----------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``1M``, ``64MiB``, ``1G``, ``16GiB`` or a byte count; binary units, as gpu_bench's sizes."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (examples: 1M, 64MiB, 1G, 16GiB, 4096)")
    n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return n


def parse_sizes(text: str) -> list[int]:
    """Comma-separated sizes, ascending and without repeats (the order gpu_bench measures in)."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("no sizes given")
    return sorted({parse_size(p) for p in parts})


def parse_algorithms(text: str) -> list[str]:
    algs = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in algs if a not in ALGS]
    if not algs or unknown:
        raise ValueError(f"algorithms must be among {', '.join(ALGS)}; got {text!r}")
    return [a for a in ALGS if a in algs]


def size_name(size: int) -> str:
    return (
        f"{size // GiB} GiB" if size % GiB == 0 else f"{size // MiB} MiB" if size % MiB == 0 else f"{size} B"
    )


def _arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return wrapped


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise ValueError(f"must be at least 1: {text}")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="directory for port-ab-DATE.json/.md")
    ap.add_argument(
        "--old", type=Path, default=Path(".portab/old"), help="the old tree (scripts/portab-prepare)"
    )
    ap.add_argument("--new", type=Path, default=Path("."), help="the new tree (default: this one)")
    ap.add_argument("--mode", choices=("rows", "interleaved", "gpu-bench"), default="rows")
    ap.add_argument(
        "--rounds",
        type=_arg_type(_positive_int),
        default=4,
        help="pairs of processes (old+new); 4 gives each side 4 (default 4)",
    )
    ap.add_argument(
        "--sizes",
        type=_arg_type(parse_sizes),
        default=list(DEFAULT_SIZES),
        help="shard sizes, comma-separated (default 1M,64M,1G,16G)",
    )
    ap.add_argument(
        "--algorithms",
        type=_arg_type(parse_algorithms),
        default=list(ALGS),
        help="comma-separated (default sha256-tree-v1,blake3)",
    )
    ap.add_argument(
        "--budget-s",
        type=_arg_type(_positive_int),
        help="seconds the run may take: after --rounds, more rounds (two at a time, so each side "
        "still goes first as often) while the slowest process so far says they fit",
    )
    ap.add_argument("--within", type=float, default=0.03, help="allowed shortfall of new against old (0.03)")
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--date", default=dt.date.today().isoformat())
    ap.add_argument(
        "--run-timeout",
        type=_arg_type(_positive_int),
        default=400,
        help="seconds one process may take (default 400)",
    )
    ap.add_argument("--python", default=sys.executable, help="interpreter for the processes")
    return ap


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not 0.0 <= args.within < 1.0:
        ap.error(f"--within must be in [0, 1): {args.within}")
    for side in SIDES:
        tree: Path = getattr(args, side)
        if not (tree / "src" / "vram_residency" / "__init__.py").is_file():
            hint = " (make it with scripts/portab-prepare)" if side == "old" else ""
            ap.error(f"--{side} {tree}: no src/vram_residency there{hint}")
        if args.mode == "gpu-bench" and not (tree / "bench" / "gpu_bench.py").is_file():
            ap.error(f"--{side} {tree}: no bench/gpu_bench.py there (needed by --mode gpu-bench)")
    if args.mode == "gpu-bench":
        others = [s for s in args.sizes if s not in GPU_BENCH_SIZES]
        if others:
            ap.error(f"--mode gpu-bench measures only 1M,64M,1G,16G; not {','.join(map(size_name, others))}")
    return args


def alternation(rounds: int) -> list[str]:
    """old, new, new, old, old, new, ...: each round is a pair with one process of each side, and
    the pair's order flips every round, so that a drift over the run falls on both sides alike."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    return [s for r in range(rounds) for s in (SIDES if r % 2 == 0 else SIDES[::-1])]


def another_block(
    rounds_done: int, min_rounds: int, elapsed: float, slowest: float, budget: float | None
) -> bool:
    """Whether to run another round. Always until ``min_rounds``; after that only with a
    ``budget`` (seconds for the whole run), two rounds at a time (old, new, new, old or its
    mirror, so that each side still goes first as often): a block starts when its four processes,
    each as slow as the ``slowest`` so far plus 15%, fit in after ``elapsed``, and a block once
    started is finished. An odd ``min_rounds`` is evened up by one round when its two fit."""
    if rounds_done < min_rounds:
        return True
    if budget is None:
        return False
    odd = rounds_done % 2 == 1
    if odd and rounds_done > min_rounds:
        return True
    need = (2 if odd else 4) * slowest * 1.15
    return elapsed + need <= budget


def _slowest(times: Sequence[float]) -> float:
    """The slowest process so far, leaving out the run's first when there are others: it fills
    host memory the machine has not touched before (24 s against 8-10 s for the rest on an
    nvidia-h200-x2, 2026-11-30), which no later process repeats."""
    rest = times[1:] if len(times) > 1 else times
    return max(rest, default=0.0)


def child_env(tree: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process measuring ``tree``: its ``src`` first on PYTHONPATH, and no
    other directory that holds a ``vram_residency`` package (gpu-check puts the new tree's src on
    PYTHONPATH; the old tree's process must not import that one). Other entries, such as the
    wheels gpu-check installs into /tmp/site, stay."""
    env = dict(os.environ if base is None else base)
    keep = [
        p
        for p in env.get("PYTHONPATH", "").split(os.pathsep)
        if p and not (Path(p) / "vram_residency").is_dir()
    ]
    env["PYTHONPATH"] = os.pathsep.join([str((tree / "src").resolve()), *keep])
    return env


def tree_revision(tree: Path) -> str | None:
    """The commit a tree is at: REVISION (written by scripts/portab-prepare), else git's HEAD,
    with "+changes" when tracked files under src/ or bench/ differ from it; None without
    either."""
    marker = tree / "REVISION"
    if marker.is_file():
        return marker.read_text().strip()
    try:
        out = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    head = out.stdout.strip()
    if not head:
        return None
    # A lent GPU machine's copy of the working tree can carry a .git whose HEAD is older than the
    # files: say so, and src_digest below tells which tree the files were.
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no", "--", "src", "bench"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return head if dirty.returncode == 0 and not dirty.stdout.strip() else f"{head}+changes"


def src_digest(tree: Path) -> str:
    """SHA-256 over the tree's package sources (each file's path under src/ and its bytes, in
    path order; built native libraries, ``*.so``, left out): the same files give the same digest
    on any machine, so a result can be matched to a commit (``git worktree``/``git archive`` of
    it, then this function) whatever its .git. Results written before the ``*.so`` files were
    left out (port-ab-2026-11-30-f to -h) counted the libraries the GPU machine had built."""
    h = hashlib.sha256()
    root = tree / "src"
    for f in sorted(
        p
        for p in root.rglob("*")
        # Native libraries are built on each machine (gpu-check builds them there): not sources.
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".so"
    ):
        rel = f.relative_to(root).as_posix().encode()
        data = f.read_bytes()
        h.update(len(rel).to_bytes(8, "big") + rel + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


# -- one process: one tree's backend -------------------------------------------------------------------


def reps_for(size: int) -> int:
    """gpu_bench.reps_for: the repetitions measure_one times at each size."""
    return 50 if size <= MiB else 20 if size <= 64 * MiB else 5 if size <= GiB else 3


def median_time(fn: Callable[[], Any], reps: int, warmup: int = 1) -> tuple[float, list[float]]:
    """gpu_bench.median_time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _tiles(n: int, tile: int) -> list[tuple[int, int, int]]:
    """(index, offset, length) of ``n`` bytes in ``tile``-byte pieces."""
    return [(i, off, min(tile, n - off)) for i, off in enumerate(range(0, n, tile))]


def _parallel(work: Callable[[tuple[int, int, int]], None], tiles: list[tuple[int, int, int]]) -> None:
    """``work`` on every tile from a few threads: numpy's copies release the GIL, so the 2 x 16 GiB
    of host memory each process fills (and faults in) is written by several cores, not one."""
    threads = max(1, min(FILL_THREADS, os.cpu_count() or 1, len(tiles)))
    if threads == 1:
        for t in tiles:
            work(t)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, tiles))


def fill_random(dst: npt.NDArray[np.uint8], seed: int = 1) -> None:
    """gpu_bench.fill_random (the same bytes, so every process seals the same data and the
    digests of old and new can be compared): a 64 MiB random block tiled, each tile perturbed.
    The tiles are written by several threads; the bytes do not depend on their order."""
    rng = np.random.default_rng(seed)
    block = rng.integers(0, 256, size=min(64 * MiB, len(dst)), dtype=np.uint8)

    def tile(t: tuple[int, int, int]) -> None:
        i, off, m = t
        np.copyto(dst[off : off + m], block[:m])
        dst[off] ^= np.uint8(i & 0xFF)

    _parallel(tile, _tiles(len(dst), len(block)))


def copy_parallel(dst: npt.NDArray[np.uint8], src: npt.NDArray[np.uint8]) -> None:
    """``dst[:] = src`` by several threads (a fresh pageable buffer's first touch included)."""
    if len(dst) != len(src):
        raise ValueError("copy_parallel: lengths differ")

    def tile(t: tuple[int, int, int]) -> None:
        _, off, m = t
        np.copyto(dst[off : off + m], src[off : off + m])

    _parallel(tile, _tiles(len(dst), 64 * MiB))


def import_tree(tree: Path) -> Any:
    """Import ``tree``'s vram_residency and refuse any other: a process that silently measured
    the other tree would report a ratio of 1.0 and pass."""
    src = (tree / "src").resolve()
    sys.path.insert(0, str(src))
    import vram_residency

    found = Path(vram_residency.__file__ or "").resolve()
    if not found.is_relative_to(src):
        raise SystemExit(f"port_ab worker: vram_residency came from {found}, not from {src}")
    return vram_residency


def measure_row(
    backend: Any, pinned: Any, pageable: npt.NDArray[np.uint8], size: int, alg: str
) -> dict[str, Any]:
    """gpu_bench.measure_one's seal, verify and hash timings, in its order, without its extras
    (the graph-switch A/B, the 200-call latency, the host reference digest)."""
    buf = backend.allocate(size)
    try:
        return measure_into(backend, buf, pinned, pageable, size, alg)
    finally:
        buf.close()


def measure_into(
    backend: Any, buf: Any, pinned: Any, pageable: npt.NDArray[np.uint8], size: int, alg: str, tag: str = ""
) -> dict[str, Any]:
    """measure_row's timings into ``buf`` (at least ``size`` bytes of ``backend``), which the
    caller allocated: the interleaved mode keeps one buffer per side and size for all its rounds."""
    row: dict[str, Any] = {"algorithm": alg, "size": size}
    times: dict[str, list[float]] = {}
    reps = reps_for(size)
    src_pinned = pinned.view[:size]
    src_pageable = pageable[:size].data
    sealed = backend.write_and_hash(buf, src_pinned, alg)
    t, times["seal_pinned_s"] = median_time(lambda: backend.write_and_hash(buf, src_pinned, alg), reps)
    row["seal_pinned_GBps"] = size / t / 1e9
    again = backend.write_and_hash(buf, src_pageable, alg)
    t, times["seal_pageable_s"] = median_time(lambda: backend.write_and_hash(buf, src_pageable, alg), reps)
    row["seal_pageable_GBps"] = size / t / 1e9
    if again != sealed:
        raise RuntimeError(f"{alg} {size_name(size)}: seal from pinned and pageable memory disagree")
    dev: list[float] = []

    def verify() -> None:
        if backend.digest(buf, alg) != sealed.digest:
            raise RuntimeError(f"{alg} {size_name(size)}: verify does not give the sealed digest")
        dev.append(backend.last_device_seconds)

    t, times["verify_s"] = median_time(verify, max(reps, 10) if size <= GiB else reps)
    row["verify_GBps"] = size / t / 1e9
    row["verify_device_GBps"] = size / statistics.median(dev) / 1e9
    t, times["hash_with_units_s"] = median_time(lambda: backend.hash(buf, alg), reps)
    row["hash_with_units_GBps"] = size / t / 1e9
    row["digest"] = bytes(sealed.digest).hex()
    # The spread of each process's repetitions (seconds), not every one: the JSON stays the
    # size of the other results in bench/results/.
    row["times"] = {
        k: {"n": len(v), "min": min(v), "median": statistics.median(v), "max": max(v)}
        for k, v in times.items()
    }
    log(
        f"  {tag}{alg:15s} {size_name(size):>7s}  seal pinned {row['seal_pinned_GBps']:7.2f} GB/s  "
        f"pageable {row['seal_pageable_GBps']:6.2f}  verify {row['verify_GBps']:8.1f}  "
        f"hash+units {row['hash_with_units_GBps']:8.1f}"
    )
    return row


def worker_main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="port_ab.py worker", description="one process of the A/B (internal)")
    ap.add_argument("--tree", type=Path, required=True)
    ap.add_argument("--result", type=Path, help="where to write the rows (JSON)")
    ap.add_argument("--sizes", type=_arg_type(parse_sizes), default=list(DEFAULT_SIZES))
    ap.add_argument("--algorithms", type=_arg_type(parse_algorithms), default=list(ALGS))
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument(
        "--import-only",
        action="store_true",
        help="import the tree's package, print where from and which of its modules loaded, exit",
    )
    args = ap.parse_args(argv)
    vr = import_tree(args.tree)
    from vram_residency.backends.cuda import open_backend

    if args.import_only:
        src = (args.tree / "src").resolve()
        loaded = sorted(
            str(Path(f).resolve())
            for m in list(sys.modules.values())
            if (f := getattr(m, "__file__", None)) and Path(f).resolve().is_relative_to(src)
        )
        print(json.dumps({"vram_residency": str(Path(vr.__file__).resolve()), "modules": loaded}))
        return 0
    if args.result is None:
        ap.error("--result is required unless --import-only")
    started = time.perf_counter()
    backend = open_backend(args.device)
    backend.warm_up()
    biggest = max(args.sizes)
    pinned = backend.pinned_host_buffer(biggest)
    try:
        fill_random(pinned.array)
        pageable = np.empty(biggest, dtype=np.uint8)
        copy_parallel(pageable, pinned.array)
        log(
            f"  {backend.describe()} from {Path(vr.__file__).parent}; host memory filled "
            f"in {time.perf_counter() - started:.1f} s"
        )
        rows = [measure_row(backend, pinned, pageable, s, a) for s in args.sizes for a in args.algorithms]
        out = {
            "device": backend.device_name,
            "describe": backend.describe(),
            "rows": rows,
            "seconds": time.perf_counter() - started,
        }
    finally:
        pinned.close()
        backend.close()
    args.result.write_text(json.dumps(out) + "\n")
    return 0


# -- one process: both trees' backends, interleaved ------------------------------------------------

#: The name the old tree's package is imported under in the interleaved process, beside this
#: tree's ``vram_residency``.
OLD_ALIAS = "vram_residency_portab_old"
_PKG_WORD = re.compile(r"\bvram_residency\b")


def alias_tree(tree: Path, dest: Path, name: str = OLD_ALIAS) -> Path:
    """Copy ``tree``'s package to ``dest/name`` with every ``vram_residency`` word of its Python
    sources (its absolute imports, its module names in docstrings and loggers) made ``name``, so
    that one interpreter can import it beside this tree's package; returns ``dest`` (for
    sys.path). Files other than ``.py`` (kernel sources, a built native library) are copied as
    they are: each tree finds them beside its own modules."""
    pkg = tree / "src" / "vram_residency"
    if not (pkg / "__init__.py").is_file():
        raise ValueError(f"{tree}: no src/vram_residency there")
    target = dest / name
    shutil.copytree(pkg, target, ignore=shutil.ignore_patterns("__pycache__"))
    for f in target.rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        renamed = _PKG_WORD.sub(name, text)
        if renamed != text:
            f.write_text(renamed, encoding="utf-8")
    return dest


def import_both(old_tree: Path, new_tree: Path, work: Path) -> tuple[Any, Any]:
    """The old tree's package (as OLD_ALIAS, from a renamed copy under ``work``) and the new
    tree's ``vram_residency``, in this interpreter; refuses (SystemExit) when any loaded module of
    either name came from elsewhere: a side that silently ran the other's code would give 1.0."""
    root = alias_tree(old_tree, work)
    sys.path.insert(0, str(root))
    old = importlib.import_module(OLD_ALIAS)
    importlib.import_module(f"{OLD_ALIAS}.backends.cuda")
    new = import_tree(new_tree)
    importlib.import_module("vram_residency.backends.cuda")
    homes = {OLD_ALIAS: (root / OLD_ALIAS).resolve(), "vram_residency": (new_tree / "src").resolve()}
    for mod_name, mod in list(sys.modules.items()):
        top = mod_name.partition(".")[0]
        f = getattr(mod, "__file__", None)
        if top in homes and f and not Path(f).resolve().is_relative_to(homes[top]):
            raise SystemExit(f"port_ab interleaved: {mod_name} came from {f}, not from {homes[top]}")
    return old, new


def parse_cpulist(text: str) -> set[int]:
    """sysfs's CPU list format: ``0-7,16-23`` (ranges and single CPUs, comma-separated)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _cpulist(cpus: set[int]) -> str:
    """``parse_cpulist``'s inverse: ``0-7,16-23``."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def gpu_local_cpus(device: int) -> set[int] | None:
    """The CPUs of the GPU's own NUMA node (its PCI device's ``local_cpulist`` in sysfs) that this
    process may run on; None when that cannot be told (no driver, no sysfs entry, no overlap)."""
    try:
        from cuda.bindings import driver as cu

        cu.cuInit(0)
        err, dev = cu.cuDeviceGet(device)
        if err != cu.CUresult.CUDA_SUCCESS:
            return None
        err, bus = cu.cuDeviceGetPCIBusId(64, dev)
        if err != cu.CUresult.CUDA_SUCCESS:
            return None
        name = bytes(bus).split(b"\0", 1)[0].decode().lower()
        local = parse_cpulist((Path("/sys/bus/pci/devices") / name / "local_cpulist").read_text())
    except Exception:  # best effort: no driver library (its own error type), no sysfs entry, ...
        return None
    both = local & os.sched_getaffinity(0)
    return both or None


def open_sides(
    device: int, host_bytes: int, backends: dict[str, Any], pinned: dict[str, Any]
) -> npt.NDArray[np.uint8]:
    """Each side's backend (warmed up) and pinned buffer of ``host_bytes``, old first, into
    ``backends`` and ``pinned`` as they are made (the caller closes what is there, also after a
    failure part-way); both pinned buffers hold fill_random's bytes, and so does the pageable
    array returned, the one source both sides seal pageable memory from. After import_both."""
    opened = {
        "old": importlib.import_module(f"{OLD_ALIAS}.backends.cuda").open_backend,
        "new": importlib.import_module("vram_residency.backends.cuda").open_backend,
    }
    for side in SIDES:
        backends[side] = opened[side](device)
        backends[side].warm_up()
        pinned[side] = backends[side].pinned_host_buffer(host_bytes)
    fill_random(pinned["new"].array)
    copy_parallel(pinned["old"].array, pinned["new"].array)
    pageable = np.empty(host_bytes, dtype=np.uint8)
    copy_parallel(pageable, pinned["new"].array)
    return pageable


def close_sides(bufs: dict[Any, Any], pinned: dict[str, Any], backends: dict[str, Any]) -> None:
    """Close what open_sides and the caller made: device buffers, pinned buffers, backends."""
    for buf in bufs.values():
        buf.close()
    for host in pinned.values():
        host.close()
    for backend in backends.values():
        backend.close()


def interleaved_main(argv: Sequence[str]) -> int:
    """``--mode interleaved``: one process opens both trees' backends on one device and measures
    every row with each in turn, round after round, the order flipping from row to row and round
    to round. Each side has its own backend, pinned buffer (the kind its own gpu_bench seals
    from) and device buffers; the pageable source is one array, the same bytes at the same pages
    for both. What differed between two processes (their host memory's pages and NUMA node, the
    cores they ran on, the state of the machine between them) is then the same for both sides;
    only the code differs."""
    ap = argparse.ArgumentParser(prog="port_ab.py interleaved", description="the interleaved A/B (internal)")
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--new", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True)
    ap.add_argument("--sizes", type=_arg_type(parse_sizes), default=list(DEFAULT_SIZES))
    ap.add_argument("--algorithms", type=_arg_type(parse_algorithms), default=list(ALGS))
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--rounds", type=_arg_type(_positive_int), default=4)
    ap.add_argument("--budget-s", type=_arg_type(_positive_int))
    ap.add_argument("--no-pin", action="store_true", help="do not keep the process on the GPU's NUMA node")
    args = ap.parse_args(argv)
    started = time.monotonic()
    # On the GPU's own NUMA node, before any host memory is touched: every thread made later (the
    # backends' staging copiers, the fill) inherits this, so on a host of several nodes both
    # sides' pinned and staging buffers and the pageable source land on the GPU's node, and the
    # main thread cannot move to another node between the old side's first staging allocation
    # and the new side's. (The lent nvidia-h200-x2 machines of 2026-11-30 have one node, so this
    # did not explain run g's 64 MiB pageable seals, 5% apart, new below old in all 12 rounds.)
    cpus = None if args.no_pin else gpu_local_cpus(args.device)
    if cpus:
        os.sched_setaffinity(0, cpus)
    log(f"  CPUs: {'the GPU node' if cpus else 'any'} ({_cpulist(cpus or os.sched_getaffinity(0))})")
    with tempfile.TemporaryDirectory(prefix="port-ab-old-") as tmp:
        old_pkg, new_pkg = import_both(args.old, args.new, Path(tmp))
        backends: dict[str, Any] = {}
        pinned: dict[str, Any] = {}
        bufs: dict[tuple[str, int], Any] = {}
        try:
            pageable = open_sides(args.device, max(args.sizes), backends, pinned)
            for side in SIDES:
                for size in args.sizes:
                    bufs[side, size] = backends[side].allocate(size)
            log(
                f"  old {backends['old'].describe()} from {Path(old_pkg.__file__).parent}; new from "
                f"{Path(new_pkg.__file__).parent}; host memory filled in {time.monotonic() - started:.1f} s"
            )
            runs: list[dict[str, Any]] = []
            round_times: list[float] = []
            rounds = 0
            measuring = time.monotonic()
            while another_block(
                rounds,
                args.rounds,
                time.monotonic() - started,
                # A round is one "process" of each side: another_block's block is two rounds.
                max(round_times, default=0.0) / 2,
                args.budget_s,
            ):
                t0 = time.monotonic()
                rows: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
                spent = dict.fromkeys(SIDES, 0.0)
                log(f"== round {rounds + 1}")
                for j, (size, alg) in enumerate((s, a) for s in args.sizes for a in args.algorithms):
                    for side in SIDES if (rounds + j) % 2 == 0 else SIDES[::-1]:
                        t1 = time.monotonic()
                        be, buf = backends[side], bufs[side, size]
                        row = measure_into(be, buf, pinned[side], pageable, size, alg, f"{side} ")
                        rows[side].append(row)
                        spent[side] += time.monotonic() - t1
                first = SIDES[rounds % 2]
                for k, side in enumerate((first, *(s for s in SIDES if s != first))):
                    runs.append(
                        {
                            "device": backends[side].device_name,
                            "describe": backends[side].describe(),
                            "rows": rows[side],
                            "seconds": spent[side],
                            "wall_s": spent[side],
                            "side": side,
                            "index": 2 * rounds + k,
                            "round": rounds,
                        }
                    )
                round_times.append(time.monotonic() - t0)
                rounds += 1
                log(f"   {round_times[-1]:.1f} s")
            out = {
                "rounds": rounds,
                "runs": runs,
                "measuring_s": time.monotonic() - measuring,
                "cpus": _cpulist(cpus) if cpus else None,
            }
        finally:
            close_sides(bufs, pinned, backends)
    args.result.write_text(json.dumps(out) + "\n")
    return 0


# -- the alternation ---------------------------------------------------------------------------------


class ClockSampler:
    """nvidia-smi's SM clock and power draw every 250 ms while one process runs: a side that ran
    at lower clocks shows it here (the same sampling as gpu_bench.ClockSampler)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self.samples: list[tuple[float, float]] = []

    def __enter__(self) -> ClockSampler:
        smi = shutil.which("nvidia-smi")
        if smi:
            self._proc = subprocess.Popen(
                [smi, "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "250"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        for line in out.splitlines():
            try:
                mhz, watts = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((mhz, watts))

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        return {
            "sm_mhz_median": statistics.median(s[0] for s in self.samples),
            "power_w_median": statistics.median(s[1] for s in self.samples),
        }


def _run(cmd: list[str], env: dict[str, str], timeout: int, what: str) -> float:
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, env=env, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} took more than {timeout} s") from None
    if rc != 0:
        raise RuntimeError(f"{what} failed with exit code {rc} (its output is above)")
    return time.perf_counter() - t0


def _self_command(args: argparse.Namespace, sub: str) -> list[str]:
    """This script's ``sub`` command (``worker``, ``interleaved``) with the run's sizes,
    algorithms and device."""
    return [
        args.python,
        str(Path(__file__).resolve()),
        sub,
        "--sizes",
        ",".join(map(str, args.sizes)),
        "--algorithms",
        ",".join(args.algorithms),
        "--device",
        str(args.device),
    ]


def run_rows(args: argparse.Namespace, side: str, tree: Path, work: Path, index: int) -> dict[str, Any]:
    result = work / f"{index:02d}-{side}.json"
    cmd = [
        *_self_command(args, "worker"),
        "--tree",
        str(tree),
        "--result",
        str(result),
    ]
    wall = _run(cmd, child_env(tree), args.run_timeout, f"{side} run {index}")
    run: dict[str, Any] = json.loads(result.read_text())
    run["wall_s"] = wall
    return run


def run_interleaved(args: argparse.Namespace) -> tuple[list[dict[str, Any]], int]:
    """``--mode interleaved``: the one process of interleaved_main; its runs (a side's rows of one
    round each) and the rounds it measured."""
    with tempfile.TemporaryDirectory(prefix="port-ab-") as tmp:
        result = Path(tmp) / "interleaved.json"
        cmd = [
            *_self_command(args, "interleaved"),
            "--old",
            str(args.old),
            "--new",
            str(args.new),
            "--result",
            str(result),
            "--rounds",
            str(args.rounds),
        ]
        if args.budget_s:
            cmd += ["--budget-s", str(args.budget_s)]
        # The process is bounded by the budget when there is one (plus its last round, which a
        # budget never starts unless it fits), else by --run-timeout for each round.
        timeout = args.budget_s + 60 if args.budget_s else args.run_timeout * args.rounds
        _run(cmd, child_env(args.new), timeout, "the interleaved process")
        out: dict[str, Any] = json.loads(result.read_text())
    args.pinned_cpus = out.get("cpus")
    return list(out["runs"]), int(out["rounds"])


def run_gpu_bench(args: argparse.Namespace, side: str, tree: Path, work: Path, index: int) -> dict[str, Any]:
    out = work / f"{index:02d}-{side}"
    cmd = [
        args.python,
        str(tree / "bench" / "gpu_bench.py"),
        "--out",
        str(out),
        "--date",
        args.date,
        "--device",
        str(args.device),
    ]
    if max(args.sizes) <= GiB:
        cmd.append("--quick")
    wall = _run(cmd, child_env(tree), args.run_timeout, f"{side} gpu_bench run {index}")
    res: dict[str, Any] = json.loads((out / f"gpu-{args.date}.json").read_text())
    keys = ("algorithm", "size", *WALL, *DEVICE)
    rows = [
        {k: r[k] for k in keys}
        for r in res["gpu"]
        if r["size"] in args.sizes and r["algorithm"] in args.algorithms
    ]
    return {
        "device": res["device"],
        "describe": res["device"],
        "rows": rows,
        "wall_s": wall,
        "limits": res.get("limits"),
    }


def summarize(
    runs: list[dict[str, Any]], sizes: Sequence[int], algs: Sequence[str], within: float
) -> list[dict[str, Any]]:
    """Per size, algorithm and figure: each side's per-process values, their medians, new / old,
    and the ratio of each round's pair (new / old of the two processes of one round, which drift
    cannot separate)."""
    out = []
    for size in sizes:
        for alg in algs:
            for key in (*WALL, *DEVICE):
                vals: dict[str, list[float]] = {side: [] for side in SIDES}
                rounds: dict[int, dict[str, float]] = {}
                for run in runs:
                    for r in run["rows"]:
                        if r["algorithm"] == alg and r["size"] == size:
                            vals[run["side"]].append(float(r[key]))
                            rounds.setdefault(run["round"], {})[run["side"]] = float(r[key])
                if not vals["old"] or not vals["new"]:
                    raise ValueError(f"no {key} for {alg} at {size_name(size)} from both sides")
                old, new = statistics.median(vals["old"]), statistics.median(vals["new"])
                ratio = new / old
                wall = key in WALL
                out.append(
                    {
                        "algorithm": alg,
                        "size": size,
                        "figure": key,
                        "wall": wall,
                        "old_runs": vals["old"],
                        "new_runs": vals["new"],
                        "old_median": old,
                        "new_median": new,
                        "new_over_old": ratio,
                        "round_ratios": [
                            p["new"] / p["old"] for _, p in sorted(rounds.items()) if len(p) == 2
                        ],
                        "within": (ratio >= 1.0 - within) if wall else None,
                    }
                )
    return out


def digests_agree(runs: list[dict[str, Any]]) -> bool | None:
    """Whether every process sealed every (algorithm, size) to the same digest; None when the
    processes do not report digests (--mode gpu-bench: each checks itself against the host)."""
    seen: dict[tuple[str, int], set[str]] = {}
    for run in runs:
        for r in run["rows"]:
            if "digest" in r:
                seen.setdefault((r["algorithm"], r["size"]), set()).add(r["digest"])
    return None if not seen else all(len(d) == 1 for d in seen.values())


def _gbps(v: float) -> str:
    return f"{v:,.2f}" if v < 100 else f"{v:,.1f}"


def write_results(res: dict[str, Any], out: Path) -> Path:
    """port-ab-DATE.json (everything) and port-ab-DATE.md (the table); returns the .md path.
    A pooled result (``pooled_from``: the runs' files) is port-ab-DATE[-gpu-bench]-pooled."""
    out.mkdir(parents=True, exist_ok=True)
    pooled: list[str] = res.get("pooled_from") or []
    stem = out / (
        f"port-ab-{res['date']}{'-gpu-bench' if res['mode'] == 'gpu-bench' else ''}"
        f"{'-pooled' if pooled else ''}"
    )
    Path(f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    goal = 1.0 - res["within"]
    old, new = res["old"], res["new"]

    def rev(side: dict[str, Any], missing: str) -> str:
        if not side["revision"]:
            return missing
        rev = str(side["revision"])
        return rev[:12] + (" with changes to its files" if rev.endswith("+changes") else "")

    measure = (
        "times `write_and_hash`, `digest` and `hash` the way `gpu_bench.measure_one` does "
        "(its repetitions, one warm-up, the median)"
    )
    how = {
        "rows": f"each process {measure}",
        "interleaved": f"one process imports both trees (the old one renamed `{OLD_ALIAS}`), opens both "
        "backends on the device and, round after round, measures every row with each side in turn "
        "(the side that goes first flips from row to row and round to round); each side seals from "
        "its own pinned buffer and into its own device buffers, and both seal the same pageable "
        f"array; each measurement {measure}",
        "gpu-bench": "each process is the tree's whole `bench/gpu_bench.py`",
    }[res["mode"]]
    agree = {True: "yes", False: "**NO**", None: "not compared (each run checks its own against the host)"}
    runs_said = (
        f"{len(pooled)} runs of `bench/port_ab.py --mode {res['mode']}` pooled "
        f"({', '.join(f'`{f}`' for f in pooled)}; `port_ab.py pool`): {res['rounds']} rounds in all, "
        f"{len(res['order'])} processes, each run in the order"
        if pooled
        else f"One run of `bench/port_ab.py --mode interleaved`: {res['rounds']} rounds in one process, "
        "each side's measurements of a round counted as one of its runs (below), in the order"
        if res["mode"] == "interleaved"
        else f"One run of `bench/port_ab.py --mode {res['mode']}`: {res['rounds']} rounds, "
        f"{len(res['order'])} processes in the order"
    )
    order = res["order"][: len(res["order"]) // len(pooled)] if pooled else res["order"]
    lines = [
        f"# Port A/B: raw-driver backend against cuda.core ({res['device']}, {res['date']})",
        "",
        f"Old: `{old['tree']}` at {rev(old, 'unknown revision')}; new: `{new['tree']}` at "
        f"{rev(new, 'unknown revision (no .git)')}. {runs_said} "
        f"{', '.join(order)}; {how}. Below, each side's median over its "
        f"{'runs' if res['mode'] == 'interleaved' else 'processes'} (GB/s), "
        f"and new / old against the issue 10 target (new >= {goal:.2f} x old).",
        "",
        f"Seal digests of old and new agree: {agree[res['digests_agree']]}. "
        f"Wall figures below {goal:.2f}: {res['missed']} of {sum(r['wall'] for r in res['rows'])}.",
        "",
        f"| algorithm | shard | figure | old | new | new/old | within {goal:.2f} | old runs | new runs |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in res["rows"]:
        if not r["wall"]:
            continue
        lines.append(
            f"| {r['algorithm']} | {size_name(r['size'])} | {FIGURE_NAMES[r['figure']]} | "
            f"{_gbps(r['old_median'])} | {_gbps(r['new_median'])} | {r['new_over_old']:.3f} | "
            f"{'yes' if r['within'] else '**no**'} | {', '.join(map(_gbps, r['old_runs']))} | "
            f"{', '.join(map(_gbps, r['new_runs']))} |"
        )
    clocks = [(run["side"], run["clock"]["sm_mhz_median"]) for run in res["runs"] if run.get("clock")]
    if clocks:
        lines += [
            "",
            "SM clock while each process ran (median MHz): "
            + ", ".join(f"{side} {mhz:.0f}" for side, mhz in clocks)
            + ".",
        ]
    if res.get("clock"):
        lines += ["", f"SM clock over the whole run (median MHz): {res['clock']['sm_mhz_median']:.0f}."]
    if res["mode"] == "interleaved":
        cpus = res.get("cpus")
        lines += ["", f"CPUs of the process: {f'the GPU NUMA node, {cpus}' if cpus else 'not pinned'}."]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    return Path(f"{stem}.md")


#: What the runs of a pool must share (``pool``): they measured the same thing.
_POOL_SAME = ("mode", "sizes", "algorithms", "within", "device")


def pool_results(results: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """One result from several runs' (see the module's ``pool``). Refuses (ValueError) runs that
    differ in what they measured or in the trees' revisions, or a run that recorded none."""
    if len(results) < 2:
        raise ValueError("pool needs at least two runs")
    first = results[0]
    for name, res in zip(names, results, strict=True):
        for key in _POOL_SAME:
            if res.get(key) != first.get(key):
                raise ValueError(
                    f"{name}: {key} {res.get(key)!r} differs from the first run's {first.get(key)!r}"
                )
        for side in SIDES:
            rev = res[side]["revision"]
            if not rev or rev != first[side]["revision"]:
                raise ValueError(f"{name}: the {side} tree's revision {rev!r} is not the first run's")
        if len(res["order"]) != len(first["order"]):
            raise ValueError(
                f"{name}: {len(res['order'])} processes, the first run had {len(first['order'])}"
            )
    runs: list[dict[str, Any]] = []
    rounds = 0
    for res in results:
        runs += [
            {**run, "round": run["round"] + rounds, "index": len(runs) + i}
            for i, run in enumerate(res["runs"])
        ]
        rounds += res["rounds"]
    rows = summarize(runs, first["sizes"], first["algorithms"], first["within"])
    return {
        **{key: first[key] for key in _POOL_SAME},
        "date": results[-1]["date"],
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rounds": rounds,
        "order": [side for res in results for side in res["order"]],
        "old": first["old"],
        "new": first["new"],
        "host_cpus": [res.get("host_cpus") for res in results],
        "python": [res.get("python") for res in results],
        "pooled_from": list(names),
        "digests_agree": digests_agree(runs),
        "missed": sum(1 for r in rows if r["within"] is False),
        "rows": rows,
        "runs": runs,
    }


def pool_main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="port_ab.py pool", description="several runs' port-ab-DATE.json as one (see the module)"
    )
    ap.add_argument("--out", required=True, type=Path, help="directory for port-ab-DATE-pooled.json/.md")
    ap.add_argument("results", nargs="+", type=Path, help="port-ab-DATE.json files of the runs")
    args = ap.parse_args(argv)
    try:
        loaded = [json.loads(p.read_text()) for p in args.results]
        res = pool_results(loaded, [str(p) for p in args.results])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(f"port_ab pool: {type(e).__name__}: {e}")
        return 2
    md = write_results(res, args.out)
    log(md.read_text())
    return 1 if res["missed"] or res["digests_agree"] is False else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    if argv[:1] == ["pool"]:
        return pool_main(argv[1:])
    if argv[:1] == ["interleaved"]:
        return interleaved_main(argv[1:])
    args = parse_args(argv)
    trees = {"old": args.old, "new": args.new}
    order = alternation(args.rounds)
    run_one = run_rows if args.mode == "rows" else run_gpu_bench
    if args.mode == "gpu-bench":
        # gpu_bench checks every seal against the host; without the native tree hasher that check
        # runs in Python. gpu-check builds the new tree's; build the old tree's the same way.
        for tree in trees.values():
            subprocess.run(
                [args.python, "-m", "vram_residency.formats._native", "--build"],
                env=child_env(tree),
                capture_output=True,
                timeout=300,
                check=False,
            )
    budget = f"; up to {args.budget_s} s, more rounds while they fit" if args.budget_s else ""
    log(
        f"port A/B ({args.mode}): at least {len(order)} processes, order {' '.join(order)}{budget}; "
        f"sizes {', '.join(map(size_name, args.sizes))}"
    )
    runs: list[dict[str, Any]] = []
    start = time.monotonic()
    times: list[float] = []
    clock_all: dict[str, float] = {}
    if args.mode == "interleaved":
        try:
            with ClockSampler() as sampler:
                runs, rounds = run_interleaved(args)
        except RuntimeError as e:
            log(f"port_ab: {e}")
            return 2
        clock_all = sampler.summary()
        order = [run["side"] for run in runs]
    with tempfile.TemporaryDirectory(prefix="port-ab-") as tmp:
        rounds = rounds if args.mode == "interleaved" else 0
        while args.mode != "interleaved" and another_block(
            rounds, args.rounds, time.monotonic() - start, _slowest(times), args.budget_s
        ):
            order = alternation(rounds + 1)
            for i in (2 * rounds, 2 * rounds + 1):
                side = order[i]
                log(f"== {side} ({i + 1}/{max(len(order), 2 * args.rounds)}): {trees[side]}")
                t0 = time.monotonic()
                try:
                    with ClockSampler() as clock:
                        run = run_one(args, side, trees[side], Path(tmp), i)
                except RuntimeError as e:
                    log(f"port_ab: {e}")
                    return 2
                times.append(time.monotonic() - t0)
                run.update(side=side, index=i, round=i // 2, clock=clock.summary())
                log(f"   {run['wall_s']:.1f} s")
                runs.append(run)
            rounds += 1
    rows = summarize(runs, args.sizes, args.algorithms, args.within)
    res: dict[str, Any] = {
        "date": args.date,
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": runs[0]["device"],
        "mode": args.mode,
        "sizes": args.sizes,
        "algorithms": args.algorithms,
        "rounds": rounds,
        "budget_s": args.budget_s,
        "order": order,
        "within": args.within,
        "old": {
            "tree": str(args.old),
            "revision": tree_revision(args.old),
            "src_digest": src_digest(args.old),
        },
        "new": {
            "tree": str(args.new),
            "revision": tree_revision(args.new),
            "src_digest": src_digest(args.new),
        },
        "host_cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        **({"clock": clock_all} if clock_all else {}),
        **({"cpus": getattr(args, "pinned_cpus", None)} if args.mode == "interleaved" else {}),
        "digests_agree": digests_agree(runs),
        "missed": sum(1 for r in rows if r["within"] is False),
        "rows": rows,
        "runs": runs,
    }
    md = write_results(res, args.out)
    log("")
    log(md.read_text())
    return 1 if res["missed"] or res["digests_agree"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
