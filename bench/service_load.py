#!/usr/bin/env python3
"""Load test of the worker service, and what verification before every execute costs.

Part 1, load (issue 6): ``vram-residency serve`` (the example model, defaults: pre-verification on,
scrubber on) runs in its own process on loopback; ``--clients`` concurrent clients (64) each send
``POST /worker/execute`` in a loop for ``--duration`` seconds (60) and read the whole SSE stream.
Reported: requests, errors (any status but 200, or a stream without a correct ``end`` event),
p50/p90/p99/max latency of a complete execute, throughput, and the server's own counters (batches,
verification passes). After a clean shutdown the audit chain is verified with the worker token.

Part 2, verification overhead (target: verification before execute adds at most 5% to the p50
latency of an execute of the example model on the host backend). Two servers run side by side:
A as in part 1, B with ``--benchmark-skip-pre-verify`` (executions are NOT verified first; a
benchmark-only switch). Both with the scrubber off, so that only pre-verification differs. Phases
alternate A, B, A, B, ... (``--rounds`` each) so that drift of this shared machine hits both
alike; each phase runs ``--phase-seconds``. Two loads: one client at a time (the latency of a
single execute) and ``--clients`` concurrent clients (a loaded worker, where one verification pass
is shared by the batch of jobs that waited for it). p50 over all of A's samples against all of B's.

The clients are threads of this process (one keep-alive connection each), on the same machine.

    .venv/bin/python bench/service_load.py [--clients 64] [--duration 60] [--no-write]

Writes ``bench/results/service-load-<date>.json`` and ``.md``. :func:`run_clients` is the load
loop, used by the short version in the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
TARGET_OVERHEAD = 0.05

#: A fixed mix of ordinary sentences (5 to 40 words): what a sentence encoder is fed.
PROMPTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating a piece of bread.",
    "GPU memory can flip bits under heavy row activation.",
    "The weather in the mountains changes quickly in the afternoon, so hikers start early.",
    "Sealed weights are verified on the device before every execution of the model.",
    "She handed him the report, and he read it twice before saying anything at all.",
    "What is the capital of France?",
    "Machine learning models are increasingly deployed on shared infrastructure, where other "
    "tenants, buggy kernels and hardware faults can all change bytes in memory without notice.",
    "Please summarize the main arguments of the attached paper in three sentences.",
    "A cheetah is running behind its prey across the dry savanna grass.",
    "The orchestrator commits a model by name and the worker seals it into device memory.",
    "I would like to book a table for two at seven o'clock tonight.",
    "Rowhammer attacks repeatedly access memory rows to disturb neighbouring cells.",
    "Embeddings map sentences with similar meanings to nearby points in a vector space, which "
    "makes them useful for search, clustering and deduplication of large text collections.",
    "Thank you!",
]


@dataclass
class LoadResult:
    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def requests(self) -> int:
        return len(self.latencies_ms) + self.errors

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 2),
            "requests": self.requests,
            "ok": len(lat),
            "errors": self.errors,
            "error_samples": self.error_samples[:5],
            "throughput_rps": round(len(lat) / self.seconds, 2) if self.seconds else 0.0,
            "p50_ms": round(_pct(lat, 50), 2),
            "p90_ms": round(_pct(lat, 90), 2),
            "p99_ms": round(_pct(lat, 99), 2),
            "max_ms": round(lat[-1], 2) if lat else float("nan"),
        }


def _pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(-(-p * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


def _check_stream(text: str) -> str | None:
    """None if the SSE stream is a complete, correct execute; else what is wrong."""
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            events.append((lines.get("event"), lines.get("data", "")))
    if not events or events[0][0] != "started":
        return "no started event"
    if events[-1][0] != "end":
        return f"last event is {events[-1][0]}: {events[-1][1][:200]}"
    end = json.loads(events[-1][1])
    if end.get("dimension") != len(end.get("embedding", ())):
        return "end event without a full embedding"
    return None


def _client(host: str, port: int, token: str, stop_at: float, result: LoadResult, offset: int) -> None:
    # One keep-alive connection per client, as an orchestrator would hold. The standard
    # library's http.client in threads: httpx's async pool spent 16 ms of CPU per request here
    # with 64 connections, which made the load generator, not the worker, the bottleneck.
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection(host, port, timeout=300)
    i = offset
    try:
        while time.perf_counter() < stop_at:
            body = json.dumps({"prompt": PROMPTS[i % len(PROMPTS)]})
            i += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/worker/execute", body=body, headers=headers)
                resp = conn.getresponse()
                text = resp.read().decode()
                problem = None if resp.status == 200 else f"HTTP {resp.status}: {text[:200]}"
                if problem is None:
                    problem = _check_stream(text)
            except (OSError, http.client.HTTPException) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=300)
            t1 = time.perf_counter()
            with result.lock:
                if problem is None:
                    result.latencies_ms.append(1e3 * (t1 - t0))
                else:
                    result.errors += 1
                    if len(result.error_samples) < 20:
                        result.error_samples.append(problem)
    finally:
        conn.close()


def run_clients(url: str, token: str, clients: int, seconds: float) -> LoadResult:
    """``clients`` concurrent clients executing for ``seconds`` against the worker at ``url``."""
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    result = LoadResult(clients=clients, seconds=seconds)
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    threads = [
        threading.Thread(target=_client, args=(host, port, token, stop_at, result, k), daemon=True)
        for k in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - t0
    return result


# -- the server process ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``vram-residency serve`` in a subprocess with its own state directory."""

    def __init__(self, state: Path, name: str, *extra: str) -> None:
        self.port = _free_port()
        self.audit = state / f"audit-{name}.jsonl"
        self.log = state / f"serve-{name}.log"
        env = {
            k: v for k, v in os.environ.items() if k not in ("WORKER_API_TOKEN_FILE", "CREDENTIALS_DIRECTORY")
        }
        cmd = [
            sys.executable, "-m", "vram_residency.cli.main", "serve",
            "--port", str(self.port), "--state-dir", str(state), "--audit-log", str(self.audit),
            "--worker-id", f"bench-{name}", *extra,
        ]  # fmt: skip
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).json().get("status") == "ok":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError("serve did not become healthy")

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout=120)
        self._out.close()
        return rc


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _server_counters(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches = d("vram_execute_batch_size_count")
    passes = d('vram_verify_seconds_count{trigger="execute"}')
    return {
        "batches": int(batches),
        "mean_batch_size": round(d("vram_execute_batch_size_sum") / batches, 2) if batches else None,
        "execute_verification_passes": int(passes),
        "mean_verify_ms": round(1e3 * d('vram_verify_seconds_sum{trigger="execute"}') / passes, 2)
        if passes
        else None,
        "scrub_passes": int(d("vram_scrub_passes_total")),
        "verifications_failed": int(
            d('vram_verifications_total{result="failed",trigger="execute"}')
            + d('vram_verifications_total{result="failed",trigger="scrub"}')
        ),
    }


def load_test(state: Path, clients: int, seconds: float) -> dict[str, Any]:
    from vram_residency.audit.verify import verify_log

    server = ServerProcess(state, "load")
    token = (state / "worker.token").read_text().strip()
    try:
        ready = httpx.get(server.url + "/worker/ready", headers={"Authorization": f"Bearer {token}"}).json()
        run_clients(server.url, token, 4, 3.0)  # warm-up: first batches, page faults, allocator
        before = server.metrics()
        result = run_clients(server.url, token, clients, seconds)
        after = server.metrics()
    finally:
        rc = server.stop()
    report = verify_log([server.audit], token)
    return {
        "backend": ready["backend_description"],
        "model": ready["models"][0]["name"],
        "executor": ready["models"][0]["executor"],
        "model_bytes": ready["models"][0]["vram_bytes"],
        "server_exit_code": rc,
        **result.summary(),
        "server": _server_counters(before, after),
        "audit": {
            "records": report.records,
            "ok": report.ok,
            "first_break": None if report.first_break is None else asdict(report.first_break),
            "head_checked": report.head_checked,
        },
    }


def overhead(state: Path, clients: int, rounds: int, phase_seconds: float) -> dict[str, Any]:
    a = ServerProcess(state, "verify", "--scrub-interval", "0")
    b = ServerProcess(state, "noverify", "--scrub-interval", "0", "--benchmark-skip-pre-verify")
    token = (state / "worker.token").read_text().strip()
    out: dict[str, Any] = {"rounds": rounds, "phase_seconds": phase_seconds, "loads": {}}
    try:
        for srv in (a, b):
            run_clients(srv.url, token, 4, 2.0)  # warm-up
        for load in (1, clients):
            samples: dict[str, list[float]] = {"verify": [], "noverify": []}
            errors = 0
            per_round = []
            for _ in range(rounds):
                row = {}
                for name, srv in (("verify", a), ("noverify", b)):
                    r = run_clients(srv.url, token, load, phase_seconds)
                    samples[name] += r.latencies_ms
                    errors += r.errors
                    row[name] = round(statistics.median(r.latencies_ms), 2) if r.latencies_ms else None
                per_round.append(row)
            p50_v = statistics.median(samples["verify"])
            p50_n = statistics.median(samples["noverify"])
            out["loads"][str(load)] = {
                "clients": load,
                "samples_verify": len(samples["verify"]),
                "samples_noverify": len(samples["noverify"]),
                "errors": errors,
                "p50_ms_verify": round(p50_v, 2),
                "p50_ms_noverify": round(p50_n, 2),
                "overhead": round(p50_v / p50_n - 1, 4),
                "target": TARGET_OVERHEAD,
                "met": p50_v / p50_n - 1 <= TARGET_OVERHEAD,
                "p50_per_round_ms": per_round,
            }
        out["verify_server"] = _server_counters({}, a.metrics())
        out["noverify_server"] = _server_counters({}, b.metrics())
    finally:
        a.stop()
        b.stop()
    return out


def _markdown(res: dict[str, Any]) -> str:
    ld, ov = res["load"], res["overhead"]
    m = res["machine"]
    lines = [
        f"# Worker service load test, {res['date']}",
        "",
        f"- machine: {m['platform']}, {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}",
        f"- backend: {ld['backend']}",
        f"- model: {ld['model']} ({ld['model_bytes']} bytes sealed): {ld['executor']}",
        "- server: `vram-residency serve` defaults (pre-verification on, scrubber on), its own process; "
        "clients in another process on the same machine, over loopback",
        f"- prompts: a fixed mix of {len(PROMPTS)} sentences (2 to 40 words), round robin",
        "- load average (1, 5, 15 min) at start {}, after the load test {}, at the end {}".format(
            *(
                ", ".join(f"{x:.2f}" for x in res[k])
                for k in ("loadavg_start", "loadavg_after_load", "loadavg_end")
            )
        ),
        "",
        f"## Load: {ld['clients']} concurrent clients for {ld['seconds']} s",
        "",
        "| requests | ok | errors | throughput | p50 | p90 | p99 | max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {ld['requests']} | {ld['ok']} | {ld['errors']} | {ld['throughput_rps']} /s | {ld['p50_ms']} ms "
        f"| {ld['p90_ms']} ms | {ld['p99_ms']} ms | {ld['max_ms']} ms |",
        "",
        f"Server: {ld['server']['batches']} batches, mean batch size {ld['server']['mean_batch_size']}, "
        f"{ld['server']['execute_verification_passes']} verification passes before execution "
        f"(mean {ld['server']['mean_verify_ms']} ms each), {ld['server']['scrub_passes']} scrub passes, "
        f"{ld['server']['verifications_failed']} failed verifications; server exit code "
        f"{ld['server_exit_code']}.",
        "",
        f"Audit chain after shutdown: {ld['audit']['records']} records, "
        f"{'**verifies**' if ld['audit']['ok'] else '**BROKEN**: ' + str(ld['audit']['first_break'])}"
        f" (head checked: {ld['audit']['head_checked']}).",
        "",
        "## Verification before execute: p50 with and without",
        "",
        f"Two servers side by side (scrubber off on both); B runs with `--benchmark-skip-pre-verify`. "
        f"Phases alternate A, B, ... for {ov['rounds']} rounds of {ov['phase_seconds']} s per load.",
        "",
        "| load | p50 with verification | p50 without | overhead | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in ov["loads"].values():
        lines.append(
            f"| {row['clients']} client(s) | {row['p50_ms_verify']} ms ({row['samples_verify']} samples) "
            f"| {row['p50_ms_noverify']} ms ({row['samples_noverify']} samples) "
            f"| {100 * row['overhead']:+.1f}% | <= {100 * row['target']:.0f}% "
            f"| {'yes' if row['met'] else 'NO'} |"
        )
    one = ov["loads"]["1"]
    lines += [
        "",
        f"Mean verification pass before execution on A: {ov['verify_server']['mean_verify_ms']} ms "
        f"(every shard, {ld['model_bytes']} bytes); mean batch size on A "
        f"{ov['verify_server']['mean_batch_size']}, on B {ov['noverify_server']['mean_batch_size']}.",
        "",
        "What bounds the overhead here: a pass reads the whole shard from (emulated) device memory "
        f"and hashes it on this machine's {m['cpus']} CPUs ({ov['verify_server']['mean_verify_ms']} ms "
        f"for {ld['model_bytes'] / 1e6:.1f} MB), while one execute of one sentence takes "
        f"{one['p50_ms_noverify']} ms end to end. Verifying before every execution therefore costs a "
        "multiple of a lone execute on the host backend; under load one pass is shared by the batch "
        "of jobs that waited for it, and the cost falls to the share computed above.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--phase-seconds", type=float, default=10.0)
    ap.add_argument("--no-write", action="store_true", help="print only; write no result files")
    args = ap.parse_args()
    date = dt.date.today().isoformat()
    with tempfile.TemporaryDirectory(prefix="service-load-") as tmp:
        state = Path(tmp)
        # This machine may be shared: the load averages say how busy it was around each part.
        res: dict[str, Any] = {"date": date, "machine": _machine(), "loadavg_start": os.getloadavg()}
        print(f"load: {args.clients} clients for {args.duration} s ...", flush=True)
        res["load"] = load_test(state, args.clients, args.duration)
        res["loadavg_after_load"] = os.getloadavg()
        print(
            json.dumps({k: v for k, v in res["load"].items() if k != "error_samples"}, indent=2), flush=True
        )
        print("overhead: alternating servers with and without pre-verification ...", flush=True)
        res["overhead"] = overhead(state, args.clients, args.rounds, args.phase_seconds)
        res["loadavg_end"] = os.getloadavg()
    md = _markdown(res)
    print(md)
    if not args.no_write:
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        (out / f"service-load-{date}.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / f"service-load-{date}.md").write_text(md)
    ok = res["load"]["errors"] == 0 and res["load"]["audit"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
