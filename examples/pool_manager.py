"""A pool manager driving one worker the way llama-orch's contract says: plan -> commit -> ready
-> execute -> drain. It uses only the contract's request and response shapes (no project
additions), so it is also a check that a spec-shaped client works unchanged.

    python examples/pool_manager.py --url http://127.0.0.1:8001 --token-file /etc/llorch/worker-token \\
        --model-ref random-byte-lm --model-path /models/random-byte-lm/model.safetensors --pid 12345

``--pid`` is the worker's process (a pool manager starts its workers, so it has it): the drain is
SIGTERM, as the contract has it. Without ``--pid`` the script stops after the execute.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def _check(r: httpx.Response, what: str) -> dict[str, Any]:
    if r.status_code != 200:
        raise SystemExit(f"{what}: HTTP {r.status_code}: {r.text}")
    body: dict[str, Any] = r.json()
    return body


def run(url: str, token: str, model_ref: str, model_path: Path | None, pid: int | None) -> dict[str, Any]:
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    out: dict[str, Any] = {}

    plan = _check(
        client.post("/worker/plan", json={"model_ref": model_ref, "shard_layout": "single", "tp_degree": 1}),
        "plan",
    )
    print(f"plan: feasible={plan['feasible']} vram_required={plan['vram_required']}")
    if not plan["feasible"]:
        raise SystemExit(f"plan: not feasible: {plan.get('reason')}")
    out["plan"] = plan

    commit: dict[str, Any] = {"model_ref": model_ref, "shard_id": "shard-0", "shard_index": 0}
    if model_path is not None:
        commit["model_bytes"] = str(model_path)
        # Bare hex: the SHA-256 of the bytes, what `sha256sum` prints (WORKER-4223).
        h = hashlib.sha256()
        with model_path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        commit["expected_digest"] = h.hexdigest()
    committed = _check(client.post("/worker/commit", json=commit), "commit")
    handle = committed["handle"]
    print(f"commit: sealed={committed['sealed']} handle={handle['shard_id']} digest={handle['digest']}")
    out["commit"] = committed

    ready = _check(client.get("/worker/ready"), "ready")
    print(f"ready: ready={ready['ready']} handles={[h['shard_id'] for h in ready['handles']]}")
    if not ready["ready"]:
        raise SystemExit("ready: the worker is not ready after a successful commit")
    out["ready"] = ready

    tokens: list[str] = []
    end: dict[str, Any] | None = None
    body = {
        "handle_id": handle["shard_id"],
        "prompt": "Hello, world!",
        "params": {"max_tokens": 16, "temperature": 0.7, "seed": 42},
    }
    with client.stream("POST", "/worker/execute", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise SystemExit(f"execute: HTTP {r.status_code}: {r.text}")
        event = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "token":
                    tokens.append(data["t"])
                elif event == "end":
                    end = data
                elif event == "error":
                    raise SystemExit(f"execute: error event: {data}")
    if end is None:
        raise SystemExit("execute: the stream ended without an end event")
    print(f"execute: {end['tokens_out']} tokens in {end['decode_time_ms']} ms: {''.join(tokens)!r}")
    out["execute"] = {"tokens": tokens, "end": end}

    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        states = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                states.append(httpx.get(url + "/health", timeout=2).json()["state"])
            except httpx.TransportError:
                break  # the worker has released its memory and exited
            time.sleep(0.02)
        print(f"drain: states seen {sorted(set(states))}; worker gone")
        out["drain"] = states
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8001")
    p.add_argument("--token-file", type=Path, default=Path("/etc/llorch/worker-token"))
    p.add_argument("--model-ref", required=True)
    p.add_argument("--model-path", type=Path, help="commit these bytes by path (with their SHA-256)")
    p.add_argument("--pid", type=int, help="the worker's process id: drain it with SIGTERM at the end")
    args = p.parse_args()
    token = args.token_file.read_text().strip()
    run(args.url, token, args.model_ref, args.model_path, args.pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
