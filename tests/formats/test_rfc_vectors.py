"""RFC 5869 (HKDF-SHA256) and RFC 4231 (HMAC-SHA256) vectors from the cryptography-vectors
package, run through the project's own key and tag functions."""

from __future__ import annotations

from pathlib import Path

import cryptography_vectors
import pytest

from vram_residency.formats.keys import derive_key, hmac_sha256

VECTORS = Path(cryptography_vectors.__file__).parent


def _records(path: Path) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = (part.strip() for part in line.partition("="))
        if key in cur and key in ("COUNT", "Len"):
            out.append(cur)
            cur = {}
        cur[key] = value
        if key in ("OKM", "MD"):
            out.append(cur)
            cur = {}
    return out


HKDF = _records(VECTORS / "KDF" / "rfc-5869-HKDF-SHA256.txt")
HMAC = _records(VECTORS / "HMAC" / "rfc-4231-sha256.txt")


def test_vector_files_parsed() -> None:
    assert len(HKDF) == 3
    assert len(HMAC) >= 6


@pytest.mark.parametrize("v", HKDF, ids=lambda v: v["COUNT"])
def test_hkdf_sha256_rfc5869(v: dict[str, str]) -> None:
    salt = bytes.fromhex(v["salt"]) or None
    okm = derive_key(bytes.fromhex(v["IKM"]), bytes.fromhex(v["info"]), int(v["L"]), salt=salt)
    assert okm.hex() == v["OKM"]


@pytest.mark.parametrize("v", HMAC, ids=lambda v: v["Len"])
def test_hmac_sha256_rfc4231(v: dict[str, str]) -> None:
    assert hmac_sha256(bytes.fromhex(v["Key"]), bytes.fromhex(v["Msg"])).hex() == v["MD"]
