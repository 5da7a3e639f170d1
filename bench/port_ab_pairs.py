"""Round-paired ratios across interleaved port A/B runs (issue 10).

``bench/port_ab.py --mode interleaved`` measures each row with both sides in every round, so
each round gives one paired ratio new / old per figure, with both sides on the same machine state.
Its report compares the medians of one run; this reads several runs' ``port-ab-DATE.json`` and
gives, per figure, the geometric mean of all their paired ratios with its standard error, and the
same per run. Runs of different revisions may be read together (``port_ab.py pool`` refuses
them): this is for telling a small systematic difference from a run's noise, not for the target.

    python3 bench/port_ab_pairs.py --out DIR RUN.json [RUN.json ...]

Writes ``DIR/port-ab-pairs.json`` and ``DIR/port-ab-pairs.md``."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

FIGURES = (
    ("seal_pinned_GBps", "seal pinned"),
    ("seal_pageable_GBps", "seal pageable"),
    ("verify_GBps", "verify (wall)"),
    ("hash_with_units_GBps", "hash + unit digests"),
)


def size_name(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"


def paired_logs(res: dict[str, Any]) -> dict[tuple[str, int, str], list[float]]:
    """log(new / old) of every round of one interleaved run, per (algorithm, size, figure)."""
    if res.get("mode") != "interleaved":
        raise ValueError(f"not an interleaved run (mode {res.get('mode')!r})")
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for run in res["runs"]:
        by_round.setdefault(run["round"], {})[run["side"]] = run
    out: dict[tuple[str, int, str], list[float]] = {}
    for rnd in sorted(by_round):
        sides = by_round[rnd]
        if set(sides) != {"old", "new"}:
            raise ValueError(f"round {rnd} lacks a side: {sorted(sides)}")
        for old, new in zip(sides["old"]["rows"], sides["new"]["rows"], strict=True):
            if (old["algorithm"], old["size"]) != (new["algorithm"], new["size"]):
                raise ValueError(f"round {rnd}: rows out of step")
            for key, _ in FIGURES:
                out.setdefault((old["algorithm"], old["size"], key), []).append(math.log(new[key] / old[key]))
    return out


def geo(logs: list[float]) -> dict[str, float]:
    """Geometric mean of the ratios, and the standard error of their log mean (as a factor - 1)."""
    se = statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else float("nan")
    return {"n": len(logs), "geomean": math.exp(statistics.fmean(logs)), "se": se}


def analyse(results: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    per_run = [paired_logs(r) for r in results]
    keys = list(per_run[0])
    rows = []
    for alg, size, key in keys:
        pooled = [x for logs in per_run for x in logs.get((alg, size, key), [])]
        rows.append(
            {
                "algorithm": alg,
                "size": size,
                "figure": key,
                "pooled": geo(pooled),
                "runs": [geo(logs[(alg, size, key)]) for logs in per_run if (alg, size, key) in logs],
            }
        )
    return {
        "runs": [
            {
                "name": n,
                "new": r["new"].get("revision"),
                "old": r["old"].get("revision"),
                "rounds": r["rounds"],
            }
            for n, r in zip(names, results, strict=True)
        ],
        "rows": rows,
    }


def to_markdown(out: dict[str, Any]) -> str:
    label = dict(FIGURES)
    lines = [
        "# Port A/B: round-paired new / old across interleaved runs",
        "",
        "Each round of `bench/port_ab.py --mode interleaved` measures both sides, so each round gives",
        "one ratio new / old per figure. Below: the geometric mean of those ratios over all the runs'",
        "rounds (± its standard error), and the same for each run in turn. Runs:",
        "",
    ]
    for r in out["runs"]:
        lines.append(f"- `{r['name']}`: {r['rounds']} rounds, new at {str(r['new'])[:12]}")
    lines += [
        "",
        "| algorithm | shard | figure | rounds | pooled geomean | ± | each run |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for row in out["rows"]:
        p = row["pooled"]
        each = ", ".join(f"{g['geomean']:.3f}" for g in row["runs"])
        lines.append(
            f"| {row['algorithm']} | {size_name(row['size'])} | {label[row['figure']]} | {p['n']} | "
            f"{p['geomean']:.3f} | {p['se']:.3f} | {each} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="round-paired ratios across interleaved port A/B runs")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("results", nargs="+", type=Path)
    args = ap.parse_args(argv)
    try:
        loaded = [json.loads(p.read_text()) for p in args.results]
        out = analyse(loaded, [str(p) for p in args.results])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"port_ab_pairs: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "port-ab-pairs.json").write_text(json.dumps(out, indent=1) + "\n")
    md = to_markdown(out)
    (args.out / "port-ab-pairs.md").write_text(md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
