#!/usr/bin/env python3
"""Bootstrap and run vram-residency from a clone with nothing but python3 and pip.

    python3 dev.py serve [ARGS...]   # the worker service (the project's main job)
    python3 dev.py test  [ARGS...]   # lint, type-check and the test suite
    python3 dev.py run CMD [ARGS...] # any command inside the project's environment
    python3 dev.py demo              # seal a sample, flip one bit behind the seal's back, detect it

It installs uv (pinned) into .tools/, syncs .venv/ to uv.lock (every locked package at its locked
version; for `test` also torch, from a local CPU wheel where the machine has one; with the CUDA extra:
cuda-bindings, cuda-core and NVRTC, which install without a GPU and are used when one is present),
and runs inside it. `serve` and `run` run in your current directory (relative paths are yours);
`test` runs in the repository. To use the bare `vram-residency` command:

    python3 /path/to/repo/dev.py run vram-residency digest ./model.safetensors
    . /path/to/repo/.venv/bin/activate      # then `vram-residency ...` works in this shell

SIGINT and SIGTERM sent to dev.py are passed on to the command, and dev.py waits for it to end,
so `kill <pid of dev.py>` stops a server cleanly and leaves no orphan behind.
"""

from __future__ import annotations

import os
import signal
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


def _sync(for_tests: bool = False) -> None:
    # --inexact: every package the lock names is installed at its locked version, and nothing
    # else is removed. That keeps the tests' torch (below) when a later `run` or `serve` syncs.
    cmd = [str(_uv()), "sync", "--locked", "--inexact", "--quiet", "--extra", "example", "--extra", "cuda"]
    env = dict(os.environ, UV_PROJECT_ENVIRONMENT=str(VENV))
    wheel = _local_cpu_torch() if for_tests else None
    if for_tests and wheel is None:
        # The tests need torch (vram_residency.distributed runs its ranks on gloo). PyPI's Linux
        # torch is the multi-GB CUDA build: where the machine carries a CPU wheel for this Python,
        # it is installed beside the locked environment instead (below); else the locked
        # `distributed` extra. `serve` never imports torch.
        cmd += ["--extra", "distributed"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    if wheel is not None:
        subprocess.run(
            [str(_uv()), "pip", "install", "--quiet", "--python", str(VENV / "bin" / "python"), str(wheel)],
            check=True,
            cwd=ROOT,
            env=env,
        )


def _local_cpu_torch() -> Path | None:
    """A CPU build of torch on this machine's disk for the interpreter uv will use, if any."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    found = sorted(Path("/opt/wheels").glob(f"torch-*+cpu-{tag}-{tag}-manylinux*_x86_64.whl"))
    return found[-1] if found and os.uname().machine == "x86_64" else None


_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_SI_KERNEL = 0x80  # si_code of a signal the kernel sent, e.g. the terminal's Ctrl-C


def _exec(argv: list[str], cwd: Path | None = None) -> int:
    """Run ``argv`` in the project's environment; pass SIGINT/SIGTERM/SIGHUP on; wait for it.

    The signals are blocked here and taken with ``sigtimedwait``, which tells who sent them. One
    that another process sent to dev.py (``kill -INT``/``kill -TERM`` of its pid, a supervisor)
    is forwarded to the child. One the terminal sent (Ctrl-C, a hangup) reached the child already,
    since it shares dev.py's process group: forwarding it again would make a server see two
    Ctrl-Cs, which many take as "quit now, skip the clean shutdown".
    """
    env = dict(os.environ)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV)
    watched = {*_FORWARDED, signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                # The child starts with the signal mask dev.py had before blocking these.
                preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, old_mask),
            )
        except FileNotFoundError:
            print(f"dev.py: command not found: {argv[0]}", file=sys.stderr)
            return 127
        except PermissionError:
            print(f"dev.py: command not executable: {argv[0]}", file=sys.stderr)
            return 126
        while proc.poll() is None:
            info = signal.sigtimedwait(watched, 0.5)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            if info.si_code != _SI_KERNEL:
                proc.send_signal(info.si_signo)  # a no-op if it has ended meanwhile
        # Take any signal that came after the last wait, so unblocking cannot raise a late
        # KeyboardInterrupt here: the child it was meant for has ended.
        while signal.sigtimedwait(watched, 0) is not None:
            pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    rc = proc.returncode
    # A child killed by signal N reads as -N here; a shell reports that as 128 + N.
    return 128 - rc if rc < 0 else rc


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run" and not rest:
        print(
            "usage: python3 dev.py run CMD [ARGS...]   (e.g. dev.py run vram-residency --help)",
            file=sys.stderr,
        )
        return 2
    _sync(for_tests=cmd == "test")
    py = str(VENV / "bin" / "python")
    if cmd == "test":
        checked = ["src", "tests", "bench", "scripts", "examples", "dev.py"]
        for step in (
            [py, "-m", "ruff", "check", *checked],
            # The tree has one layout, ruff's: a diff never mixes a change with a re-wrap.
            [py, "-m", "ruff", "format", "--check", *checked],
            [py, "-m", "mypy"],  # pyproject.toml's [tool.mypy] names what it checks: src, tests, ...
        ):
            rc = _exec(step, cwd=ROOT)
            if rc:
                return rc
        return _exec([py, "-m", "pytest", *rest], cwd=ROOT)
    if cmd == "run":
        return _exec(rest)  # in the user's directory: `dev.py run vram-residency digest ./x`
    return _exec([str(VENV / "bin" / "vram-residency"), cmd, *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
