"""The worker token's bytes (formats/keys.py): a token that cannot be encoded is a ConfigError that
never carries the token."""

from __future__ import annotations

import pytest

from vram_residency import ConfigError
from vram_residency.formats.keys import token_bytes


def test_token_with_lone_surrogate_is_config_error_without_its_text() -> None:
    secret = "abcdefghijklmnop\ud800qrstuvw"
    with pytest.raises(ConfigError) as info:
        token_bytes(secret)
    assert "\ud800" not in str(info.value) and "abcdefgh" not in str(info.value)
    # Not even as the (hidden) context: a UnicodeEncodeError holds the whole string.
    assert info.value.__cause__ is None and info.value.__context__ is None
