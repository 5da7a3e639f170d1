"""Known answers of docs/specs/nh-fast-v1.md, checked against every host path: the pure-Python
reference, the native library (each vector path), the numpy fallback and ``tree.hash_units``."""

from __future__ import annotations

import pytest

from vram_residency.formats import _nhfast_native, keys, nhfast, tree

K = bytes(range(32))


def P(n: int) -> bytes:
    return bytes((i * 31 + 7) % 256 for i in range(n))


# (message, D, U_0) from the spec's table.
DIGESTS = [
    (
        b"",
        "c8f0a12c84783c497f14a66fa124dd968fe4c4411a23af13844ee9e9948ad82f",
        "81ac16b7a50f758caa4c1ff1157379cd9baf37d1784bb4892f34eacc54dd2e05",
    ),
    (
        b"abc",
        "340ef17825027a657fc820b11d756de16bcdc11291057921cd811e3d390a8982",
        "aad069153000993828d4568d9270390259f9022cb01f38df301bdddb498c7b21",
    ),
    (
        P(4096),
        "7d71eb4a4bfbbc8e4946c00db86a8806f3b9de4756d3141a005625be185c50d0",
        "bb2d39aa1f97b259d6691cda098e28dbc2f2e0b437ae9cacf12a4645b65db4a1",
    ),
    (
        P(4097),
        "b1db44a3ca5d6f9d7bf7c610195cd2f8efcf041a161be4cfe72c224b01a8ff67",
        "26488743297b99385947b02dcbdceb47df0a33b2361752ab889cb075b5f4b469",
    ),
    (
        P(1 << 20),
        "96ba2e397e692c2f250797ef9f15638113ba9bbbe28d2d559d4a086857089d42",
        "cbc9438bcef250d6637b63f02e859e0f27711260ac8493a4da2d6ac5b44e6c11",
    ),
    (
        P((1 << 20) + 4097),
        "61e54277ce1b595c0ffe3cc91c17b5e8498c2a78d401e38498465a898a9fa3f7",
        "cbc9438bcef250d6637b63f02e859e0f27711260ac8493a4da2d6ac5b44e6c11",
    ),
]
IDS = ["empty", "abc", "P4096", "P4097", "P1MiB", "P1MiB+4097"]


def test_key_schedule() -> None:
    s = nhfast.key_schedule(K)
    assert s.unit_key.hex() == "c7a9fe560d44841778c22120ce1b526366609eee92b4ff3696e96a1b445bd921"
    assert s.top_key.hex() == "1a5a85550446f71b8af4a80528c165dd8ac7f9c7407b26cd92db82d575065092"
    assert len(s.nh_key) == nhfast.NH_KEY_BYTES == 5120
    assert s.nh_key[:32].hex() == "9e630d8e292148e32cad13aa5339585ce8478c8780ed81b4384b5e015bd1b697"
    assert s.nh_key[-32:].hex() == "d656b005ec5cc168cc6a000911817635597886e73b30cd0ec180cc59a90d0d49"
    assert "<redacted>" in repr(s) and s.nh_key.hex()[:16] not in repr(s)


def test_leaf_tags() -> None:
    nh = nhfast.key_schedule(K).nh_key
    assert nhfast.reference_leaf_tag(P(4096), nh).hex() == "77683a70e669eda286a6ebd26adf3fe807f4b959f4c7fa44"
    assert nhfast.reference_leaf_tag(b"", nh).hex() == "d6a871b4f5b9d55f79d760d54630eeab2f545bb5b0dfffd2"


@pytest.mark.parametrize(("msg", "d", "u0"), DIGESTS, ids=IDS)
def test_reference(msg: bytes, d: str, u0: str) -> None:
    dig, units = nhfast.reference_hash(msg, K)
    assert dig.hex() == d
    assert units[:32].hex() == u0


@pytest.mark.parametrize(("msg", "d", "u0"), DIGESTS, ids=IDS)
def test_host_paths(msg: bytes, d: str, u0: str) -> None:
    res = tree.hash_units(msg, tree.NH_FAST_V1, key=K)
    assert res.digest.hex() == d and res.unit(0).hex() == u0
    sched = nhfast.key_schedule(K)
    ref_tags = nhfast._numpy_tags(memoryview(msg), sched.nh_key)
    if _nhfast_native.available():
        for want in (0, 1, 2):
            assert _nhfast_native.leaf_tags(memoryview(msg), sched.nh_key, 2, want=want) == ref_tags
    assert (
        nhfast.finalize(sched, nhfast.unit_digests_from_tags(sched, ref_tags, len(msg)), len(msg)).hex() == d
    )


def test_second_unit_equals_p4097_unit() -> None:
    units = nhfast.reference_hash(P((1 << 20) + 4097), K)[1]
    assert units[32:].hex() == "26488743297b99385947b02dcbdceb47df0a33b2361752ab889cb075b5f4b469"


def test_keys_from_token() -> None:
    worker = nhfast.manager_key(keys.token_bytes("example-worker-token-0123456789"))
    assert worker.hex() == "254baa21cdac400f500bd872fa2ab707d977f84cbbf84a7c2ecb7f2ce83636bd"
    k = nhfast.shard_key(worker, "shard-00112233445566778899aabbccddeeff")
    assert k.hex() == "8054cf4f7e705576f3a00d520ef0e103999ba3025b83ef2876b557b35995e66b"
    assert nhfast.reference_hash(P(4097), k)[0].hex() == (
        "7d0e599795e404949c3bb30a98a6cd493a2ab920a24358dbf13a652cef525839"
    )
