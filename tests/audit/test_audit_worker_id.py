"""``audit verify --worker-id W`` / ``verify_log(..., worker_id=W)``: holding a log to one worker.

Every tensor-parallel rank signs its own log with the one group token, so the chain, the HMACs and
the head of rank 1's log verify just as well as rank 0's. Only the records' ``worker_id`` (inside
each signed body) tells them apart. These tests write real logs with ``AuditLog``, as
``cli/serve.py`` does for ``audit-rank<k>.jsonl``, and check that the option catches another
rank's genuine log and records of another worker within one log, and that the OK line names the
worker id(s) seen so a person notices a swapped log even without the option.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from tests.audit.audit_helpers import TOKEN, read_lines, run_cli
from vram_residency.audit import VRAM_ALLOCATED, VRAM_SEALED, AuditLog, chain_order, rotated_paths, verify_log
from vram_residency.audit.cli import EXIT_BROKEN, EXIT_OK, EXIT_USAGE, configure_parser, run, verify_command
from vram_residency.errors import InvalidInput

RANK0 = "gpu-node-rank0"
RANK1 = "gpu-node-rank1"


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=300, color_system=None), buf


def _write(path: Path, worker_id: str, n: int, **kw: object) -> AuditLog:
    """Append ``n`` records to the log at ``path`` as ``worker_id``; return the closed log."""
    with AuditLog(path, token=TOKEN, worker_id=worker_id, flush_interval=None, **kw) as log:  # type: ignore[arg-type]
        for i in range(n):
            log.emit(VRAM_SEALED, shard_id=f"s{i}", vram_bytes=4096)
        log.emit(VRAM_ALLOCATED, shard_id="s0", vram_bytes=1)
    return log


@pytest.fixture
def ranks(tmp_path: Path) -> tuple[Path, Path]:
    """Two ranks' genuine logs, one token, as ``serve --tp`` writes them."""
    r0, r1 = tmp_path / "audit-rank0.jsonl", tmp_path / "audit-rank1.jsonl"
    _write(r0, RANK0, 5)
    _write(r1, RANK1, 5)
    return r0, r1


def _set(path: Path) -> list[Path]:
    return chain_order([*rotated_paths(path), path])


# --- library -------------------------------------------------------------------------------


def test_right_worker_id_passes(ranks: tuple[Path, Path]) -> None:
    r0, r1 = ranks
    rep = verify_log(r0, TOKEN, worker_id=RANK0)
    assert rep.ok and rep.records == 6 and rep.worker_ids == (RANK0,)
    assert verify_log(r1, TOKEN, worker_id=RANK1).ok


def test_another_ranks_genuine_log_fails_with_worker_id(ranks: tuple[Path, Path]) -> None:
    _, r1 = ranks
    # The limitation the option exists for: without it, rank 1's log passes for anyone's.
    plain = verify_log(r1, TOKEN)
    assert plain.ok and plain.worker_ids == (RANK1,)
    rep = verify_log(r1, TOKEN, worker_id=RANK0)
    assert not rep.ok and rep.records == 0
    brk = rep.first_break
    assert brk is not None
    assert (brk.file, brk.index, brk.position, brk.seq) == (str(r1), 0, 0, 0)
    assert repr(RANK1) in brk.reason and repr(RANK0) in brk.reason
    assert brk.record_id == json.loads(read_lines(r1)[0])["id"]


def _first_index_of(files: list[Path], worker_id: str) -> tuple[Path, int, int]:
    """(file, index, seq) of the first record of ``worker_id``, read straight from the JSON."""
    for f in files:
        for i, line in enumerate(read_lines(f)):
            obj = json.loads(line)
            if obj["worker_id"] == worker_id:
                return f, i, obj["seq"]
    raise AssertionError(f"no record of {worker_id}")


def test_mixed_worker_ids_in_one_chain(tmp_path: Path) -> None:
    # A genuine chain holding two workers' records: rank 1's worker reopened rank 0's file (the
    # same token signs both, so nothing else in the chain breaks). Rotated, so the break must
    # name the right file of the set.
    path = tmp_path / "audit-rank0.jsonl"
    _write(path, RANK0, 30, max_bytes=2048)
    _write(path, RANK1, 3, max_bytes=2048)
    files = _set(path)
    assert len(files) > 2
    plain = verify_log(files, TOKEN)
    assert plain.ok and plain.worker_ids == (RANK0, RANK1)
    want_file, want_index, want_seq = _first_index_of(files, RANK1)
    rep = verify_log(files, TOKEN, worker_id=RANK0)
    assert not rep.ok and rep.worker_ids == (RANK0,)
    brk = rep.first_break
    assert brk is not None
    assert (brk.file, brk.index, brk.seq) == (str(want_file), want_index, want_seq)
    assert rep.records == want_seq == brk.position
    assert repr(RANK1) in brk.reason
    # Held to the other id, the very first record is the one that differs.
    brk1 = verify_log(files, TOKEN, worker_id=RANK1).first_break
    assert brk1 is not None and (brk1.file, brk1.index, brk1.seq) == (str(files[0]), 0, 0)


