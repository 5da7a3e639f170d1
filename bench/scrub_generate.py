#!/usr/bin/env python3
"""Scrubbing during serving (issue 11's target): what the library's ``Scrubber``, at its DEFAULT
budget and check, costs a transformers Llama's 128-token greedy ``generate()``, and how long it
takes to find a bit flipped while the model generates, against what the budget predicts.

The model is issue 11's: ``LlamaForCausalLM`` from a config (hidden 2048, 16 layers, intermediate
5632, vocab 32000; the config ``bench/gpu_bench.py --sections batch`` builds), random init, bf16 on
the GPU, adopted in place with ``mgr.seal_tensors(model)``. In one run:

1. **Slowdown.** ``generate()`` of 128 new tokens (fixed prompt, ``do_sample=False``,
   ``min_new_tokens = max_new_tokens`` so every run makes exactly 128), ``--runs`` times without a
   scrubber (A) and as many with ``Scrubber(mgr)`` running (B), in ABBA order so that drift
   (clocks, temperature) falls on both sides alike. Target: median(B) / median(A) <= 1.05.
2. **What the budget predicts.** The scrubber works ``budget`` of the wall-clock time: a pass
   over the sealed bytes ``M`` at scrub throughput ``T`` takes ``M / T`` busy, so one cycle is
   ``C = M / (T * budget)``. A flip at a random moment is found on average after ``C / 2``, at
   most after ``C`` plus the chunk in progress. ``T`` is measured twice in this run: alone (one
   pass, nothing else running) and beside the engine, in a steady window of back-to-back
   generate() calls (the scrubber's own bytes / busy seconds; busy time includes waiting for the
   GIL behind the engine's Python, which the budget counts too). The cycle that window achieved
   (sealed bytes over the rate it verified bytes at) is reported beside both predictions.
3. **Detection.** ``--trials`` times: a fresh default ``Scrubber`` starts, ``generate()`` runs in a
   loop, and another thread flips one random bit of one random parameter through torch (its bytes
   viewed as uint8, XOR in place, on a stream of its own so that the flip does not queue behind the
   engine's kernels) at a random moment in ``[0, C)``. Detection time: from just before the flip
   is issued (so never less than the truth) to the scrubber's ``on_failure`` call, which comes
   after the failed chunk's localization; the failure must name the flipped parameter. Then the
   bit is flipped back and the shard verified before the next trial.

Writes scrub-generate-DATE.json and .md to --out. On a GPU (the target)::

    PYTHONPATH=src python3 bench/scrub_generate.py --out /tmp/results

A CPU smoke path on the host backend, a tiny Llama (needs torch and transformers)::

    PYTHONPATH=src python3 bench/scrub_generate.py --out /tmp/r --backend host --tiny --runs 2 --trials 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vram_residency import Scrubber, SealVerificationFailed, VramManager
from vram_residency.scrub import DEFAULT_CHUNK_BYTES, chunks
from vram_residency.sources.model import SealedModel

TOKEN = "bench-scrub-generate-token-0123456789"
PROMPT = [1, 450, 4996, 17354, 1701, 29916, 338, 263]
SLOWDOWN_GOAL = 1.05


def log(msg: str) -> None:
    print(msg, flush=True)


# -- the engine --------------------------------------------------------------------------------------


def build_llama(device: str, tiny: bool) -> Any:
    """Issue 11's Llama (the config of gpu_bench.build_llama), built in bf16 where it will run (no
    float32 copy first: half the peak memory). ``tiny``: the same architecture at toy size, for
    the CPU smoke path."""
    import torch

    try:
        from transformers import LlamaConfig, LlamaForCausalLM  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise SystemExit(f"this benchmark runs a transformers Llama: {exc}") from None

    if tiny:
        config = LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            vocab_size=32000,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    else:
        config = LlamaConfig(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, vocab_size=32000)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # adopting does not wait on torch's streams
    return model


def make_generate(model: Any, device: str, new_tokens: int) -> Callable[[], list[int]]:
    import torch

    ids = torch.tensor([PROMPT], device=device)
    mask = torch.ones_like(ids)

    def generate() -> list[int]:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        tokens = [int(t) for t in out[0].tolist()]  # .tolist() waits for the device
        if len(tokens) != len(PROMPT) + new_tokens:
            raise RuntimeError(f"generate() made {len(tokens) - len(PROMPT)} tokens, not {new_tokens}")
        return tokens

    return generate


class Flipper:
    """XORs one bit of a parameter in place through torch, as a stray write would change it.

    On a GPU the XOR runs on a stream of its own: on the engine's stream it would wait behind
    whatever generate() has queued, and the flip time would not be the moment of the flip."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        # torch.cuda.Stream's constructor carries no annotations (torch's gap, not ours).
        on_gpu = device.startswith("cuda")
        self.stream = torch.cuda.Stream() if on_gpu else None  # type: ignore[no-untyped-call]

    def flip(self, param: Any, byte: int, bit: int) -> tuple[float, float]:
        """(monotonic time just before the XOR is issued, and once it has landed)."""
        torch = self.torch
        with torch.no_grad():
            raw = param.detach().view(-1).view(torch.uint8)  # the same storage, byte by byte
            issued = time.monotonic()
            if self.stream is None:
                raw[byte : byte + 1].bitwise_xor_(1 << bit)
            else:
                with torch.cuda.stream(self.stream):
                    raw[byte : byte + 1].bitwise_xor_(1 << bit)
                self.stream.synchronize()
        return issued, time.monotonic()


