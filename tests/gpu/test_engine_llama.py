"""Beside a real engine (issue 11, item 5): a transformers Llama adopted in place on the GPU.

The model of issue 11: ``LlamaForCausalLM`` from a config (hidden 2048, 16 layers, intermediate
5632, vocab 32000, 16 heads), random init, bf16 on cuda:0, about 1.9 GB in 147 tensors. It is
sealed where it lives with ``seal_tensors`` (nothing is copied), then:

- ``verify_model`` between ``generate()`` calls passes, and the generated tokens are the same with
  and without it (verification only reads);
- one bit flipped through torch, in place, in ``model.layers.4.self_attn.q_proj.weight`` fails
  verification naming exactly that parameter; flipping it back makes the model verify again;
- ``verify_before_forward`` (the forward pre-hook) with ``every_ms=0`` raises at the very next
  forward (and so from ``generate()``), while a long interval lets a forward through unverified;
- the ``Scrubber`` finds the same flip in the background and names the same parameter.

Needs torch with CUDA and transformers (skipped, with the reason, without them). Run by
``scripts/gpu-check`` with the rest of tests/gpu; alone::

    VRAM_RESIDENCY_REQUIRE_GPU=1 python -m pytest tests/gpu/test_engine_llama.py -v
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from vram_residency import Scrubber, SealVerificationFailed, VramManager, verify_before_forward
from vram_residency.sources.model import SealedModel

pytestmark = pytest.mark.gpu

TOKEN = "engine-llama-test-token-0123456789"
DEVICE = "cuda:0"
# seal_tensors names a module's tensors as named_parameters() does: the full dotted path from the
# top module, which for LlamaForCausalLM starts at its inner ``model`` attribute.
FLIPPED = "model.layers.4.self_attn.q_proj.weight"
# Element 1,000,003 of the 2048 x 2048 bf16 weight (byte 2,000,006, in its second 1 MiB unit):
# not the first unit, so the localization has to find the right one.
FLIP_INDEX = 1_000_003
FLIP_BIT = 6  # an exponent bit of the bf16 value: a change the model's output would feel
PROMPT = [1, 450, 4996, 17354, 1701, 29916]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def torch() -> Any:
    torch = pytest.importorskip("torch", reason="this test needs PyTorch with CUDA")
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} has no usable CUDA device (a CPU-only build?)")
    return torch


@pytest.fixture(scope="module")
def llama(torch: Any) -> Iterator[Any]:
    transformers = pytest.importorskip("transformers", reason="this test needs Hugging Face transformers")
    config = transformers.LlamaConfig(
        hidden_size=2048,
        num_hidden_layers=16,
        intermediate_size=5632,
        vocab_size=32000,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    torch.manual_seed(0)
    # Built in bf16 directly on the GPU: no float32 copy first (half the peak memory).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    # Adopting does not wait on torch's streams: the weights must be written before sealing.
    torch.cuda.synchronize()
    yield model
    del model
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def mgr() -> Iterator[VramManager]:
    with VramManager(TOKEN, backend="cuda", worker_id="engine-llama") as m:
        yield m


@pytest.fixture(scope="module")
def sealed(mgr: VramManager, llama: Any) -> Iterator[SealedModel]:
    model = mgr.seal_tensors(llama)
    yield model
    for shard in model.shards:
        mgr.deallocate(shard)  # forgets the seal; the memory stays torch's


def flip(torch: Any, llama: Any) -> None:
    """XOR one bit of the q_proj weight of layer 4, in place, through torch (as a stray write by
    the engine, a bad kernel or a hardware fault would change it), and wait for it to land."""
    weight = llama.model.layers[4].self_attn.q_proj.weight
    with torch.no_grad():
        bits = weight.detach().view(torch.int16).view(-1)  # the same storage, 16-bit words
        bits[FLIP_INDEX : FLIP_INDEX + 1].bitwise_xor_(1 << FLIP_BIT)
    torch.cuda.synchronize()


def assert_names_flipped(exc: SealVerificationFailed) -> None:
    assert exc.corrupted_tensors == [FLIPPED]
    assert [f.corrupted_tensors for f in exc.failures] == [(FLIPPED,)]
    # The changed byte is in the second 1 MiB unit of the weight's shard.
    assert any(a <= 2 * FLIP_INDEX < b for a, b in exc.corrupted_ranges), exc.corrupted_ranges


def generate(torch: Any, llama: Any) -> list[int]:
    ids = torch.tensor([PROMPT], device=DEVICE)
    out = llama.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )
    return [int(t) for t in out[0].tolist()]


def test_adopted_llama_verifies_between_generate_calls_and_names_a_flipped_bit(
    torch: Any, llama: Any, mgr: VramManager, sealed: SealedModel
) -> None:
    params = dict(llama.named_parameters())
    assert FLIPPED in params and FLIPPED in sealed.names
    # Adopted, not copied: the shard's device memory is the parameter's own storage.
    assert mgr.device_buffer(sealed.shard(FLIPPED)).device_pointer == params[FLIPPED].data_ptr()

    first = generate(torch, llama)
    assert len(first) == len(PROMPT) + NEW_TOKENS
    mgr.verify_model(sealed)  # generate() wrote nothing into the weights (its KV cache is elsewhere)
    second = generate(torch, llama)
    mgr.verify_model(sealed)
    assert second == first, "verification changed what the model generates"

    flip(torch, llama)
    with pytest.raises(SealVerificationFailed) as caught:
        mgr.verify_model(sealed)
    assert_names_flipped(caught.value)

    flip(torch, llama)  # the same bit again: the original weights
    mgr.verify_model(sealed)
    assert generate(torch, llama) == first


def test_forward_pre_hook_catches_a_flip_at_the_next_forward(
    torch: Any, llama: Any, mgr: VramManager, sealed: SealedModel
) -> None:
    ids = torch.tensor([PROMPT], device=DEVICE)
    # A long interval: the first forward verifies, the next one within the interval does not, so
    # a flip in between goes through unseen (the price of every_ms > 0).
    handle = verify_before_forward(llama, mgr, sealed, every_ms=600_000)
    try:
        with torch.no_grad():
            llama(ids)
            flip(torch, llama)
            llama(ids)
    finally:
        handle.remove()

    # every_ms=0: verified before every forward, so the flip is caught at the next one, and
    # generate() (a forward per token) stops before its first token.
    handle = verify_before_forward(llama, mgr, sealed, every_ms=0)
    try:
        with torch.no_grad(), pytest.raises(SealVerificationFailed) as caught:
            llama(ids)
        assert_names_flipped(caught.value)
        with pytest.raises(SealVerificationFailed) as caught:
            generate(torch, llama)
        assert_names_flipped(caught.value)
        flip(torch, llama)
        with torch.no_grad():
            llama(ids)  # restored: the hook lets it through
    finally:
        handle.remove()
    mgr.verify_model(sealed)


def test_scrubber_finds_a_flip_in_the_background(
    torch: Any, llama: Any, mgr: VramManager, sealed: SealedModel
) -> None:
    failed = threading.Event()
    errors: list[SealVerificationFailed] = []

    def on_failure(exc: SealVerificationFailed) -> None:
        errors.append(exc)
        failed.set()

    scrubber = Scrubber(mgr, budget=0.5, shards=lambda: sealed.shards, on_failure=on_failure)
    with scrubber:
        deadline = time.monotonic() + 30
        while scrubber.passes < 1:
            assert time.monotonic() < deadline and scrubber.running, scrubber.last_error
            time.sleep(0.01)
        assert not errors
        flip(torch, llama)
        t0 = time.monotonic()
        assert failed.wait(30), "the scrubber did not find the flip within 30 s"
        detect_s = time.monotonic() - t0
    flip(torch, llama)
    mgr.verify_model(sealed)
    assert len(errors) == 1
    assert_names_flipped(errors[0])
    # One pass of 1.9 GB at half the GPU time takes well under a second on an H200.
    assert detect_s < 10, detect_s
