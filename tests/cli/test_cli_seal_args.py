"""``vram-residency seal``'s options given nonsense: a usage error naming the option in words an
operator reads (exit 2), no internal names, and a range that says what is accepted."""

from __future__ import annotations

import pytest

from tests.cli.cli_helpers import run


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("abc", "'abc' is not a number"),  # was "invalid _mib value: 'abc'"
        ("nan", "at least 1 byte and at most 256 MiB"),
        ("inf", "at least 1 byte and at most 256 MiB"),
        ("257", "at least 1 byte and at most 256 MiB"),
        ("1e-300", "at least 1 byte and at most 256 MiB"),  # was "between 1 and 256 MiB"
    ],
)
def test_staging_mib_errors_name_what_is_accepted(value: str, says: str) -> None:
    out = run("seal", "--backend", "host", "--staging-mib", value, "weights.bin")
    assert out.returncode == 2, out.stderr
    assert "argument --staging-mib" in out.stderr and says in out.stderr and "_mib" not in out.stderr, (
        out.stderr
    )
