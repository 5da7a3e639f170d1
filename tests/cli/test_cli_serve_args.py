"""``vram-residency serve``'s number options given NaN or infinity: refused before the worker
starts (exit 2, one line), not a traceback at start, nor a worker that serves and then fails its
own shutdown (``--drain-timeout nan``). Real processes; a worker that starts anyway is stopped by
the timeout and fails the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.cli_helpers import host_serve, run

OPTIONS = [
    "--drain-timeout",
    "--header-timeout",
    "--scrub-interval",
    "--scrub-budget",
    "--max-seal-age",
    "--host-capacity-gib",
    "--tp-timeout",
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("option", OPTIONS)
def test_serve_refuses_non_finite_numbers(tmp_path: Path, option: str, value: str) -> None:
    out = run(*host_serve(tmp_path), f"{option}={value}", timeout=30)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert f"argument {option}" in out.stderr and "not a finite number" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stdout == ""
