"""Exit statuses: what ``vram-residency --help`` says they are, and that the commands keep to it.
The verifiers (``attest``, ``audit verify``) keep 1 for a failed check only: a mistyped command
line must not read as a tampered worker or log. Real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.cli_helpers import run


def test_help_documents_the_exit_statuses() -> None:
    text = " ".join(run("--help").stdout.split())
    for line in (
        "0 success",
        "1 a check failed",
        "2 usage",
        "70 internal error",
        "130 interrupted",
        "143 terminated",
        "3 with --exit-on-stop once the worker entered Stopped",
    ):
        assert line in text, text


@pytest.mark.parametrize(
    "case", ["missing-token", "open-token", "no-url", "bad-url", "missing-seals", "bad-nonce-store"]
)
def test_attest_usage_problems_exit_2_not_1(tmp_path: Path, token_file: Path, case: str) -> None:
    # Exit 1 is "a worker failed the check or did not answer"; these never asked a worker.
    args = ["attest", "http://127.0.0.1:9", "--token-file", str(token_file), "--timeout", "1"]
    if case == "missing-token":
        args[3] = str(tmp_path / "nope")
    elif case == "open-token":
        token_file.chmod(0o644)
    elif case == "no-url":
        del args[1]
    elif case == "bad-url":
        args[1] = "ftp://127.0.0.1:9"
    elif case == "missing-seals":
        args += ["--seals", str(tmp_path / "nope.json")]
    else:
        store = tmp_path / "nonces"
        store.write_text("not json\n")
        args += ["--nonce-store", str(store)]
    out = run(*args)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert out.stdout == "" and "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_attest_worker_that_does_not_answer_exits_1(token_file: Path) -> None:
    out = run("attest", "http://127.0.0.1:9", "--token-file", str(token_file), "--timeout", "1")
    assert out.returncode == 1 and "NO ANSWER" in out.stdout, (out.stdout, out.stderr)


def test_an_internal_error_exits_70_with_its_traceback() -> None:
    # A command with a bug, registered the way every command is: the exit status must not be 1,
    # which the verifiers use for "tampered" or "refused".
    code = (
        "import sys\n"
        "from vram_residency.cli import main as m\n"
        "def register(sub):\n"
        "    p = sub.add_parser('buggy')\n"
        "    p.set_defaults(func=lambda args: [][1])\n"
        "sys.modules['buggy_cmd'] = type(sys)('buggy_cmd')\n"
        "sys.modules['buggy_cmd'].register = register\n"
        "m._COMMANDS.append('buggy_cmd')\n"
        "sys.exit(m.main(['buggy']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 70, (out.returncode, out.stderr)
    assert "IndexError" in out.stderr and "internal error" in out.stderr, out.stderr
