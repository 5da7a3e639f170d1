"""The worker's configuration in llama-orch's form (WORKER-4980s): a JSON file and ``WORKER_*``
environment variables, validated at start with clear errors.

JSON file (``serve --config FILE``): required ``worker_id``, ``pool_id``, ``model_path``,
``rpc_port``, ``readiness_callback_url``, ``gpu_device``; optional ``slots_total`` (the batch
size), ``max_tokens``, ``max_prompt_len``, ``execution_timeout_ms``, ``api_token_file``, and this
project's ``bind_addr``, ``audit_log``, ``state_dir``, ``drain_timeout_ms``, ``max_models``,
``ready_public``, ``max_tensors``, ``strict_params``, ``exit_on_stop``. Unknown keys are refused
by name.

Environment: ``WORKER_API_TOKEN_FILE``, ``WORKER_BIND_ADDR`` (default ``127.0.0.1:8001``),
``WORKER_GPU_DEVICE`` (default 0), ``WORKER_LOG_LEVEL`` (default ``info``). The file wins over the
environment; of the command line only ``--host``/``--port`` win over both.

This is the *spec mode*: the token file defaults to ``/etc/llorch/worker-token`` and must exist
(fail fast); nothing is created. The bare ``serve`` without ``--config`` is the newcomer mode
(README): it creates a token in the state directory on first run.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from vram_residency._regularfile import read_regular
from vram_residency.errors import ConfigError, InvalidInput
from vram_residency.service.callbacks import check_callback_url
from vram_residency.shard import parse_record_text

__all__ = [
    "DEFAULT_BIND_ADDR",
    "DEFAULT_TOKEN_PATH",
    "SpecConfig",
    "load_spec_config",
    "parse_bind_addr",
]

DEFAULT_TOKEN_PATH: Final = Path("/etc/llorch/worker-token")
DEFAULT_BIND_ADDR: Final = "127.0.0.1:8001"
_LOG_LEVELS: Final = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_REQUIRED: Final = ("worker_id", "pool_id", "model_path", "rpc_port", "readiness_callback_url", "gpu_device")
_OPTIONAL: Final = (
    "slots_total",
    "max_tokens",
    "max_prompt_len",
    "execution_timeout_ms",
    "api_token_file",
    "bind_addr",
    "audit_log",
    "state_dir",
    "drain_timeout_ms",
    "max_models",
    "ready_public",
    "max_tensors",
    "strict_params",
    "exit_on_stop",
)


@dataclass(frozen=True, slots=True)
class SpecConfig:
    worker_id: str
    pool_id: str
    model_path: Path
    host: str
    port: int
    readiness_callback_url: str
    gpu_device: int
    token_file: Path
    log_level: int
    slots_total: int | None = None
    max_tokens: int | None = None
    max_prompt_len: int | None = None
    execution_timeout_ms: int | None = None
    audit_log: Path | None = None
    state_dir: Path | None = None
    drain_timeout_ms: int | None = None
    max_models: int | None = None
    ready_public: bool = False
    max_tensors: int | None = None
    #: None: not in the file (the command line's --strict-params then stands, as for the other
    #: optional keys).
    strict_params: bool | None = None
    #: ``serve --exit-on-stop`` (None: not in the file, the command line's flag stands).
    exit_on_stop: bool | None = None


def check_port(port: object, what: str = "port") -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{what} must be an integer from 1 to 65535, not {port!r}")
    return port


def parse_bind_addr(value: str, what: str = "WORKER_BIND_ADDR") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) with a valid address and port."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError(f"{what} must be HOST:PORT, not {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"{what}: {host!r} is not an IP address (or localhost)") from None
    return host, check_port(int(port_text), f"{what} port")


def _int(raw: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = raw.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"config {key} must be an integer from {lo} to {hi}, not {v!r}")
    return v


def _str(raw: Mapping[str, Any], key: str) -> str:
    v = raw.get(key)
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"config {key} must be a non-empty string")
    return v


_MAX_CONFIG_BYTES = 1 << 20


def load_spec_config(path: Path, env: Mapping[str, str] | None = None) -> SpecConfig:
    """Read and validate the JSON config file and the ``WORKER_*`` environment."""
    env = os.environ if env is None else env
    try:
        # Regular files only (a FIFO would block the start, /dev/zero fill the memory); a config
        # is a few hundred bytes.
        data = read_regular(path, _MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        # Strict: a repeated key ({"rpc_port": 8001, "rpc_port": 9000}) is refused, not read as
        # its last value (4991: validated at start, nothing ambiguous taken).
        raw = parse_record_text(data, f"config file {path}")
    except InvalidInput as exc:
        raise ConfigError(str(exc)) from None
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {', '.join(unknown)}")
    missing = [
        k for k in _REQUIRED if k not in raw and not (k == "gpu_device" and "WORKER_GPU_DEVICE" in env)
    ]
    if missing:
        raise ConfigError(f"config file {path}: missing required keys {', '.join(missing)}")
    level_name = env.get("WORKER_LOG_LEVEL", "info").lower()
    if level_name not in _LOG_LEVELS:
        raise ConfigError(f"WORKER_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, not {level_name!r}")
    # Checked whenever it is set, also when the file's gpu_device wins over it: a bad value is
    # a configuration error to say at start (4991), not one to ignore.
    text = env.get("WORKER_GPU_DEVICE", "0")
    if not (text.isascii() and text.isdigit()):
        raise ConfigError(f"WORKER_GPU_DEVICE must be a GPU ordinal (0, 1, ...), not {text!r}")
    gpu = raw.get("gpu_device")
    if gpu is None:
        gpu = int(text)
    if isinstance(gpu, bool) or not isinstance(gpu, int) or not 0 <= gpu <= 1023:
        raise ConfigError(f"config gpu_device must be a GPU ordinal, not {gpu!r}")
    bind = raw.get("bind_addr") or env.get("WORKER_BIND_ADDR") or DEFAULT_BIND_ADDR
    if not isinstance(bind, str):
        raise ConfigError("config bind_addr must be a string HOST:PORT")
    host, port = parse_bind_addr(bind, "bind_addr" if raw.get("bind_addr") else "WORKER_BIND_ADDR")
    # rpc_port is the spec's; when both are given they must agree.
    rpc_port = check_port(raw.get("rpc_port"), "config rpc_port")
    if "bind_addr" in raw or "WORKER_BIND_ADDR" in env:
        if rpc_port != port:
            raise ConfigError(f"config rpc_port {rpc_port} and the bind address port {port} differ")
    else:
        port = rpc_port
    token = raw.get("api_token_file") or env.get("WORKER_API_TOKEN_FILE") or str(DEFAULT_TOKEN_PATH)
    if not isinstance(token, str):
        raise ConfigError("config api_token_file must be a path")
    ready_public = raw.get("ready_public", False)
    if not isinstance(ready_public, bool):
        raise ConfigError("config ready_public must be true or false")
    strict_params = raw.get("strict_params")
    if strict_params is not None and not isinstance(strict_params, bool):
        raise ConfigError("config strict_params must be true or false")
    exit_on_stop = raw.get("exit_on_stop")
    if exit_on_stop is not None and not isinstance(exit_on_stop, bool):
        raise ConfigError("config exit_on_stop must be true or false")

    def opt_path(key: str) -> Path | None:
        v = raw.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not v:
            raise ConfigError(f"config {key} must be a path")
        return Path(v)

    return SpecConfig(
        worker_id=_str(raw, "worker_id"),
        pool_id=_str(raw, "pool_id"),
        model_path=Path(_str(raw, "model_path")),
        host=host,
        port=port,
        readiness_callback_url=check_callback_url(_str(raw, "readiness_callback_url")),
        gpu_device=gpu,
        token_file=Path(token),
        log_level=_LOG_LEVELS[level_name],
        slots_total=_int(raw, "slots_total", 1, 4096),
        max_tokens=_int(raw, "max_tokens", 1, 1 << 20),
        max_prompt_len=_int(raw, "max_prompt_len", 1, 1 << 26),
        execution_timeout_ms=_int(raw, "execution_timeout_ms", 0, 1 << 40),
        audit_log=opt_path("audit_log"),
        state_dir=opt_path("state_dir"),
        drain_timeout_ms=_int(raw, "drain_timeout_ms", 0, 1 << 40),
        max_models=_int(raw, "max_models", 1, 64),
        ready_public=ready_public,
        max_tensors=_int(raw, "max_tensors", 1, 1 << 31),
        strict_params=strict_params,
        exit_on_stop=exit_on_stop,
    )
