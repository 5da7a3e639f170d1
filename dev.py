#!/usr/bin/env python3
"""Bootstrap and run vram-residency from a clone with nothing but python3 and pip.

    python3 dev.py serve [ARGS...]   # the worker service (the project's main job)
    python3 dev.py test  [ARGS...]   # lint, type-check and the test suite
    python3 dev.py run CMD [ARGS...] # any command inside the project's environment

It installs uv (pinned) into .tools/, syncs .venv/ exactly to uv.lock (with the CUDA extra:
cuda-bindings, cuda-core and NVRTC, which install without a GPU and are used when one is present),
and runs inside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

UV_VERSION = "0.13.9"
ROOT = Path(__file__).resolve().parent
TOOLS = ROOT / ".tools"
VENV = ROOT / ".venv"


def _uv() -> Path:
    uv = TOOLS / "bin" / "uv"
    if not uv.exists():
        print(f"dev.py: installing uv {UV_VERSION} into {TOOLS}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True, clear=True).create(TOOLS)
        subprocess.run(
            [str(TOOLS / "bin" / "python"), "-m", "pip", "install", "-q", f"uv=={UV_VERSION}"],
            check=True,
        )
    return uv


def _sync() -> None:
    cmd = [str(_uv()), "sync", "--locked", "--quiet", "--extra", "example", "--extra", "cuda"]
    env = dict(os.environ, UV_PROJECT_ENVIRONMENT=str(VENV))
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def _exec(argv: list[str]) -> int:
    env = dict(os.environ)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env)
    # Ctrl-C in a terminal reaches the child too (same process group): wait for it to finish its
    # own clean shutdown (serve zeroes and frees its shards) instead of dying with a traceback.
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    _sync()
    py = str(VENV / "bin" / "python")
    if cmd == "test":
        for step in (
            [py, "-m", "ruff", "check", "src", "tests", "bench", "scripts", "examples", "dev.py"],
            [py, "-m", "mypy"],
        ):
            rc = _exec(step)
            if rc:
                return rc
        return _exec([py, "-m", "pytest", *rest])
    if cmd == "run":
        return _exec(rest)
    return _exec([str(VENV / "bin" / "vram-residency"), cmd, *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
