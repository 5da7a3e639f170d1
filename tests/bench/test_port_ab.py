"""bench/port_ab.py and scripts/portab-prepare without a GPU (issue 10's same-run A/B).

What the GPU run stands on and can be checked here: the arguments (sizes, rounds, trees), the
alternation order, the environment that makes each process import its own tree, the old tree that
portab-prepare extracts from git (it imports, in a real process, from itself and not from this
tree, with no third-party module beyond what this tree's core needs), and the report from a fixed
set of per-process figures (medians, new / old, the 0.97 target, the digest cross-check).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.bench.bench_helpers import load_bench

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "port_ab.py"
PREPARE = ROOT / "scripts" / "portab-prepare"
OLD_REV = "8d48eb5"
MiB, GiB = 1 << 20, 1 << 30


pab = load_bench("port_ab")


def _have_commit(rev: str) -> bool:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return False
    out = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{rev}^{{commit}}"], capture_output=True)
    return out.returncode == 0


needs_old_commit = pytest.mark.skipif(not _have_commit(OLD_REV), reason=f"needs git and commit {OLD_REV}")


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _have_commit(OLD_REV):
        pytest.skip(f"needs git and commit {OLD_REV}")
    dest = tmp_path_factory.mktemp("portab") / "old"
    subprocess.run([str(PREPARE), OLD_REV, str(dest)], check=True, capture_output=True, timeout=120)
    return dest


# -- arguments ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("1M", MiB),
        ("64MiB", 64 * MiB),
        ("1G", GiB),
        ("16GiB", 16 * GiB),
        ("4096", 4096),
        ("2k", 2048),
        (" 1g ", GiB),
    ],
)
def test_parse_size_known_answers(text: str, want: int) -> None:
    assert pab.parse_size(text) == want


@pytest.mark.parametrize("text", ["", "0", "0M", "1T", "-1M", "1.5G", "M", "1 M B"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        pab.parse_size(text)


def test_parse_sizes_sorts_and_drops_repeats() -> None:
    assert pab.parse_sizes("16G,1M,64M,1M,1G,") == [MiB, 64 * MiB, GiB, 16 * GiB]
    with pytest.raises(ValueError, match="no sizes"):
        pab.parse_sizes(" , ")


def test_parse_algorithms_keeps_the_bench_order_and_refuses_others() -> None:
    assert pab.parse_algorithms("blake3,sha256-tree-v1") == ["sha256-tree-v1", "blake3"]
    with pytest.raises(ValueError, match="among"):
        pab.parse_algorithms("sha256")


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        pab.parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_parse_args_defaults(old_tree: Path, tmp_path: Path) -> None:
    args = pab.parse_args(["--out", str(tmp_path), "--old", str(old_tree), "--new", str(ROOT)])
    assert args.sizes == [MiB, 64 * MiB, GiB, 16 * GiB]
    assert args.algorithms == ["sha256-tree-v1", "blake3"]
    assert (args.rounds, args.mode, args.within) == (4, "rows", 0.03)
    args = pab.parse_args(
        [
            "--out",
            str(tmp_path),
            "--old",
            str(old_tree),
            "--new",
            str(ROOT),
            "--rounds",
            "1",
            "--sizes",
            "1G,1M",
            "--algorithms",
            "blake3",
            "--mode",
            "gpu-bench",
        ]
    )
    assert (args.rounds, args.sizes, args.algorithms) == (1, [MiB, GiB], ["blake3"])


def test_parse_args_refusals(old_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--out", str(tmp_path), "--old", str(old_tree), "--new", str(ROOT)]
    assert "at least 1" in _usage_error(capsys, [*base, "--rounds", "0"])
    assert "not a size" in _usage_error(capsys, [*base, "--sizes", "1X"])
    assert "[0, 1)" in _usage_error(capsys, [*base, "--within", "1.5"])
    assert "measures only" in _usage_error(capsys, [*base, "--mode", "gpu-bench", "--sizes", "2M"])
    missing = tmp_path / "nothing"
    err = _usage_error(capsys, ["--out", str(tmp_path), "--old", str(missing), "--new", str(ROOT)])
    assert "no src/vram_residency" in err and "portab-prepare" in err
    # A tree without bench/gpu_bench.py cannot run --mode gpu-bench.
    bare = tmp_path / "bare"
    shutil.copytree(old_tree / "src", bare / "src")
    err = _usage_error(
        capsys, ["--out", str(tmp_path), "--old", str(bare), "--new", str(ROOT), "--mode", "gpu-bench"]
    )
    assert "gpu_bench.py" in err


# -- order and environment ----------------------------------------------------------------------------


def test_alternation_known_answer() -> None:
    assert pab.alternation(1) == ["old", "new"]
    assert pab.alternation(4) == ["old", "new", "new", "old", "old", "new", "new", "old"]
    with pytest.raises(ValueError, match="at least 1"):
        pab.alternation(0)


@given(st.integers(min_value=1, max_value=60))
def test_alternation_pairs_each_side_once_per_round(rounds: int) -> None:
    order = pab.alternation(rounds)
    assert len(order) == 2 * rounds
    pairs = [order[i : i + 2] for i in range(0, len(order), 2)]
    assert all(sorted(p) == ["new", "old"] for p in pairs)
    # Each side goes first in half the rounds (one more for old when the count is odd).
    assert sum(p[0] == "old" for p in pairs) == (rounds + 1) // 2


@pytest.mark.parametrize(
    ("done", "least", "elapsed", "slowest", "budget", "want"),
    [
        (0, 4, 0.0, 0.0, None, True),  # below the least: always
        (3, 4, 1e9, 30.0, 10.0, True),  # even past the budget: the least is asked for
        (4, 4, 100.0, 30.0, None, False),  # no budget: exactly the least
        (4, 4, 100.0, 30.0, 238.0, True),  # 4 x 30 x 1.15 = 138 more fits in 238
        (4, 4, 100.0, 30.0, 237.0, False),
        (5, 4, 1e9, 30.0, 237.0, True),  # a block once begun is finished
        (3, 3, 100.0, 30.0, 169.0, True),  # an odd least is evened up by one round: 2 x 34.5
        (3, 3, 100.0, 30.0, 168.0, False),
    ],
)
def test_another_block_known_answers(
    done: int, least: int, elapsed: float, slowest: float, budget: float | None, want: bool
) -> None:
    assert pab.another_block(done, least, elapsed, slowest, budget) is want


def test_slowest_leaves_out_the_first_process_when_there_are_others() -> None:
    assert pab._slowest([]) == 0.0
    assert pab._slowest([38.0]) == 38.0
    assert pab._slowest([38.0, 22.3, 21.0, 23.0]) == 23.0


def test_a_budget_adds_balanced_rounds_while_they_fit(
    old_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """main with a clock that moves 10 s a process and a 120 s budget: the 2 rounds asked for take
    40 s, two more fit (40 + 4 x 10 x 1.15 = 86 <= 120), and two more would not (80 + 46 > 120)."""
    clock = [0.0]
    monkeypatch.setattr(pab.time, "monotonic", lambda: clock[0])

    def fake_run(args: Any, side: str, tree: Path, work: Path, index: int) -> dict[str, Any]:
        clock[0] += 10.0
        scale = 1.0 if side == "old" else 0.99
        return {
            "device": "NVIDIA H200",
            "wall_s": 10.0,
            "rows": [_row("sha256-tree-v1", MiB, scale, "aa")],
        }

    monkeypatch.setattr(pab, "run_rows", fake_run)
    argv = ["--out", str(tmp_path), "--old", str(old_tree), "--new", str(ROOT), "--sizes", "1M"]
    argv += ["--algorithms", "sha256-tree-v1", "--rounds", "2", "--budget-s", "120"]
    assert pab.main(argv) == 0
    res = json.loads(next(tmp_path.glob("port-ab-*.json")).read_text())
    assert res["rounds"] == 4 and res["budget_s"] == 120
    assert res["order"] == pab.alternation(4)
    assert [r["side"] for r in res["runs"]] == pab.alternation(4)
    assert [r["round"] for r in res["runs"]] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert "4 rounds, 8 processes" in next(tmp_path.glob("port-ab-*.md")).read_text()


def test_child_env_puts_the_tree_first_and_drops_other_packages(tmp_path: Path) -> None:
    tree, other, site = tmp_path / "tree", tmp_path / "other", tmp_path / "site"
    (other / "src" / "vram_residency").mkdir(parents=True)
    site.mkdir()
    base = {"PYTHONPATH": os.pathsep.join([str(other / "src"), str(site), ""]), "KEEP": "1"}
    env = pab.child_env(tree, base)
    assert env["PYTHONPATH"].split(os.pathsep) == [str((tree / "src").resolve()), str(site)]
    assert env["KEEP"] == "1"
    assert pab.child_env(tree, {})["PYTHONPATH"] == str((tree / "src").resolve())


# -- the old tree -------------------------------------------------------------------------------------


def test_prepare_extracts_a_small_tree_of_the_old_commit(old_tree: Path) -> None:
    full = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", f"{OLD_REV}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert (old_tree / "REVISION").read_text().strip() == full
    assert pab.tree_revision(old_tree) == full
    assert (old_tree / "bench" / "gpu_bench.py").is_file()
    assert (
        old_tree / "src" / "vram_residency" / "backends" / "cuda" / "kernels" / "sha256_tree.cu"
    ).is_file()
    # The raw-driver backend: its own driver module, no cuda.core module.
    cuda = old_tree / "src" / "vram_residency" / "backends" / "cuda"
    assert (cuda / "_driver.py").is_file() and not (cuda / "_core.py").exists()
    size = sum(f.stat().st_size for f in old_tree.rglob("*") if f.is_file())
    assert size < 4 * MiB  # it travels with the device tool's 64 MiB carry


def test_prepare_refuses_a_directory_it_did_not_make(tmp_path: Path, old_tree: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not portab's\n")
    out = subprocess.run([str(PREPARE), OLD_REV, str(foreign)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not made by portab-prepare" in out.stderr
    assert (foreign / "keep.txt").read_text() == "not portab's\n"
    out = subprocess.run(
        [str(PREPARE), "no-such-revision", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert out.returncode == 2 and "not a commit" in out.stderr


def _import_only(tree: Path) -> dict[str, Any]:
    # As gpu-check runs it: this tree's src on PYTHONPATH, which child_env must take away for the old tree.
    base = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run(
        [sys.executable, str(BENCH), "worker", "--tree", str(tree), "--import-only"],
        env=pab.child_env(tree, base),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _core_dependencies() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].replace("-", "_").lower() for d in deps}


def _module_level_imports(path: Path) -> set[str]:
    """Top-level names imported when the module loads (not inside functions: those run on a GPU)."""
    names: set[str] = set()
    todo: list[ast.stmt] = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            names |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
        elif isinstance(node, ast.If) and not (
            isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        ):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return names


def test_each_process_imports_its_own_tree(old_tree: Path) -> None:
    old = _import_only(old_tree)
    assert Path(old["vram_residency"]).is_relative_to(old_tree.resolve())
    assert old["modules"] and all(Path(m).is_relative_to(old_tree.resolve()) for m in old["modules"])
    new = _import_only(ROOT)
    assert Path(new["vram_residency"]).is_relative_to((ROOT / "src").resolve())
    # What the old package needs at import is what this tree's core install already brings (on the
    # GPU machine: numpy, cryptography, blake3, typing-extensions), plus cuda-bindings, which the
    # old backend imports only when a backend opens.
    allowed = set(sys.stdlib_module_names) | {"vram_residency", "__future__"} | _core_dependencies()
    extra = {n for m in old["modules"] for n in _module_level_imports(Path(m))} - allowed
    assert not extra, f"the old tree imports {sorted(extra)} at module level"


@pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None, reason="on a GPU machine the processes would measure, not fail"
)
@pytest.mark.parametrize(
    ("mode", "failed"), [("rows", "old run 0 failed"), ("interleaved", "the interleaved process failed")]
)
def test_a_failing_process_stops_the_run_and_writes_nothing(
    old_tree: Path, tmp_path: Path, mode: str, failed: str
) -> None:
    # Without a GPU the old tree's backend fails to open (a real ConfigError).
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--out",
            str(tmp_path / "res"),
            "--old",
            str(old_tree),
            "--new",
            str(ROOT),
            "--mode",
            mode,
            "--rounds",
            "1",
            "--sizes",
            "1M",
        ],
        env=pab.child_env(ROOT, dict(os.environ)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert failed in out.stdout and "ConfigError" in out.stderr
    assert not (tmp_path / "res").exists()


# -- the interleaved mode ---------------------------------------------------------------------------


def test_alias_tree_renames_the_package_word_and_nothing_else(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    pkg = tree / "src" / "vram_residency"
    (pkg / "sub" / "kernels").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""vram_residency."""\nfrom vram_residency.sub import x\n')
    (pkg / "sub" / "__init__.py").write_text(
        "import vram_residency.sub.y as y\nVRAM_RESIDENCY_X = 'vram_residency_other'\nx = 1\n"
    )
    (pkg / "sub" / "kernels" / "k.cu").write_text("// vram_residency kernel\n")
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "stale.pyc").write_bytes(b"\0")
    root = pab.alias_tree(tree, tmp_path / "alias", "vr_old")
    assert root == tmp_path / "alias"
    out = root / "vr_old"
    assert (out / "__init__.py").read_text() == '"""vr_old."""\nfrom vr_old.sub import x\n'
    # A longer word that starts with the name, and an upper-case one, are other words.
    assert (out / "sub" / "__init__.py").read_text() == (
        "import vr_old.sub.y as y\nVRAM_RESIDENCY_X = 'vram_residency_other'\nx = 1\n"
    )
    assert (out / "sub" / "kernels" / "k.cu").read_text() == "// vram_residency kernel\n"  # not Python
    assert not (out / "__pycache__").exists()
    assert (pkg / "__init__.py").read_text().startswith('"""vram_residency."""')  # the source is untouched
    with pytest.raises(ValueError, match="no src/vram_residency"):
        pab.alias_tree(tmp_path / "nothing", tmp_path / "alias2")


