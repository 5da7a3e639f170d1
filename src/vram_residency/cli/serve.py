"""``vram-residency serve``: the worker service (seal at start, authenticated API, scrubbing).

With no arguments it serves the generated example model (a small byte-level decoder with RANDOM
weights: its tokens are noise; it runs seal -> verify -> execute on real compute) on the best
backend present, on 127.0.0.1, with a token file it creates (mode 0600) in the state directory.
all-MiniLM-L6-v2 (an embedding model) is committable by name when its package is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import shlex
import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from vram_residency.cli._args import finite

if TYPE_CHECKING:
    from vram_residency.service.server import ServeOptions
    from vram_residency.service.tp import TPEnv

# The service (FastAPI, uvicorn) is imported when `serve` runs, not when the CLI starts: every
# other subcommand would otherwise pay seconds of import time for it.
_DEFAULT_PORT = 8321


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _device_list(text: str) -> tuple[int, ...]:
    """``0,1,3`` -> (0, 1, 3); argparse turns the ValueError into a usage error."""
    try:
        ids = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU ordinals like 0,1 (not {text!r})") from None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"expected distinct GPU ordinals like 0,1 (not {text!r})")
    return ids


def _say(line: str = "") -> None:
    print(line, flush=True)


def _spec_options(args: argparse.Namespace) -> dict[str, object]:
    """``--config FILE``: llama-orch's JSON config and WORKER_* environment (spec mode)."""
    import logging

    from vram_residency.service.config import load_spec_config

    cfg = load_spec_config(args.config)
    logging.getLogger().setLevel(cfg.log_level)
    out: dict[str, object] = {
        "host": cfg.host,
        "port": cfg.port,
        "worker_id": cfg.worker_id,
        "pool_id": cfg.pool_id,
        "model_path": cfg.model_path,
        "readiness_callback_url": cfg.readiness_callback_url,
        "device": cfg.gpu_device,
        "token_file": cfg.token_file,
        "spec_mode": True,
        "ready_public": cfg.ready_public,
    }
    optional = {
        "max_batch": cfg.slots_total,
        "max_tokens": cfg.max_tokens,
        "max_prompt_chars": cfg.max_prompt_len,
        "execution_timeout": None if cfg.execution_timeout_ms is None else cfg.execution_timeout_ms / 1e3,
        "drain_timeout": None if cfg.drain_timeout_ms is None else cfg.drain_timeout_ms / 1e3,
        "audit_log": cfg.audit_log,
        "state_dir": cfg.state_dir,
        "max_models": cfg.max_models,
        "max_tensors": cfg.max_tensors,
        "strict_params": cfg.strict_params,
        "exit_on_stop": cfg.exit_on_stop,
    }
    out.update({k: v for k, v in optional.items() if v is not None})
    return out


def _state_dir(opts: ServeOptions) -> Path:
    from vram_residency.service.auth import default_state_dir

    return opts.state_dir or default_state_dir()


def _lead(opts: ServeOptions, env: TPEnv, timeout_s: float) -> ServeOptions:
    """Rank 0 of a tensor-parallel group: the token file first (the others read it after the
    rendezvous), then the group, then the usual worker built over it."""
    from vram_residency.service.tp import TPLeader, group_token, init_group, make_tp_worker, resolve_backend

    backend = resolve_backend(opts.backend)
    state = _state_dir(opts)
    token = group_token(opts.token_file, state, spec_mode=opts.spec_mode, create=True)
    _say(f"  tensor-parallel: rank 0 of {env.world}, waiting for every rank (timeout {timeout_s:g} s)")
    group = init_group(env, backend, timeout_s)
    leader = TPLeader(group, token, state / "tp-parts")
    return dataclasses.replace(
        opts, make_worker=make_tp_worker(leader), device=env.local_rank, backend=backend, max_models=1
    )