# -- measurements ------------------------------------------------------------------------------------


def sealed_bytes(mgr: VramManager) -> int:
    return sum(s.vram_bytes for s in mgr.shards())


def idle_throughput(mgr: VramManager, passes: int = 3) -> dict[str, float]:
    """The scrubber's throughput with nothing else running: ``run_pass`` of a default-check
    Scrubber at budget 1 (no pauses), in this thread. The first pass is a warm-up (kernels, the
    low-priority lane's buffers); the best of the others is kept."""
    best: dict[str, float] = {}
    for i in range(passes + 1):
        s = Scrubber(mgr, budget=1.0)
        t0 = time.perf_counter()
        if not s.run_pass():
            raise RuntimeError(f"an unmodified model failed its scrub pass: {s.last_error}")
        wall = time.perf_counter() - t0
        if i and (not best or s.busy_s < best["busy_s"]):
            best = {"bytes": float(s.bytes_verified), "busy_s": s.busy_s, "wall_s": wall}
    best["GBps"] = best["bytes"] / best["busy_s"] / 1e9
    return best


def slowdown(mgr: VramManager, generate: Callable[[], Any], runs: int) -> dict[str, Any]:
    """A/B in ABBA order: generate() alone, and with a default Scrubber started just before it
    and stopped just after. Also what the scrubber did during the B runs."""
    a: list[float] = []
    b: list[float] = []
    same_tokens = True
    reference = generate()
    scrub = {"bytes": 0, "busy_s": 0.0, "wall_s": 0.0, "passes": 0}
    budget = Scrubber(mgr).budget
    check = Scrubber(mgr).check
    order = [x for i in range(runs) for x in (("A", "B") if i % 2 == 0 else ("B", "A"))]
    for which in order:
        scrubber = Scrubber(mgr) if which == "B" else None  # the defaults: budget, check, chunks
        began = time.perf_counter()
        if scrubber is not None:
            scrubber.start()
        t0 = time.perf_counter()
        tokens = generate()
        took = time.perf_counter() - t0
        if scrubber is not None:
            scrubber.stop()
            if scrubber.last_error is not None:
                raise RuntimeError(f"the scrubber failed on an unmodified model: {scrubber.last_error}")
            scrub["bytes"] += scrubber.bytes_verified
            scrub["busy_s"] += scrubber.busy_s
            scrub["passes"] += scrubber.passes
            scrub["wall_s"] += time.perf_counter() - began
        same_tokens &= tokens == reference
        (b if which == "B" else a).append(took)
        log(f"  generate {which}: {took * 1e3:.1f} ms")
    med_a, med_b = statistics.median(a), statistics.median(b)
    # Each AB or BA pair ran back to back: the ratio within a pair leaves out the host's drift
    # between minutes (the H200 machine's generate() alone varied 1.5-2.9 s within one run).
    pairs = [b[i] / a[i] for i in range(runs)]
    return {
        "budget": budget,
        "check": check,
        "chunk_bytes": DEFAULT_CHUNK_BYTES,
        "runs": runs,
        "order": "".join(order),
        "without_s": a,
        "with_s": b,
        "median_without_s": med_a,
        "median_with_s": med_b,
        "ratio": med_b / med_a,
        "pair_ratios": pairs,
        "paired_ratio_median": statistics.median(pairs),
        "same_tokens_with_and_without": same_tokens,
        "scrubber_during_b": scrub,
    }


