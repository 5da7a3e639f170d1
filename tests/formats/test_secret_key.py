"""SecretKey's precomputed HMAC pads: known answers for 32-byte keys (RFC 4868's
HMAC-SHA-256 test cases AUTH256-1..3, the only published ones with the 32-byte keys SecretKey
takes; RFC 4231's keys are 4, 20, 25 and 131 bytes), agreement with the RFC 4231-checked
``hmac_sha256`` from many threads at once (the pad states are copied per call, never updated),
and a key that shows itself nowhere: repr, str, pickle, copy, errors."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest

from vram_residency import ConfigError
from vram_residency.formats.keys import SecretKey, hmac_sha256

# RFC 4868 section 2.7.2.1 (PRF/authenticator test vectors for HMAC-SHA-256, 32-byte keys).
RFC4868_AUTH256 = [
    (b"\x0b" * 32, b"Hi There", "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"),
    (
        b"Jefe" * 8,
        b"what do ya want for nothing?",
        "167f928588c5cc2eef8e3093caa0e87c9ff566a14794aa61648d81621a2a40c6",
    ),
    (b"\xaa" * 32, b"\xdd" * 50, "cdcb1220d1ecccea91e53aba3092f962e549fe6ce9ed7fdc43191fbde45c30b0"),
]


@pytest.mark.parametrize(("key", "message", "want"), RFC4868_AUTH256)
def test_secret_key_known_answers(key: bytes, message: bytes, want: str) -> None:
    secret = SecretKey(key)
    assert secret.tag(message).hex() == want
    assert secret.verify(message, bytes.fromhex(want))
    for bad in (bytes.fromhex(want)[:31], bytes.fromhex(want) + b"\0", b"", bytes(32)):
        assert not secret.verify(message, bad)
    flipped = bytearray.fromhex(want)
    flipped[31] ^= 1
    assert not secret.verify(message, bytes(flipped))


def test_secret_key_tags_agree_from_many_threads() -> None:
    # Messages of 0 B to 3 MiB: hashlib lets go of the GIL while it hashes large data, so the
    # threads really do hash at once, each from its own copies of the pad states.
    key = bytes(range(100, 132))
    secret = SecretKey(key)
    messages = [bytes([i]) * (i * 97_003 % (3 << 20)) for i in range(24)]
    want = [hmac_sha256(key, m) for m in messages]
    errors: list[str] = []
    barrier = threading.Barrier(8)

    def worker(offset: int) -> None:
        barrier.wait()
        for r in range(3):
            for i in range(len(messages)):
                j = (i + offset + r) % len(messages)
                if secret.tag(messages[j]) != want[j] or not secret.verify(messages[j], want[j]):
                    errors.append(f"thread {offset}: message {j}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_secret_key_never_shows_the_key() -> None:
    key = bytes.fromhex("5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7")
    secret = SecretKey(key)
    texts = [repr(secret), str(secret), f"{secret}", f"{secret!r}", format(secret, "")]
    for text in texts:
        assert "5ec7" not in text.lower() and key.hex() not in text
    for attempt in (
        lambda: pickle.dumps(secret),
        lambda: pickle.dumps(secret, protocol=0),
        lambda: copy.copy(secret),
        lambda: copy.deepcopy(secret),
    ):
        with pytest.raises(TypeError) as info:
            attempt()
        assert key.hex() not in str(info.value) and repr(key) not in str(info.value)
    assert secret != SecretKey(key) and not hasattr(secret, "__dict__")
    with pytest.raises(TypeError):
        hash(secret)
    for short in (key[:31], key + b"\0", b""):
        with pytest.raises(ConfigError) as cfg:
            SecretKey(short)
        assert "5ec7" not in str(cfg.value).lower()
