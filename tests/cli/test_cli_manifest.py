"""``vram-residency manifest`` and ``digest --manifest``: what they write, and what they must not
overwrite. Real processes, real files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.cli.cli_helpers import run


@pytest.mark.parametrize("command", [["manifest", "-o"], ["digest", "--manifest"]])
@pytest.mark.parametrize("alias", ["same", "link"])
def test_manifest_never_overwrites_a_model_file(tmp_path: Path, command: list[str], alias: str) -> None:
    # `manifest -o weights.bin weights.bin` replaced the weights with their own manifest.
    data = os.urandom(4096)
    model = tmp_path / "weights.bin"
    model.write_bytes(data)
    out_path = model
    if alias == "link":
        out_path = tmp_path / "link.bin"
        out_path.symlink_to(model)
    out = run(*command, str(out_path), str(model))
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "is one of the model files" in out.stderr, out.stderr
    assert model.read_bytes() == data


def test_digest_manifest_help_says_what_it_writes(tmp_path: Path) -> None:
    # The help said "both algorithms"; the manifest holds the chosen --algorithm only.
    model = tmp_path / "weights.bin"
    model.write_bytes(os.urandom(1000))
    man = tmp_path / "m.json"
    out = run("digest", "-a", "blake3", "--manifest", str(man), str(model))
    assert out.returncode == 0, out.stderr
    assert list(json.loads(man.read_text())["files"][0]["digests"]) == ["blake3"]
    help_text = " ".join(run("digest", "--help").stdout.split())
    assert "both algorithms" not in help_text or "for both algorithms" in help_text, help_text


@pytest.mark.parametrize("command", [["manifest", "-o"], ["digest", "--manifest"]])
@pytest.mark.parametrize("kind", ["device", "fifo", "link-to-dev-null"])
def test_manifest_never_replaces_a_device_or_fifo(tmp_path: Path, command: list[str], kind: str) -> None:
    # The manifest is written to a temp file renamed over OUT: `-o /dev/null` (run as root)
    # replaced /dev/null itself with a regular file. Shown here on a null device node of the
    # test's own, never on the machine's /dev/null.
    model = tmp_path / "weights.bin"
    model.write_bytes(os.urandom(100))
    out_path = tmp_path / "out"
    if kind == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(out_path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == "fifo":
        os.mkfifo(out_path)
    else:
        out_path.symlink_to("/dev/null")
    before = os.lstat(out_path)
    out = run(*command, str(out_path), str(model))
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "not a regular file" in out.stderr and "Traceback" not in out.stderr, out.stderr
    after = os.lstat(out_path)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