@dataclass
class Trial:
    parameter: str
    byte: int
    bit: int
    delay_s: float
    detect_s: float | None  # None: not found within the trial's time limit
    landing_s: float
    named_correctly: bool
    generate_calls: int
    # Where the scrubber stood when the flip landed, and what it did in the trial (its own
    # throughput and pace): the inputs of this flip's own prediction (``flip_prediction``).
    chunk_of_flip: int = -1  # the chunk (of the pass, in the scrubber's order) holding the flip
    chunks_done_at_flip: int = 0  # chunks of the current pass verified when the flip landed
    trial_bytes: int = 0  # bytes the trial's scrubber verified (found chunk excluded)
    trial_busy_s: float = 0.0  # its busy time (found chunk excluded: its verify and localization)
    predicted_s: float | None = None  # this flip's own prediction (see flip_prediction)


def detection_trials(
    mgr: VramManager,
    model: Any,
    sealed: SealedModel,
    generate: Callable[[], Any],
    flipper: Flipper,
    cycle_s: float,
    trials: int,
    time_budget_s: float,
    seed: int,
) -> list[Trial]:
    rng = random.Random(seed)
    params = {n: p for n, p in model.named_parameters() if n in sealed.names}
    names = sorted(params)
    limit = min(max(3 * cycle_s, 1.0) + 5.0, 40.0)  # a miss is a failure, not a hang
    out: list[Trial] = []
    started = time.monotonic()
    for k in range(trials):
        if k >= 3 and time.monotonic() - started > time_budget_s:
            log(f"  stopping after {k} trials: the trials' time budget ({time_budget_s:.0f} s) is spent")
            break
        name = rng.choice(names)
        param = params[name]
        byte = rng.randrange(param.numel() * param.element_size())
        bit = rng.randrange(8)
        delay = rng.uniform(0.0, cycle_s)
        found = threading.Event()
        got: dict[str, Any] = {}

        def on_failure(
            exc: SealVerificationFailed, got: dict[str, Any] = got, found: threading.Event = found
        ) -> None:
            got["t"] = time.monotonic()
            got["exc"] = exc
            # The scrubber's counters before the failed chunk's verify and localization (called
            # from inside it: neither counter has it yet). A localization (the full check of the
            # chunk, unit by unit) is busy time without new bytes; counted in, it made the
            # trials' throughput 106 against 142 GB/s in the steady window (2026-11-30).
            s = got.get("scrubber")
            if s is not None:
                got["bytes"], got["busy"] = s.bytes_verified, s.busy_s
            found.set()

        flipped: dict[str, float] = {}
        scrubber = Scrubber(mgr, on_failure=on_failure)  # the defaults, as in the B runs
        got["scrubber"] = scrubber

        def flip_later(
            param: Any = param, byte: int = byte, bit: int = bit, delay: float = delay,
            flipped: dict[str, float] = flipped, scrubber: Scrubber = scrubber,
        ) -> None:  # fmt: skip
            time.sleep(delay)
            flipped["issued"], flipped["landed"] = flipper.flip(param, byte, bit)
            # The scrubber's place in its pass right after the flip: counters of whole chunks
            # (bytes_verified grows as each chunk is verified; passes as each pass ends).
            flipped["passes"], flipped["bytes"] = float(scrubber.passes), float(scrubber.bytes_verified)

        flip_thread = threading.Thread(target=flip_later, name="bench-flip", daemon=True)
        t_start = time.monotonic()
        scrubber.start()
        flip_thread.start()
        calls = 0
        # The engine keeps serving until the scrubber reports (or the trial's limit passes).
        while not found.is_set() and time.monotonic() - t_start < delay + limit:
            generate()
            calls += 1
        scrubber.stop()
        flip_thread.join()
        if "issued" not in flipped:
            raise RuntimeError("the flip thread failed before flipping (see its traceback above)")
        flipper.flip(param, byte, bit)  # back to the sealed bytes
        mgr.verify_many([sealed.shard(name)])  # and proven so before the next trial
        exc = got.get("exc")
        detect = got["t"] - flipped["issued"] if exc is not None else None
        # A report from before the flip would be a false alarm, not a detection.
        named = exc is not None and got["t"] > flipped["issued"] and list(exc.corrupted_tensors) == [name]
        trial = Trial(name, byte, bit, delay, detect, flipped["landed"] - flipped["issued"], named, calls)
        order = chunks(mgr.shards(), DEFAULT_CHUNK_BYTES)  # the scrubber's pass, chunk by chunk
        sid = sealed.shard(name).shard_id
        trial.chunk_of_flip = next(i for i, c in enumerate(order) if any(s.shard_id == sid for s in c))
        pass_bytes = sum(s.vram_bytes for c in order for s in c)
        in_pass = int(flipped["bytes"]) - int(flipped["passes"]) * pass_bytes
        done_bytes, trial.chunks_done_at_flip = 0, 0
        for c in order:
            if done_bytes >= in_pass:
                break
            done_bytes += sum(s.vram_bytes for s in c)
            trial.chunks_done_at_flip += 1
        trial.trial_bytes = int(got.get("bytes", scrubber.bytes_verified))
        trial.trial_busy_s = float(got.get("busy", scrubber.busy_s))
        trial.predicted_s = flip_prediction(
            trial, [sum(s.vram_bytes for s in c) for c in order], scrubber.budget
        )
        out.append(trial)
        log(
            f"  trial {k}: {name} byte {byte} bit {bit}, flipped at {delay:.3f} s: "
            + (f"found after {detect:.3f} s" if detect is not None else "NOT FOUND")
            + ("" if named else " (wrong or no parameter named)")
        )
    return out