def test_import_both_loads_each_tree_from_its_own_files(old_tree: Path, tmp_path: Path) -> None:
    # In a real process: this test process already holds this tree's vram_residency.
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('pab', {str(BENCH)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pab'] = m; spec.loader.exec_module(m)\n"
        "from pathlib import Path\n"
        f"old, new = m.import_both(Path({str(old_tree)!r}), Path({str(ROOT)!r}), Path({str(tmp_path)!r}))\n"
        "import importlib\n"
        "oc = importlib.import_module(m.OLD_ALIAS + '.backends.cuda')\n"
        "import vram_residency.backends.cuda as nc\n"
        "print(json.dumps({'old': old.__file__, 'new': new.__file__, 'oc': oc.__file__, 'nc': nc.__file__,"
        " 'differ': oc.open_backend is not nc.open_backend,"
        " 'old_mods': sorted(k for k in sys.modules if k.startswith(m.OLD_ALIAS))}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=pab.child_env(ROOT, dict(os.environ)),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    got = json.loads(out.stdout.splitlines()[-1])
    alias = (tmp_path / pab.OLD_ALIAS).resolve()
    assert Path(got["old"]).resolve().is_relative_to(alias)
    assert Path(got["oc"]).resolve().is_relative_to(alias)
    assert Path(got["new"]).resolve().is_relative_to((ROOT / "src").resolve())
    assert Path(got["nc"]).resolve().is_relative_to((ROOT / "src").resolve())
    assert got["differ"] and f"{pab.OLD_ALIAS}.backends.cuda" in got["old_mods"]


def test_write_results_of_an_interleaved_run(tmp_path: Path) -> None:
    runs = [{k: v for k, v in run.items() if k != "clock"} for run in _runs([1.0, 1.0])]
    res = {**_result(runs), "mode": "interleaved", "clock": {"sm_mhz_median": 1980.0, "power_w_median": 1.0}}
    text = pab.write_results(res, tmp_path).read_text()
    assert "`bench/port_ab.py --mode interleaved`: 2 rounds in one process" in text
    assert f"the old one renamed `{pab.OLD_ALIAS}`" in text
    assert "each side's median over its runs (GB/s)" in text
    assert "SM clock over the whole run (median MHz): 1980." in text
    assert "while each process ran" not in text
    assert "CPUs of the process: not pinned." in text
    text = pab.write_results({**res, "cpus": "0-15"}, tmp_path).read_text()
    assert "CPUs of the process: the GPU NUMA node, 0-15." in text


# -- the report ---------------------------------------------------------------------------------------


def _row(alg: str, size: int, scale: float, digest: str) -> dict[str, Any]:
    base = {
        "seal_pinned_GBps": 50.0,
        "seal_pageable_GBps": 30.0,
        "verify_GBps": 800.0,
        "hash_with_units_GBps": 700.0,
        "verify_device_GBps": 900.0,
    }
    return {"algorithm": alg, "size": size, **{k: v * scale for k, v in base.items()}, "digest": digest}


def _runs(new_scales: list[float], digest_new: str = "aa") -> list[dict[str, Any]]:
    """Two rounds (old, new, new, old); old at 1.0 and 1.1 of the base figures, new at new_scales."""
    runs = []
    old_scales = iter([1.0, 1.1])
    news = iter(new_scales)
    for i, side in enumerate(["old", "new", "new", "old"]):
        s = next(old_scales) if side == "old" else next(news)
        d = "aa" if side == "old" else digest_new
        runs.append(
            {
                "side": side,
                "index": i,
                "round": i // 2,
                "device": "NVIDIA H200",
                "clock": {"sm_mhz_median": 1980.0, "power_w_median": 400.0},
                "rows": [_row("sha256-tree-v1", MiB, s, d), _row("blake3", MiB, s, d)],
            }
        )
    return runs


def test_summarize_medians_ratios_and_target() -> None:
    rows = pab.summarize(_runs([1.0, 1.0]), [MiB], ["sha256-tree-v1", "blake3"], 0.03)
    assert len(rows) == 2 * 5
    r = next(r for r in rows if r["algorithm"] == "sha256-tree-v1" and r["figure"] == "seal_pinned_GBps")
    assert r["old_runs"] == [50.0, 55.00000000000001] and r["new_runs"] == [50.0, 50.0]
    assert r["old_median"] == pytest.approx(52.5) and r["new_median"] == 50.0
    assert r["new_over_old"] == pytest.approx(50.0 / 52.5)  # 0.952: a miss
    assert r["within"] is False
    # Round 0: new 50 / old 50; round 1: new 50 / old 55.
    assert r["round_ratios"] == pytest.approx([1.0, 50.0 / 55.0])
    dev = next(r for r in rows if r["figure"] == "verify_device_GBps")
    assert dev["wall"] is False and dev["within"] is None
    rows = pab.summarize(_runs([1.02, 1.04]), [MiB], ["blake3"], 0.03)
    assert all(r["within"] for r in rows if r["wall"])  # new 1.03 against old 1.05: 0.981


def test_summarize_refuses_a_missing_side() -> None:
    runs = [r for r in _runs([1.0, 1.0]) if r["side"] == "old"]
    with pytest.raises(ValueError, match="both sides"):
        pab.summarize(runs, [MiB], ["blake3"], 0.03)


def test_digests_agree() -> None:
    assert pab.digests_agree(_runs([1.0, 1.0])) is True
    assert pab.digests_agree(_runs([1.0, 1.0], digest_new="bb")) is False
    no_digests = [
        {**run, "rows": [{k: v for k, v in r.items() if k != "digest"} for r in run["rows"]]}
        for run in _runs([1.0, 1.0])
    ]
    assert pab.digests_agree(no_digests) is None


def test_write_results_from_a_fixed_input(tmp_path: Path) -> None:
    res = _result(_runs([1.0, 1.0]), new_rev=None)
    md = pab.write_results(res, tmp_path / "out")
    assert md == tmp_path / "out" / "port-ab-2026-12-01.md"
    assert json.loads((tmp_path / "out" / "port-ab-2026-12-01.json").read_text()) == res
    text = md.read_text()
    lines = text.splitlines()
    assert lines[0] == "# Port A/B: raw-driver backend against cuda.core (NVIDIA H200, 2026-12-01)"
    assert "`.portab/old` at 8d48eb5dc427" in text and "unknown revision (no .git)" in text
    assert "in the order old, new, new, old" in text
    assert "Seal digests of old and new agree: yes. Wall figures below 0.97: 8 of 8." in text
    assert "| algorithm | shard | figure | old | new | new/old | within 0.97 | old runs | new runs |" in lines
    assert (
        "| sha256-tree-v1 | 1 MiB | seal pinned | 52.50 | 50.00 | 0.952 | **no** | 50.00, 55.00 | 50.00, 50.00 |"
        in lines
    )
    assert (
        "| blake3 | 1 MiB | verify (wall) | 840.0 | 800.0 | 0.952 | **no** | 800.0, 880.0 | 800.0, 800.0 |"
        in lines
    )
    assert sum(line.startswith("| sha256-tree-v1 ") or line.startswith("| blake3 ") for line in lines) == 8
    assert not any("verify (device)" in line for line in lines)  # not a target: JSON only
    assert "SM clock while each process ran (median MHz): old 1980, new 1980, new 1980, old 1980." in text
    res_gb = {**res, "mode": "gpu-bench", "digests_agree": None}
    md = pab.write_results(res_gb, tmp_path / "out")
    assert md.name == "port-ab-2026-12-01-gpu-bench.md"
    assert "not compared" in md.read_text() and "whole `bench/gpu_bench.py`" in md.read_text()


def test_fill_matches_gpu_bench() -> None:
    """The processes seal the bytes gpu_bench seals (the 2026-11-28 rows were measured on them)."""

    old_bench = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{OLD_REV}:bench/gpu_bench.py"], capture_output=True, text=True
    )
    if old_bench.returncode != 0:
        pytest.skip(f"needs git and commit {OLD_REV}")
    # gpu_bench.py imports the backend at module level; run only its fill_random's source.
    tree = ast.parse(old_bench.stdout)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "fill_random")
    ns: dict[str, Any] = {"np": np, "MiB": MiB}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "gpu_bench.fill_random", "exec"), ns)
    a = np.empty(3 * 64 * MiB + 12345, dtype=np.uint8)
    b = np.empty_like(a)
    ns["fill_random"](a)
    pab.fill_random(b)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("threads", [1, 3])