def test_spliced_rank_logs(ranks: tuple[Path, Path], tmp_path: Path) -> None:
    # Rank 0's records followed by rank 1's: the link breaks at the splice (chain check), and
    # held to rank 1, the first record already differs (worker check).
    r0, r1 = ranks
    spliced = tmp_path / "spliced.jsonl"
    spliced.write_bytes(r0.read_bytes() + r1.read_bytes())
    to1 = verify_log(spliced, TOKEN, head=None, worker_id=RANK1).first_break
    assert to1 is not None and (to1.index, to1.seq) == (0, 0) and "worker_id" in to1.reason
    to0 = verify_log(spliced, TOKEN, head=None, worker_id=RANK0).first_break
    assert to0 is not None and to0.index == 6 and "link" in to0.reason


def test_a_forged_record_is_reported_as_forged_not_as_another_worker(ranks: tuple[Path, Path]) -> None:
    # The signature is checked before the worker id: a record edited to another id is tampering.
    r0, _ = ranks
    lines = read_lines(r0)
    lines[2] = lines[2].replace(RANK0.encode(), b"gpu-node-rank9")
    r0.write_bytes(b"".join(lines))
    brk = verify_log(r0, TOKEN, worker_id=RANK0).first_break
    assert brk is not None and brk.index == 2 and "worker_id" not in brk.reason


def test_empty_log_has_no_worker_ids(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path, token=TOKEN, worker_id=RANK0, flush_interval=None).close()
    rep = verify_log(path, TOKEN, worker_id=RANK0)
    assert rep.ok and rep.records == 0 and rep.worker_ids == ()


@pytest.mark.parametrize("bad", ["", 7, b"gpu-node-rank0"])
def test_bad_worker_id_argument(ranks: tuple[Path, Path], bad: object) -> None:
    with pytest.raises(InvalidInput, match="worker_id"):
        verify_log(ranks[0], TOKEN, worker_id=bad)  # type: ignore[arg-type]


def test_an_anchor_binds_the_worker_too(ranks: tuple[Path, Path]) -> None:
    # The README's other answer: an anchor names a record hash, and the hash covers worker_id.
    r0, r1 = ranks
    with AuditLog(r0, token=TOKEN, worker_id=RANK0, flush_interval=None) as log:
        anchor = log.signed_head()
    assert verify_log(r0, TOKEN, anchors=[anchor]).ok
    assert not verify_log(r1, TOKEN, anchors=[anchor]).ok


# --- command line --------------------------------------------------------------------------


def test_cli_summary_names_the_worker(ranks: tuple[Path, Path], token_file: Path) -> None:
    con, buf = _console()
    assert verify_command([ranks[0]], token_file, console=con) == EXIT_OK
    out = buf.getvalue()
    assert "OK" in out and f"worker_id {RANK0!r}" in out and RANK1 not in out


def test_cli_worker_id_passes_and_fails(ranks: tuple[Path, Path], token_file: Path) -> None:
    r0, r1 = ranks
    con, buf = _console()
    assert verify_command([r0], token_file, worker_id=RANK0, console=con) == EXIT_OK
    assert "OK" in buf.getvalue() and RANK0 in buf.getvalue()
    con, buf = _console()
    assert verify_command([r1], token_file, worker_id=RANK0, console=con) == EXIT_BROKEN
    out = buf.getvalue()
    assert "BROKEN" in out and "OK:" not in out
    assert f"index 0 of {r1}" in out and "seq 0" in out and repr(RANK1) in out and repr(RANK0) in out


def test_cli_mixed_ids_said_without_the_option(tmp_path: Path, token_file: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, RANK0, 2)
    _write(path, RANK1, 2)
    con, buf = _console()
    assert verify_command([path], token_file, console=con) == EXIT_OK
    out = buf.getvalue()
    assert "2 worker ids" in out and repr(RANK0) in out and repr(RANK1) in out
    assert "warning" in out


def test_cli_shows_odd_worker_ids_on_one_line(tmp_path: Path, token_file: Path) -> None:
    # A worker id is any non-empty string: shown quoted and escaped, one finding per line.
    path = tmp_path / "audit.jsonl"
    odd = "w\nOK: [red]x\u202e"
    _write(path, odd, 1)
    con, buf = _console()
    assert verify_command([path], token_file, worker_id=RANK0, console=con) == EXIT_BROKEN
    out = buf.getvalue()
    assert "\u202e" not in out and "\\n" in out and out.count("\n") == 2
    assert "[red]x" in out  # rich markup in the id is printed, not interpreted


def test_cli_empty_worker_id_is_a_usage_error(ranks: tuple[Path, Path], token_file: Path) -> None:
    con, buf = _console()
    assert verify_command([ranks[0]], token_file, worker_id="", console=con) == EXIT_USAGE
    assert "--worker-id" in buf.getvalue()


def test_cli_argparse_and_real_process(ranks: tuple[Path, Path], token_file: Path) -> None:
    import argparse

    r0, r1 = ranks
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    con, _ = _console()
    args = parser.parse_args(["verify", str(r0), "--token-file", str(token_file), "--worker-id", RANK0])
    assert run(args, console=con) == EXIT_OK
    res = run_cli("audit", "verify", r1, "--token-file", token_file, "--worker-id", RANK0)
    assert res.returncode == EXIT_BROKEN, res.stdout + res.stderr
    assert "BROKEN" in res.stdout and RANK1 in res.stdout
    res = run_cli("audit", "verify", r1, "--token-file", token_file, "--worker-id", RANK1)
    assert res.returncode == EXIT_OK and RANK1 in res.stdout, res.stdout + res.stderr