def flip_prediction(trial: Trial, chunk_bytes: list[int], budget: float) -> float | None:
    """When the budget says this flip should be found, from where the scrubber stood when it
    landed: the scrubber verifies chunk i (``b_i`` bytes) in ``b_i / T`` at throughput ``T``,
    then idles so that it is busy ``budget`` of the time, so chunk i takes ``b_i / (T budget)``
    of wall time. The flip landed during the idle after the last verified chunk (half of it is
    left, on average); the chunks from the next one up to the flipped one's predecessor take
    their periods, and the flipped chunk its busy part. ``T``: the trial's own throughput
    (bytes / busy time of its scrubber). None when the trial found nothing or verified nothing."""
    if trial.detect_s is None or trial.trial_busy_s <= 0 or trial.trial_bytes <= 0 or not chunk_bytes:
        return None
    rate = trial.trial_bytes / trial.trial_busy_s  # both from before the failed chunk
    n = len(chunk_bytes)
    period = [b / (rate * budget) for b in chunk_bytes]
    cur = trial.chunks_done_at_flip % n  # the next chunk to verify
    left = 0.5 * period[(cur - 1) % n]
    i = cur
    while i % n != trial.chunk_of_flip:
        left += period[i % n]
        i += 1
    return left + chunk_bytes[trial.chunk_of_flip] / rate


def flip_tolerance(trial: Trial, pred: dict[str, float]) -> float:
    """How far a detection may fall from its own prediction: one chunk period (the idle phase
    the flip landed in is unknown, half a period either way, and a single chunk's busy time, of
    which its period is a multiple, moves with the engine beside it: what dominates a flip found
    within a chunk or two), 20% of the prediction (the pace over many chunks, which the trial's
    mean throughput stands for), and 20 ms (the localization of the found chunk and the timers).
    Detection comes in steps of one chunk period; this asks for the visit the budget predicts,
    give or take one."""
    period = pred["cycle_from_trials_s"] / max(1.0, pred["chunks_per_pass"])
    return period + 0.2 * (trial.predicted_s or 0.0) + 0.02


def steady(
    mgr: VramManager, generate: Callable[[], Any], calls: int, cap_s: float = 20.0
) -> dict[str, float]:
    """The scrubber in its steady state beside the engine: a default Scrubber runs through
    back-to-back generate() calls, and its counters are read after the first call and after the
    last, so the window starts at an arbitrary phase of its duty cycle. The window holds at least
    ``calls`` calls and two whole passes over the sealed bytes (unless ``cap_s`` runs out first):
    a chunk that began before the window is counted whole when it ends inside it, and with one
    pass a short window (a tiny model on the host) could then show more busy time than wall time.
    (The B runs above start a scrubber with every run, and a scrubber starts with a chunk: their
    duty is biased high, which makes the slowdown conservative but the rates no base for a
    prediction.)"""
    n_bytes = sealed_bytes(mgr)
    scrubber = Scrubber(mgr)
    scrubber.start()
    done = 0
    try:
        generate()
        b0, busy0, t0 = scrubber.bytes_verified, scrubber.busy_s, time.perf_counter()
        while done < calls or (
            scrubber.bytes_verified - b0 < 2 * n_bytes and time.perf_counter() - t0 < cap_s
        ):
            generate()
            done += 1
        b1, busy1, t1 = scrubber.bytes_verified, scrubber.busy_s, time.perf_counter()
    finally:
        scrubber.stop()
    if scrubber.last_error is not None:
        raise RuntimeError(f"the scrubber failed on an unmodified model: {scrubber.last_error}")
    return {"bytes": float(b1 - b0), "busy_s": busy1 - busy0, "wall_s": t1 - t0, "calls": float(done)}