def test_threaded_fill_and_copy_give_the_same_bytes(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    # The tiles are written by several threads in any order; the bytes are those of one thread
    # writing them in order (which test_fill_matches_gpu_bench holds to gpu_bench's).
    monkeypatch.setattr(pab, "FILL_THREADS", threads)
    n = 5 * 64 * MiB + 777
    a = np.empty(n, dtype=np.uint8)
    pab.fill_random(a)
    block = np.random.default_rng(1).integers(0, 256, size=64 * MiB, dtype=np.uint8)
    for i in range(6):
        off = i * 64 * MiB
        want = block[: min(64 * MiB, n - off)].copy()
        want[0] ^= np.uint8(i)
        assert np.array_equal(a[off : off + len(want)], want), i
    b = np.empty_like(a)
    pab.copy_parallel(b, a)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="lengths differ"):
        pab.copy_parallel(b[:-1], a)


def _result(
    runs: list[dict[str, Any]], *, new_rev: str | None = "a" * 40, date: str = "2026-12-01"
) -> dict[str, Any]:
    rows = pab.summarize(runs, [MiB], ["sha256-tree-v1", "blake3"], 0.03)
    return {
        "date": date,
        "timestamp": f"{date}T00:00:00+00:00",
        "device": "NVIDIA H200",
        "mode": "rows",
        "sizes": [MiB],
        "algorithms": ["sha256-tree-v1", "blake3"],
        "rounds": 2,
        "order": ["old", "new", "new", "old"],
        "within": 0.03,
        "old": {"tree": ".portab/old", "revision": "8d48eb5dc427121125fc6a91be568740c138069d"},
        "new": {"tree": ".", "revision": new_rev},
        "host_cpus": 16,
        "python": "3.12.3",
        "digests_agree": True,
        "missed": sum(1 for r in rows if r["within"] is False),
        "rows": rows,
        "runs": runs,
    }


