"""Known answers of ../shared/specs: sha256-tree-v1 and seal-v1, byte for byte."""

from __future__ import annotations

import pytest

from vram_residency.formats import digest, seal_key, seal_message, seal_tag
from vram_residency.formats.seal import SealFields
from vram_residency.formats.tree import BLAKE3, SHA256_TREE_V1, hash_units


def P(n: int) -> bytes:
    return bytes((i * 31 + 7) % 256 for i in range(n))


TREE_VECTORS = [
    (b"", "37e2f51ed116754f5bccd9726e3adb0b4c84af27df70df0fe0684b022975db58"),
    (b"abc", "16889f98eeb0e2e16ee2e640cb6eea840349415a15a1c2a69d6766f0b0b3d896"),
    (P(4096), "2ef4a69a251c059b70d2e2b7aab99bf8bcb0a1822d208604dcc0b1dd501c2d23"),
    (P(4097), "5e1fd3dc2db57d1b502c092c8851726417dea5bda061ba6b8987bb7f885580b5"),
    (P(12288), "4ce8a6713e2cbf90adb1a8b539c84b1512c7450fe7895619e8bcdd5bb805803f"),
    (P(20481), "ffcdcd1f12bcb420959af918506ad32aebd2bea01e69c08e48065db574fa6833"),
    (P(1048576), "34bc5f0978eec0aeccac1445e6a9adda7494a3ee898ee4ee94ce128e91970c16"),
]


@pytest.mark.parametrize(
    ("message", "expected"), TREE_VECTORS, ids=lambda v: str(len(v)) if isinstance(v, bytes) else ""
)
@pytest.mark.parametrize("threads", [1, 2])
def test_sha256_tree_v1_known_answers(message: bytes, expected: str, threads: int) -> None:
    assert hash_units(message, SHA256_TREE_V1, threads=threads).digest.hex() == expected


def test_blake3_is_standard_blake3() -> None:
    # The BLAKE3 paper's test vector for the empty input, and blake3("abc") as b3sum prints it.
    assert digest(b"", BLAKE3).hex() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert digest(b"abc", BLAKE3).hex() == "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"


SPEC_TOKEN = "example-worker-token-0123456789"


def test_seal_key_known_answer() -> None:
    key = seal_key(SPEC_TOKEN)
    assert key._expose_for_tests().hex() == "31b83883f044ed633900ca9da7d42fd1fa22af86a56680a4f9f42f73908a18a7"


def _fields(**overrides: object) -> SealFields:
    base: dict[str, object] = dict(
        shard_id="shard-00112233445566778899aabbccddeeff",
        gpu_device=0,
        vram_bytes=4097,
        digest_algorithm="sha256-tree-v1",
        digest=digest(P(4097)).hex(),
        sealed_at_ns=1764331200000000000,
        worker_id="worker-a",
        model_ref="llama-3-8b@sha256:abc",
        shard_index=0,
        total_shards=2,
    )
    base.update(overrides)
    return SealFields(**base)  # type: ignore[arg-type]


def test_seal_tag_known_answer_all_fields() -> None:
    tag = seal_tag(seal_key(SPEC_TOKEN), _fields())
    assert tag.hex() == "511ade73fd72447321eceac8b86ed28dd2a976dfbb68a0dafb7e43f29236fac2"


def test_seal_tag_known_answer_absent_fields() -> None:
    f = _fields(worker_id="", model_ref=None, shard_index=None, total_shards=None)
    assert (
        seal_tag(seal_key(SPEC_TOKEN), f).hex()
        == "cdcac52608ca1258b1c9987a02f6c95b18749db5ec4e02c51c05a0fb028b4a20"
    )


def test_seal_message_layout() -> None:
    msg = seal_message(_fields())
    assert msg.startswith(b"llorch-vram-seal-v1")
    # First field: LE16(8) "shard_id" LE32(37) value
    rest = msg[19:]
    assert rest[:2] == (8).to_bytes(2, "little")
    assert rest[2:10] == b"shard_id"
    assert rest[10:14] == (38).to_bytes(4, "little")