def predict(res: dict[str, Any], n_bytes: int, n_chunks: int) -> dict[str, float]:
    """C = M / (T * budget) from the throughput alone and from the throughput during generate()
    (steady window), and the cycle that window actually achieved."""
    budget = res["slowdown"]["budget"]
    during = res["steady"]
    nan = float("nan")
    load_gbps = during["bytes"] / during["busy_s"] / 1e9 if during["busy_s"] else nan
    idle_gbps = res["idle"]["GBps"]
    passes_during = during["bytes"] / n_bytes
    return {
        "sealed_bytes": float(n_bytes),
        "chunks_per_pass": float(n_chunks),
        "budget": budget,
        "throughput_idle_gbps": idle_gbps,
        "throughput_during_generate_gbps": load_gbps,
        "duty_during_generate": during["busy_s"] / during["wall_s"],
        "cycle_from_idle_s": n_bytes / (idle_gbps * 1e9 * budget),
        "cycle_from_generate_s": n_bytes / (load_gbps * 1e9 * budget),
        # Sealed bytes over the rate the steady window verified bytes at.
        "cycle_achieved_s": during["wall_s"] / passes_during if passes_during else nan,
        # One chunk's busy time during generate (what a flip can wait beyond one cycle).
        "chunk_during_generate_s": during["busy_s"] / (passes_during * n_chunks) if passes_during else nan,
    }