def test_pool_is_one_summary_of_every_process_with_rounds_numbered_on(tmp_path: Path) -> None:
    # Run a: new 1.0 / 1.0 x old per round (old 50 and 55: new/old 0.952, a miss). Run b: new
    # 1.04 and 1.06 x. Pooled: old 50, 55, 50, 55 (median 52.5), new 50, 50, 52, 53 (median 51).
    a, b = _result(_runs([1.0, 1.0])), _result(_runs([1.04, 1.06]), date="2026-12-02")
    res = pab.pool_results([a, b], ["a.json", "b.json"])
    assert res["rounds"] == 4 and res["date"] == "2026-12-02" and res["pooled_from"] == ["a.json", "b.json"]
    assert [r["round"] for r in res["runs"]] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r["index"] for r in res["runs"]] == list(range(8))
    assert res["order"] == a["order"] + b["order"]
    r = next(
        r for r in res["rows"] if r["algorithm"] == "sha256-tree-v1" and r["figure"] == "seal_pinned_GBps"
    )
    assert r["old_median"] == pytest.approx(52.5) and r["new_median"] == pytest.approx(51.0)
    assert r["round_ratios"] == pytest.approx([1.0, 50 / 55, 52 / 50, 53 / 55])
    assert res["missed"] == sum(1 for r in res["rows"] if r["within"] is False)
    # The runs' own records are unchanged (each stays the record of its run).
    assert [run["round"] for run in b["runs"]] == [0, 0, 1, 1]
    md = pab.write_results(res, tmp_path)
    assert md.name == "port-ab-2026-12-02-pooled.md"
    text = md.read_text()
    assert "2 runs of `bench/port_ab.py --mode rows` pooled (`a.json`, `b.json`" in text
    assert "4 rounds in all, 8 processes, each run in the order old, new, new, old;" in text
    assert json.loads((tmp_path / "port-ab-2026-12-02-pooled.json").read_text()) == res


