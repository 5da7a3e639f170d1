"""bench/port_ab_pairs.py: round-paired ratios from interleaved port A/B results (no GPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.bench.bench_helpers import load_bench

ROOT = Path(__file__).resolve().parents[2]


pairs = load_bench("port_ab_pairs")
FIGS = ("seal_pinned_GBps", "seal_pageable_GBps", "verify_GBps", "hash_with_units_GBps")


def _row(size: int, scale: float) -> dict[str, Any]:
    return {"algorithm": "sha256-tree-v1", "size": size, **{k: 10.0 * scale for k in FIGS}}


def _run(new_scales: list[float], revision: str = "abc") -> dict[str, Any]:
    """An interleaved result whose new side is ``new_scales[r]`` x old in round r (the order of
    the runs list deliberately not old-first every round)."""
    runs = []
    for r, scale in enumerate(new_scales):
        sides = [("old", 1.0), ("new", scale)]
        for side, s in sides if r % 2 == 0 else sides[::-1]:
            runs.append({"side": side, "round": r, "rows": [_row(1 << 20, s), _row(1 << 30, s)]})
    return {
        "mode": "interleaved",
        "rounds": len(new_scales),
        "runs": runs,
        "old": {"revision": "old"},
        "new": {"revision": revision},
    }


def test_geometric_mean_of_round_pairs_per_run_and_pooled() -> None:
    out = pairs.analyse([_run([0.9, 1.1]), _run([1.0, 1.0, 1.0], "def")], ["a", "b"])
    row = next(r for r in out["rows"] if r["size"] == 1 << 30 and r["figure"] == "seal_pageable_GBps")
    assert row["pooled"]["n"] == 5
    assert row["pooled"]["geomean"] == pytest.approx(math.exp((math.log(0.9) + math.log(1.1)) / 5))
    assert [g["geomean"] for g in row["runs"]] == [pytest.approx(math.sqrt(0.99)), pytest.approx(1.0)]
    assert row["runs"][1]["se"] == pytest.approx(0.0)
    assert [r["new"] for r in out["runs"]] == ["abc", "def"]
    md = pairs.to_markdown(out)
    assert "| sha256-tree-v1 | 1 GiB | seal pageable | 5 | 0.998 |" in md


def test_refuses_runs_that_are_not_interleaved_or_lack_a_side() -> None:
    with pytest.raises(ValueError, match="not an interleaved run"):
        pairs.analyse([{**_run([1.0]), "mode": "rows"}], ["a"])
    broken = _run([1.0, 1.0])
    broken["runs"] = [r for r in broken["runs"] if not (r["round"] == 1 and r["side"] == "new")]
    with pytest.raises(ValueError, match="round 1 lacks a side"):
        pairs.analyse([broken], ["a"])


def test_command_line_writes_both_files(tmp_path: Path) -> None:
    src = tmp_path / "run.json"
    src.write_text(json.dumps(_run([0.95, 0.97, 0.99])))
    assert pairs.main(["--out", str(tmp_path / "out"), str(src)]) == 0
    data = json.loads((tmp_path / "out" / "port-ab-pairs.json").read_text())
    assert len(data["rows"]) == 8  # 2 sizes x 4 figures
    assert (tmp_path / "out" / "port-ab-pairs.md").read_text().startswith("# Port A/B")
    assert pairs.main(["--out", str(tmp_path / "out"), str(tmp_path / "missing.json")]) == 2