def detection_summary(trials: list[Trial], pred: dict[str, float]) -> dict[str, Any]:
    found = [t.detect_s for t in trials if t.detect_s is not None]
    cycle = pred["cycle_from_generate_s"]
    bound = cycle + pred["chunk_during_generate_s"]
    out: dict[str, Any] = {
        "trials": len(trials),
        "found": len(found),
        "named_correctly": sum(t.named_correctly for t in trials),
        "predicted_mean_s": cycle / 2,
        "predicted_max_s": bound,
        "predicted_mean_from_idle_s": pred["cycle_from_idle_s"] / 2,
    }
    # The budget's cycle with the throughput the trials' scrubbers had (bytes / busy time, over
    # every trial): the same formula C = M / (T budget), T measured where the flips were found.
    t_bytes = sum(t.trial_bytes for t in trials)
    t_busy = sum(t.trial_busy_s for t in trials)
    if t_bytes and t_busy:
        rate = t_bytes / t_busy
        pred["throughput_trials_gbps"] = rate / 1e9
        pred["cycle_from_trials_s"] = pred["sealed_bytes"] / (rate * pred["budget"])
        out["predicted_mean_trials_s"] = pred["cycle_from_trials_s"] / 2
        # One cycle plus one chunk's busy time, as predicted_max_s: a flip that lands just after
        # its chunk was verified waits for all of the pass, then that chunk again.
        chunk_busy = pred["sealed_bytes"] / max(1.0, pred["chunks_per_pass"]) / rate
        out["predicted_max_trials_s"] = pred["cycle_from_trials_s"] + chunk_busy
        own = [t for t in trials if t.detect_s is not None and t.predicted_s is not None]
        if own:
            out["own_prediction_ratio_median"] = statistics.median(
                t.detect_s / t.predicted_s for t in own if t.detect_s is not None and t.predicted_s
            )
            out["own_prediction_within"] = sum(
                abs(t.detect_s - t.predicted_s) <= flip_tolerance(t, pred)
                for t in own
                if t.detect_s is not None and t.predicted_s is not None
            )
            out["own_prediction_trials"] = len(own)
            out["own_prediction_median_s"] = statistics.median(
                t.predicted_s for t in own if t.predicted_s is not None
            )
    if found:
        out |= {
            "median_s": statistics.median(found),
            "mean_s": statistics.fmean(found),
            "max_s": max(found),
            "min_s": min(found),
            "flip_landing_median_s": statistics.median(t.landing_s for t in trials),
        }
    return out


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    slow = res["slowdown"]
    out = [
        {
            "target": f"generate() {res['new_tokens']} tokens with the default Scrubber "
            f"(budget {slow['budget']:g}, check {slow['check']}) vs without",
            "value": slow["ratio"],
            "unit": "x time (median)",
            "goal": f"<= {SLOWDOWN_GOAL}",
            "met": slow["ratio"] <= SLOWDOWN_GOAL,
        },
        {
            "target": "the same, paired: median of the per-pair ratios (each B run against the A "
            "run beside it in the ABBA order)",
            "value": slow["paired_ratio_median"],
            "unit": "x time (median of pairs)",
            "goal": f"<= {SLOWDOWN_GOAL}",
            "met": slow["paired_ratio_median"] <= SLOWDOWN_GOAL,
        },
    ]
    det = res.get("detection")
    if det is not None:
        out.append(
            {
                "target": "flips during generate() found and named by the scrubber",
                "value": f"{det['found']}/{det['trials']} found, {det['named_correctly']} named",
                "unit": "",
                "goal": "all",
                "met": det["trials"] > 0 and det["found"] == det["named_correctly"] == det["trials"],
            }
        )
        if "median_s" in det:
            # C from the throughput the trials' own scrubbers had where one was measured (the
            # steady window's, in the detection table too, was taken in other minutes of a
            # noisy host).
            trials_c = "predicted_mean_trials_s" in det
            most = det["predicted_max_trials_s"] if trials_c else det["predicted_max_s"]
            where = "the trials' scrub throughput" if trials_c else "scrub throughput during generate"
            if "own_prediction_median_s" in det:
                # Against the median of the flips' own predictions, not C/2: each trial starts a
                # fresh scrubber at the first chunk and draws the flip's moment over the steady
                # window's cycle, so where a flip lands in the cycle is not uniform, and C/2 is not
                # the median to expect (2026-11-30: 0.43x of C/2, with every flip within its own
                # prediction). Two thirds to one and a half: the flips' idle phases are unknown.
                want, what = det["own_prediction_median_s"], "the median of the flips' own predictions"
                lo, hi = 2 / 3, 1.5
            else:
                # A flip at a uniformly random moment waits a uniformly random part of one cycle.
                want = det["predicted_mean_trials_s"] if trials_c else det["predicted_mean_s"]
                what = f"the budget's prediction C/2 (C = sealed bytes / ({where} x budget))"
                lo, hi = 0.5, 1.5
            ratio = det["median_s"] / want
            out.append(
                {
                    "target": f"detection median vs {what}",
                    "value": f"{det['median_s']:.3f} s vs {want:.3f} s ({ratio:.2f}x)",
                    "unit": "",
                    "goal": f"{lo:.2g}x to {hi:.2g}x",
                    "met": lo <= ratio <= hi,
                }
            )
            out.append(
                {
                    "target": f"detection max vs one cycle plus one chunk (C from {where})",
                    "value": f"{det['max_s']:.3f} s vs {most:.3f} s",
                    "unit": "",
                    "goal": "<= 1.1x",
                    "met": det["max_s"] <= 1.1 * most,
                }
            )
        if det.get("own_prediction_trials"):
            # Each flip against its own prediction: where the scrubber stood when it landed, the
            # chunks it had left to reach the flipped one, the budget's period of each
            # (flip_prediction): a sharper check than the median of a uniform draw.
            out.append(
                {
                    "target": "each flip found when the budget predicts from where the scrubber stood "
                    "(within one chunk period + 20% + 20 ms)",
                    "value": f"{det['own_prediction_within']}/{det['own_prediction_trials']} "
                    f"(median measured / predicted {det['own_prediction_ratio_median']:.2f})",
                    "unit": "",
                    "goal": "all",
                    "met": det["own_prediction_within"] == det["own_prediction_trials"],
                }
            )
    return out


