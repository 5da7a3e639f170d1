"""The one hook for JSON objects read strictly: a key given twice is refused.

``json.loads`` keeps the *last* value of a repeated key, other parsers (and a person reading the
text) the first: a signed record, an audit line or a request body with two values for one key
could be acted on differently by two readers. Each caller raises its own error type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["unique_keys"]


def unique_keys(refuse: Callable[[str], Exception]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """An ``object_pairs_hook`` that builds the object, raising ``refuse(key)`` for a repeated key."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise refuse(key)
            out[key] = value
        return out

    return hook