def test_pool_main_writes_the_pooled_files_and_exits_as_a_run(tmp_path: Path) -> None:
    files = []
    for name, factors in (("a", [1.04, 1.06]), ("b", [1.02, 1.05])):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(_result(_runs(factors))))
        files.append(str(path))
    assert pab.main(["pool", "--out", str(tmp_path / "out"), *files]) == 0
    assert (tmp_path / "out" / "port-ab-2026-12-01-pooled.md").is_file()
    missing = str(tmp_path / "missing.json")
    assert pab.main(["pool", "--out", str(tmp_path / "out"), files[0], missing]) == 2


def test_pool_refuses_runs_of_different_things() -> None:
    a = _result(_runs([1.0, 1.0]))
    with pytest.raises(ValueError, match="at least two"):
        pab.pool_results([a], ["a"])
    with pytest.raises(ValueError, match="new tree's revision"):
        pab.pool_results([a, _result(_runs([1.0, 1.0]), new_rev="b" * 40)], ["a", "b"])
    with pytest.raises(ValueError, match="new tree's revision None"):
        pab.pool_results([a, {**a, "new": {"tree": ".", "revision": None}}], ["a", "b"])
    with pytest.raises(ValueError, match="sizes"):
        pab.pool_results([a, {**a, "sizes": [MiB, GiB]}], ["a", "b"])
    with pytest.raises(ValueError, match="device"):
        pab.pool_results([a, {**a, "device": "NVIDIA H100"}], ["a", "b"])


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=60
    )
    return out.stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_tree_revision_marks_files_that_differ_from_head(tmp_path: Path) -> None:
    # A lent GPU machine's copy carried a .git at an older commit than its files (2026-11-30):
    # the result must not name that commit as if the files were it.
    repo = tmp_path / "tree"
    (repo / "src" / "vram_residency").mkdir(parents=True)
    (repo / "src" / "vram_residency" / "__init__.py").write_text("A = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = _git(repo, "rev-parse", "HEAD")
    assert pab.tree_revision(repo) == head
    before = pab.src_digest(repo)
    (repo / "src" / "vram_residency" / "__init__.py").write_text("A = 2\n")
    assert pab.tree_revision(repo) == f"{head}+changes"
    assert pab.src_digest(repo) != before
    (repo / "src" / "vram_residency" / "__init__.py").write_text("A = 1\n")
    (repo / "src" / "vram_residency" / "__pycache__").mkdir()
    (repo / "src" / "vram_residency" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert pab.src_digest(repo) == before  # the same sources, whatever was compiled beside them
    assert pab.tree_revision(repo) == head


def test_src_digest_known_answer(tmp_path: Path) -> None:
    (tmp_path / "src" / "p").mkdir(parents=True)
    (tmp_path / "src" / "p" / "a.py").write_bytes(b"x")
    rel = b"p/a.py"
    want = hashlib.sha256(len(rel).to_bytes(8, "big") + rel + (1).to_bytes(8, "big") + b"x").hexdigest()
    assert pab.src_digest(tmp_path) == want
    # Built native libraries and bytecode are not sources: the digest does not see them.
    (tmp_path / "src" / "p" / "_lib.so").write_bytes(b"built here")
    (tmp_path / "src" / "p" / "__pycache__").mkdir()
    (tmp_path / "src" / "p" / "__pycache__" / "a.cpython-312.pyc").write_bytes(b"\0")
    assert pab.src_digest(tmp_path) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [("0-3", {0, 1, 2, 3}), ("0-3,8,10-11\n", {0, 1, 2, 3, 8, 10, 11}), ("5", {5}), ("", set())],
)
def test_parse_cpulist_known_answers(text: str, want: set[int]) -> None:
    assert pab.parse_cpulist(text) == want


@given(st.sets(st.integers(min_value=0, max_value=300), min_size=1))
def test_cpulist_round_trips(cpus: set[int]) -> None:
    text = pab._cpulist(cpus)
    assert pab.parse_cpulist(text) == cpus
    assert text == ",".join(text.split(","))  # no empty parts
    assert pab._cpulist({0, 1, 2, 3, 5, 7, 8}) == "0-3,5,7-8"


def test_gpu_local_cpus_is_none_without_a_driver() -> None:
    if shutil.which("nvidia-smi") is not None:
        pytest.skip("a GPU machine has a driver")
    assert pab.gpu_local_cpus(0) is None