def write_results(res: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"scrub-generate-{res['date']}{'-tiny' if res['tiny'] else ''}"
    Path(f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    slow, pred = res["slowdown"], res["prediction"]
    during, steady = slow["scrubber_during_b"], res["steady"]
    lines = [
        f"# Scrubbing during serving ({res['device']}, {res['date']})",
        "",
        f"Model: {res['model']}, {res['sealed_bytes'] / 1e9:.2f} GB in {res['shards']} shards "
        f"(adopted with seal_tensors, {res['backend']} backend). One run of `bench/scrub_generate.py`; "
        f"{res['new_tokens']}-token greedy generate(), {slow['runs']} runs each way, "
        f"in order {slow['order']}.",
        "",
        "| | median | all runs |",
        "|---|---:|---|",
        f"| generate() without scrubber | {slow['median_without_s'] * 1e3:.1f} ms "
        f"| {', '.join(f'{x * 1e3:.0f}' for x in slow['without_s'])} |",
        f"| generate() with Scrubber(mgr) | {slow['median_with_s'] * 1e3:.1f} ms "
        f"| {', '.join(f'{x * 1e3:.0f}' for x in slow['with_s'])} |",
        f"| with / without, pair by pair | {slow['paired_ratio_median']:.3f} "
        f"| {', '.join(f'{x:.3f}' for x in slow['pair_ratios'])} |",
        "",
        f"Same tokens with and without the scrubber: "
        f"{'yes' if slow['same_tokens_with_and_without'] else 'NO'}. During the B runs (a scrubber "
        f"started with each run, so beginning with a chunk) it was busy "
        f"{during['busy_s'] / during['wall_s'] * 100:.2f}% of the time. In a steady window of "
        f"{steady['calls']:.0f} back-to-back generate() calls it verified {steady['bytes'] / 1e9:.2f} GB, "
        f"busy {steady['busy_s'] * 1e3:.0f} ms of {steady['wall_s']:.2f} s: "
        f"{pred['duty_during_generate'] * 100:.2f}% duty against a budget of {pred['budget'] * 100:g}%.",
        "",
        "## What the budget predicts",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| scrub throughput alone (one pass, budget 1) | {pred['throughput_idle_gbps']:,.1f} GB/s |",
        f"| scrub throughput during generate() (bytes / busy s) "
        f"| {pred['throughput_during_generate_gbps']:,.1f} GB/s |",
        f"| cycle C = bytes / (throughput alone x budget) | {pred['cycle_from_idle_s']:.3f} s |",
        f"| cycle C = bytes / (throughput during generate x budget) "
        f"| {pred['cycle_from_generate_s']:.3f} s |",
        f"| cycle achieved during generate (bytes / verified rate) | {pred['cycle_achieved_s']:.3f} s |",
        f"| one chunk's busy time during generate | {pred['chunk_during_generate_s'] * 1e3:.1f} ms |",
    ]
    det = res.get("detection")
    if det is not None and "median_s" in det:
        lines += [
            "",
            f"## Detection of a bit flipped during generate() ({det['trials']} trials)",
            "",
            "| | median | mean | max |",
            "|---|---:|---:|---:|",
            f"| measured | {det['median_s']:.3f} s | {det['mean_s']:.3f} s | {det['max_s']:.3f} s |",
            f"| predicted (C during generate) | {det['predicted_mean_s']:.3f} s "
            f"| {det['predicted_mean_s']:.3f} s "
            f"| {det['predicted_max_s']:.3f} s |",
            f"| predicted (C alone) | {det['predicted_mean_from_idle_s']:.3f} s "
            f"| {det['predicted_mean_from_idle_s']:.3f} s "
            f"| {2 * det['predicted_mean_from_idle_s']:.3f} s |",
        ]
        if "predicted_mean_trials_s" in det:
            lines.append(
                f"| predicted (C from the trials' throughput, "
                f"{pred['throughput_trials_gbps']:,.1f} GB/s) | {det['predicted_mean_trials_s']:.3f} s "
                f"| {det['predicted_mean_trials_s']:.3f} s | {det['predicted_max_trials_s']:.3f} s |"
            )
        own = [t for t in res.get("trials", []) if t.get("predicted_s") is not None]
        if own:
            lines += [
                "",
                "Each flip against its own prediction (from the chunk the scrubber had reached when "
                "the flip landed; `flip_prediction`):",
                "",
                "| parameter | chunk of flip | chunks done at flip | found after | predicted |",
                "|---|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {t['parameter']} | {t['chunk_of_flip']} | {t['chunks_done_at_flip']} "
                f"| {t['detect_s']:.3f} s | {t['predicted_s']:.3f} s |"
                for t in own
            ]
    lines += ["", "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    for t in res["targets"]:
        value = (
            f"{t['value']:.4g} {t['unit']}" if isinstance(t["value"], float) else f"{t['value']} {t['unit']}"
        )
        lines.append(f"| {t['target']} | {value.strip()} | {t['goal']} | {'yes' if t['met'] else 'NO'} |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    return Path(f"{stem}.md")


def measure(
    res: dict[str, Any],
    mgr: VramManager,
    model: Any,
    generate: Callable[[], Any],
    flipper: Flipper,
    runs: int,
    trials: int,
    trials_budget_s: float,
    seed: int,
    steady_calls: int = 3,
) -> None:
    """Seal ``model`` (a torch module) in ``mgr``, then everything above, into ``res``: the scrub
    throughput alone, the A/B slowdown, the prediction, the detection trials and the targets.
    The model leaves as it came: every flip undone (verified), every seal forgotten."""
    t0 = time.perf_counter()
    sealed = mgr.seal_tensors(model)
    n_bytes = sealed_bytes(mgr)
    n_chunks = len(chunks(mgr.shards(), DEFAULT_CHUNK_BYTES))
    res |= {"sealed_bytes": n_bytes, "shards": len(sealed.shards)}
    log(f"{res['device']}: {res['model']}: {n_bytes / 1e9:.3f} GB, {len(sealed.shards)} shards, "
        f"{n_chunks} scrub chunks; sealed in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    for _ in range(2):
        generate()  # warm-up: kernels, allocator, generation config
    res["idle"] = idle_throughput(mgr)
    log(f"scrub throughput alone: {res['idle']['GBps']:,.1f} GB/s")
    log(f"generate(), {runs} runs without and {runs} with the default Scrubber:")
    res["slowdown"] = slowdown(mgr, generate, runs)
    res["steady"] = steady(mgr, generate, steady_calls)
    res["prediction"] = pred = predict(res, n_bytes, n_chunks)
    log(
        f"median {res['slowdown']['median_without_s'] * 1e3:.1f} ms without, "
        f"{res['slowdown']['median_with_s'] * 1e3:.1f} ms with: x{res['slowdown']['ratio']:.4f}; "
        f"cycle predicted {pred['cycle_from_generate_s']:.3f} s "
        f"(alone: {pred['cycle_from_idle_s']:.3f} s), "
        f"achieved {pred['cycle_achieved_s']:.3f} s"
    )
    if trials:
        # The flips land at uniformly random moments of one cycle: the one achieved beside the
        # engine, else (nothing verified in the window's cap) the one predicted alone.
        cycle = next(
            (c for c in (pred["cycle_achieved_s"], pred["cycle_from_idle_s"]) if math.isfinite(c) and c > 0),
            1.0,
        )
        log(f"detection: {trials} flips at random moments in [0, {cycle:.3f} s):")
        done = detection_trials(mgr, model, sealed, generate, flipper, cycle, trials, trials_budget_s, seed)
        res["trials"] = [t.__dict__ for t in done]
        res["detection"] = detection_summary(done, pred)
    mgr.verify_model(sealed)  # every flip was undone: the model is as sealed
    for shard in sealed.shards:
        mgr.deallocate(shard)  # forgets the seal; the memory stays torch's
    res["targets"] = targets(res)
    res["elapsed_s"] = time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--date", default=dt.date.today().isoformat())
    ap.add_argument("--backend", choices=("cuda", "host"), default="cuda")
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a toy-size Llama (the CPU smoke path)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=30, help="generate() runs each way (A and B)")
    ap.add_argument("--trials", type=int, default=20, help="bit flips to detect")
    ap.add_argument(
        "--trials-budget-s", type=float, default=25.0, help="no new trial after this (3 at least)"
    )
    ap.add_argument("--steady-calls", type=int, default=3, help="generate() calls in the steady window")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    if args.runs < 1 or args.steady_calls < 1 or args.trials < 0 or args.new_tokens < 1:
        ap.error("--runs, --steady-calls and --new-tokens must be positive, --trials non-negative")
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    device = f"cuda:{args.device}" if args.backend == "cuda" else "cpu"
    if args.backend == "cuda":
        torch.cuda.set_device(args.device)
        device_name = torch.cuda.get_device_name(args.device)
    else:
        device_name = f"host backend on {platform.processor() or platform.machine()} CPU"
    res: dict[str, Any] = {
        "date": args.date,
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device_name,
        "backend": args.backend,
        "tiny": args.tiny,
        "new_tokens": args.new_tokens,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "gil_switch_interval_s": sys.getswitchinterval(),
    }
    model = build_llama(device, args.tiny)
    res["model"] = (
        "LlamaForCausalLM, tiny config"
        if args.tiny
        else "LlamaForCausalLM hidden 2048, 16 layers, intermediate 5632, vocab 32000"
    ) + ", random init, bf16"
    generate = make_generate(model, device, args.new_tokens)
    with VramManager(TOKEN, args.device, backend=args.backend, worker_id="scrub-bench") as mgr:
        flipper = Flipper(device)
        measure(
            res, mgr, model, generate, flipper, args.runs, args.trials, args.trials_budget_s, args.seed,
            args.steady_calls,
        )  # fmt: skip
    md = write_results(res, args.out)
    log("")
    log(md.read_text())
    # Speed targets missed are results (recorded above); a flip not found, or the wrong parameter
    # named, is a failure of the library.
    det = res.get("detection")
    return 1 if det is not None and not det["trials"] == det["found"] == det["named_correctly"] else 0


if __name__ == "__main__":
    sys.exit(main())