def _follow(opts: ServeOptions, env: TPEnv, timeout_s: float) -> int:
    """Rank k >= 1: no HTTP; hold and verify this rank's part, run rank 0's commands. Exits the
    process (a group whose peer is gone cannot be torn down cleanly; everything is closed first)."""
    import os
    import socket
    import sys

    from vram_residency.service.tp import group_token, init_group, resolve_backend, run_follower

    backend = resolve_backend(opts.backend)
    group = init_group(env, backend, timeout_s)
    state = _state_dir(opts)
    token = group_token(opts.token_file, state, spec_mode=opts.spec_mode, create=False)
    host = socket.gethostname()
    worker_id = f"{opts.worker_id}-rank{env.rank}" if opts.worker_id else f"worker-{host}-{env.local_rank}"
    # Every rank keeps its own audit log beside rank 0's (two writers of one file would break it).
    log_path = opts.audit_log or state / "audit.jsonl"
    audit = log_path.with_name(f"{log_path.stem}-rank{env.rank}{log_path.suffix}")
    print(f"vram-residency rank {env.rank} of {env.world}: following rank 0 ({backend})", flush=True)
    status = run_follower(
        group,
        token,
        worker_id=worker_id,
        audit_path=audit,
        capacity_bytes=opts.capacity_bytes,
        max_tensors=opts.max_tensors,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _run(args: argparse.Namespace) -> int:
    from vram_residency.service.context import CorrelationFilter, StructuredFormatter
    from vram_residency.service.executors.example_model import EXAMPLE_NAMES
    from vram_residency.service.server import (
        DEFAULT_PORT,
        EXIT_STOPPED,
        ServeOptions,
        bind_socket,
        build,
        check_options,
        describe_token,
        harden_process,
        serve,
    )

    assert DEFAULT_PORT == _DEFAULT_PORT
    import logging

    for h in logging.getLogger().handlers:
        # Structured fields (correlation id, job, model, fp6, human narration) on every line.
        h.addFilter(CorrelationFilter())
        h.setFormatter(StructuredFormatter(base=h.formatter))
    spec = _spec_options(args) if args.config is not None else {}
    args.host_given, args.port_given = args.host is not None, args.port is not None
    cli = dict(
        host=args.host if args.host is not None else "127.0.0.1",
        port=args.port if args.port is not None else _DEFAULT_PORT,
        model_dir=args.model_dir,
        model=args.model,
        example=args.example,
        token_file=args.token_file,
        state_dir=args.state_dir,
        audit_log=args.audit_log,
        backend=args.backend,
        device=args.device,
        devices=args.devices,
        max_seal_age=args.max_seal_age,
        seal_age_policy=args.seal_age_policy,
        worker_id=args.worker_id,
        capacity_bytes=int(args.host_capacity_gib * 2**30) if args.host_capacity_gib else None,
        scrub_interval=args.scrub_interval,
        scrub_budget=args.scrub_budget / 100.0,
        max_body_bytes=args.max_body_bytes,
        max_batch=args.max_batch,
        metrics_auth=args.metrics_auth,
        access_log=args.access_log,
        pre_verify=not args.benchmark_skip_pre_verify,
        blas_threads=args.blas_threads,
        max_models=args.max_models,
        drain_timeout=args.drain_timeout,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        ready_public=args.ready_public,
        strict_params=args.strict_params,
        exit_on_stop=args.exit_on_stop,
        pool_id=args.pool_id,
        readiness_callback_url=args.readiness_callback_url,
        commit_keys=tuple(args.commit_signing_key or ()),
        **({"max_tokens": args.max_tokens} if args.max_tokens is not None else {}),
        **({"max_model_bytes": args.max_model_bytes} if args.max_model_bytes is not None else {}),
        **({"max_tensors": args.max_tensors} if args.max_tensors is not None else {}),
        **({"max_prompt_chars": args.max_prompt_chars} if args.max_prompt_chars is not None else {}),
    )
    # Spec mode: the config file's values are used; of the command line only --host/--port win.
    for key, value in spec.items():
        if (key == "host" and args.host_given) or (key == "port" and args.port_given):
            continue
        cli[key] = value
    opts = ServeOptions(**cli)
    check_options(opts)
    from vram_residency.service.tp import tp_env

    group = tp_env()  # launched by torchrun as one rank of a tensor-parallel group
    if group is not None and group.rank != 0:
        return _follow(opts, group, args.tp_timeout)
    # Bound before anything is printed: a busy port fails here, not after the banner (#17.19).
    sock = bind_socket(opts.host, opts.port)
    opts = dataclasses.replace(opts, port=int(sock.getsockname()[1]))  # --port 0: the port taken
    term = _TermBeforeServing()
    try:
        fds = harden_process()
        _say("vram-residency worker: starting")
        if group is not None:
            opts = _lead(opts, group, args.tp_timeout)
        built = build(opts)
    except _Terminated:
        sock.close()
        term.restore()
        _say("vram-residency worker: stopped by SIGTERM before it served (nothing left allocated)")
        return 0
    except BaseException:
        sock.close()
        term.restore()
        raise
    term.built = True
    w = built.worker
    _say(f"  backend:    {w.backend_description}")
    if w.emulated:
        why = "no usable GPU was found" if args.backend == "auto" else "--backend host was given"
        _say(
            f"  NOTE:       {why}: this worker runs on the HOST EMULATION. Its 'device memory' is "
            "ordinary host RAM, not VRAM; seals and verification work the same way, but nothing "
            "here is GPU-resident."
        )
    for m in w.models():
        _say(f"  model:      {m.name}: {m.shard.vram_bytes} bytes sealed as {m.shard.shard_id}")
        _say(f"              {m.shard.digest_algorithm} {m.shard.digest}")
        _say(f"              {m.executor_note}")
        if m.name in EXAMPLE_NAMES.values():
            _say(
                "  NOTE:       the example model's weights are RANDOM (generated from a fixed seed, "
                "not trained): its tokens are noise. It is there to run seal -> verify -> execute "
                "on real compute."
            )
    others = [n for n in w.catalog.names() if n not in {m.name for m in w.models()}]
    if others:
        _say(f"  built in:   {', '.join(others)} (POST /worker/commit by name)")
    if not w.models():
        _say("  model:      none committed yet (POST /worker/commit)")
    if built.worker.catalog.model_dir is not None:
        _say(f"  model dir:  {built.worker.catalog.model_dir}")
    _say(f"  token:      {describe_token(built)}")
    _say(f"  audit log:  {built.audit_path}")
    if opts.scrub_interval > 0:
        _say(
            f"  scrubber:   every {opts.scrub_interval:g} s, at most {100 * opts.scrub_budget:g}% "
            "of wall time spent verifying"
        )
    else:
        _say("  scrubber:   off (--scrub-interval 0)")
    if not opts.pre_verify:
        _say(
            "  WARNING:    BENCHMARK MODE (--benchmark-skip-pre-verify): executions are NOT verified "
            "first. Never serve real traffic like this."
        )
    if not _is_loopback(opts.host):
        _say(
            f"  WARNING:    listening on {opts.host}, not loopback: the API is plain HTTP and the bearer "
            "token crosses the network in clear text; put TLS in front of it."
        )
    url = f"http://{opts.host}:{opts.port}"
    _say(f"  listening:  {url}   (Ctrl-C to stop; shards are zeroed and freed on exit)")
    _say(
        f"  limits:     {fds} open files, {opts.max_connections} connections, "
        f"{opts.header_timeout:g} s to send a request head; drain timeout {opts.drain_timeout:g} s"
    )
    token_path = shlex.quote(str(built.token_source.path))
    _say("  try:")
    # The header reaches curl as a config on stdin (-K -), written by the shell's builtin printf:
    # a token in curl's arguments is in `ps` and /proc/PID/cmdline for every user of the machine.
    _say(
        f'    printf \'header = "Authorization: Bearer %s"\\n\' "$(cat {token_path})" | '
        f"curl -N -K - -H 'Content-Type: application/json' "
        f'-d \'{{"prompt": "hello world"}}\' {url}/worker/execute'
    )
    _say("    (without handle_id, execute runs the first model committed; name another with handle_id)")
    # SIGTERM/SIGINT drain (see DrainingServer); a second Ctrl-C stops at once.
    status = 1
    with contextlib.suppress(KeyboardInterrupt):
        status = serve(built, sock, stop_pending=lambda: term.pending)
    term.restore()
    if status == 0:
        _say("vram-residency worker: stopped (shards zeroed and freed)")
    elif status == EXIT_STOPPED:
        freed = "SHUTDOWN FAILED (see the log)" if built.shutdown_error else "shards zeroed and freed"
        _say(
            f"vram-residency worker: Stopped by a security incident (--exit-on-stop): {freed}; "
            f"exit status {status}"
        )
    else:
        _say("vram-residency worker: SHUTDOWN FAILED (see the log); exit status 1")
    return status


class _Terminated(KeyboardInterrupt):
    """SIGTERM while the worker starts: unwinds the startup commit as Ctrl-C does (whatever was
    allocated is zeroed and freed, the worker closed)."""


class _TermBeforeServing:
    """SIGTERM from the start of ``build`` until uvicorn takes the signal over (WORKER-4960s:
    SIGTERM stops cleanly and exits 0, also while the startup model loads). While building it
    raises ``_Terminated`` in the main thread; once built it is remembered (``pending``), and the
    server drains as soon as it starts."""

    def __init__(self) -> None:
        self.built = False
        self.pending = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.built:
            self.pending = True
            return
        raise _Terminated

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the worker service (seal the model, serve the authenticated API, scrub)",
        description="Run the worker service. With no arguments: the generated example model "
        "(random-byte-lm: a small byte-level decoder with RANDOM weights, so its tokens are noise; "
        "it runs seal -> verify -> execute on real compute) on the best backend present, on "
        "127.0.0.1, with a token file created in the state directory. all-MiniLM-L6-v2 (an "
        "embedding model) is built in too when its package is installed.",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="llama-orch worker config (JSON; spec mode): worker_id, pool_id, model_path, rpc_port, "
        "readiness_callback_url, gpu_device, ...; WORKER_API_TOKEN_FILE, WORKER_BIND_ADDR (default "
        "127.0.0.1:8001), WORKER_GPU_DEVICE, WORKER_LOG_LEVEL are read too. The token file then "
        "defaults to /etc/llorch/worker-token and must exist",
    )
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=None, help=f"TCP port (default {_DEFAULT_PORT})")
    p.add_argument("--pool-id", help="the pool this worker belongs to (in callbacks and /worker/ready)")
    p.add_argument("--readiness-callback-url", help="the pool manager's callback URL (ready, failed)")
    p.add_argument(
        "--max-models",
        type=int,
        help="models held at once (default 1; 2 for a bare serve: the example and MiniLM)",
    )
    p.add_argument("--max-tokens", type=int, help="largest max_tokens of an execute (default 4096)")
    p.add_argument(
        "--max-model-bytes",
        type=int,
        help="largest model a commit may load, checked before anything is read (default 100 GB)",
    )
    p.add_argument(
        "--max-tensors",
        type=int,
        help="most tensors a committed model file's header may list, checked before anything is "
        "sealed (default 262144)",
    )
    p.add_argument(
        "--strict-params",
        action="store_true",
        help="refuse execute params other than max_tokens, temperature and seed, by name (default: "
        "accept them unused and name them in the started event's ignored_params)",
    )
    p.add_argument(
        "--max-prompt-chars", type=int, help="longest prompt of an execute, in characters (default 100000)"
    )
    p.add_argument(
        "--drain-timeout",
        type=finite,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long running jobs may take to finish (default 30)",
    )
    p.add_argument("--max-connections", type=int, default=512, help="concurrent connections (default 512)")
    p.add_argument(
        "--header-timeout",
        type=finite,
        default=10.0,
        metavar="SECONDS",
        help="a connection's time to send its request head; idle keep-alive time (default 10)",
    )
    p.add_argument(
        "--exit-on-stop",
        action="store_true",
        help="when the worker enters Stopped (a seal failure, a CUDA/driver error), shut down as a "
        "drain does (within --drain-timeout) and exit with status 3, for a supervisor to restart it "
        "(default: stay up, Stopped, for pool-managerd to inspect and restart)",
    )
    p.add_argument("--ready-public", action="store_true", help="answer GET /worker/ready without the token")
    p.add_argument(
        "--commit-signing-key",
        type=Path,
        action="append",
        help="Ed25519 public key (PEM) that commit signatures may be made with (repeatable)",
    )
    p.add_argument("--model-dir", type=Path, help="directory that model names are resolved in")
    p.add_argument(
        "--model",
        help="model to commit at start (a name in --model-dir or a built-in one; default without "
        "--model-dir: the generated example model)",
    )
    p.add_argument(
        "--example",
        choices=("small", "1gib"),
        default="small",
        help="which generated example model is built in (random weights, written to "
        "STATE_DIR/example-models/ on first use): small (random-byte-lm, 43 MB, the default) or "
        "1gib (random-byte-lm-1gib, about 1 GiB, for measuring verification on a GPU)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        help="worker token file (mode 0600); default: $WORKER_API_TOKEN_FILE, then "
        "$CREDENTIALS_DIRECTORY/worker_api_token, then STATE_DIR/worker.token (created if missing)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="where the default token file and audit log live "
        "(default $XDG_STATE_HOME/vram-residency or ~/.local/state/vram-residency)",
    )
    p.add_argument("--audit-log", type=Path, help="audit log file (default STATE_DIR/audit.jsonl)")
    p.add_argument(
        "--scrub-interval",
        type=finite,
        default=60.0,
        metavar="SECONDS",
        help="seconds between background verifications of every shard (default 60; 0 disables)",
    )
    p.add_argument(
        "--scrub-budget",
        type=finite,
        default=5.0,
        metavar="PERCENT",
        help="most of the wall time the scrubber may spend verifying (default 5)",
    )
    p.add_argument("--backend", choices=("auto", "cuda", "host"), default="auto")
    p.add_argument("--device", type=int, default=0, help="GPU ordinal (default 0)")
    p.add_argument(
        "--devices",
        type=_device_list,
        default=(),
        metavar="0,1,...",
        help="GPU ordinals the shard may be migrated to (POST /worker/shards/ID/migrate); "
        "default: --device only",
    )
    p.add_argument(
        "--max-seal-age",
        type=finite,
        default=0.0,
        metavar="SECONDS",
        help="with --benchmark-skip-pre-verify: oldest verification an execution may rely on "
        "(default 0: no limit)",
    )
    p.add_argument(
        "--seal-age-policy",
        choices=("reverify", "refuse"),
        default="reverify",
        help="a seal older than --max-seal-age: verify it before the batch (default) or refuse "
        "(503, retriable)",
    )
    p.add_argument(
        "--worker-id", help="worker id in seals and audit records (default worker-HOSTNAME-DEVICE)"
    )
    p.add_argument(
        "--host-capacity-gib",
        type=finite,
        help="host emulation only: emulated device memory size (default half of RAM)",
    )
    p.add_argument("--max-batch", type=int, default=64, help="most jobs per verified batch (default 64)")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=256 * 1024,
        help="largest request body accepted (default 256 KiB)",
    )
    p.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="threads of numpy's BLAS for the host executor (default 1; 0 leaves it as it is)",
    )
    p.add_argument("--metrics-auth", action="store_true", help="require the token for /metrics too")
    p.add_argument("--access-log", action="store_true", help="log one line per request (never headers)")
    p.add_argument(
        "--benchmark-skip-pre-verify",
        action="store_true",
        help="BENCHMARK ONLY: run executions WITHOUT verifying the seals first, to measure what "
        "verification costs. Shown in /health, /metrics and the audit log. Never use for real traffic.",
    )
    p.add_argument(
        "--tp-timeout",
        type=finite,
        default=30.0,
        metavar="SECONDS",
        help="under torchrun (a tensor-parallel group, rank 0 serves HTTP): how long a command, "
        "a collective verify or an all-reduce may wait for every rank before the group stops "
        "(default 30)",
    )
    p.set_defaults(func=_run)
