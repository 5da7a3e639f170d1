"""The worker token's bytes (formats/keys.py): a token that cannot be encoded is a ConfigError that
never carries the token."""

from __future__ import annotations

import hashlib
import hmac
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vram_residency import ConfigError
from vram_residency.formats.keys import SecretKey, hmac_sha256, token_bytes


def test_token_with_lone_surrogate_is_config_error_without_its_text() -> None:
    secret = "abcdefghijklmnop\ud800qrstuvw"
    with pytest.raises(ConfigError) as info:
        token_bytes(secret)
    assert "\ud800" not in str(info.value) and "abcdefgh" not in str(info.value)
    # Not even as the (hidden) context: a UnicodeEncodeError holds the whole string.
    assert info.value.__cause__ is None and info.value.__context__ is None


@given(key=st.binary(min_size=32, max_size=32), message=st.binary(max_size=300))
def test_secret_key_tag_is_hmac_sha256(key: bytes, message: bytes) -> None:
    # SecretKey.tag reuses the key's absorbed pad blocks; it must stay RFC 2104 HMAC-SHA256,
    # the same bytes as the stdlib and the cryptography package give, every time it is called.
    secret = SecretKey(key)
    want = hmac.new(key, message, hashlib.sha256).digest()
    assert secret.tag(message) == want == hmac_sha256(key, message)
    assert secret.tag(message) == want  # the saved states are copied, never consumed
    assert secret.verify(message, want)
    assert not secret.verify(message + b"x", want)


def test_secret_key_never_shows_its_pad_states() -> None:
    secret = SecretKey(bytes(range(32)))
    assert repr(secret) == str(secret) == "SecretKey(<redacted>)"
    assert not hasattr(secret, "__dict__")
    with pytest.raises(TypeError):
        pickle.dumps(secret)
