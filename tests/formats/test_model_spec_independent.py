"""An independent client of ``vram-model-v1`` (docs/specs/vram-model-v1.md), written from the text.

``model_m``, ``model_record`` and ``reference_check`` below were written from the doc (and the
fixed ``seal-v1`` and ``sha256-tree-v1`` specs it builds on) without reading the implementation, as
an orchestrator in another language would: hashlib/hmac and cryptography's HKDF only, nothing
from ``vram_residency``. They are checked against the doc's known answers, then the library is
checked against them: ``VramManager(backend="host").seal_files`` over real files must produce the
very record the reference builds from the same files (the random shard ids and seal times read
back from the library's record), ``check_model_record`` must accept every reference record, and
must refuse every tamper with the error class the doc's checking procedure gives. A disagreement
is a bug in the doc or the code; both must change together.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vram_residency import VramManager, check_model_record
from vram_residency.errors import InvalidInput, SealVerificationFailed
from vram_residency.sources.model import model_digest

TOKEN = "example-worker-token-0123456789"
DOC = Path(__file__).resolve().parents[2] / "docs" / "specs" / "vram-model-v1.md"
# Few examples, small sizes: the module stays within seconds on a shared 2-core box.
FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pattern(n: int) -> bytes:
    """``P(n)``: the bytes ``(i * 31 + 7) mod 256``."""
    return bytes((i * 31 + 7) % 256 for i in range(n))


def le(x: int, width: int) -> bytes:
    return x.to_bytes(width, "little")


# ------------------------------------------------------------ sha256-tree-v1 and seal-v1, from text


def tree_digest(data: bytes) -> bytes:
    leaves = [data[i : i + 4096] for i in range(0, len(data), 4096)] or [b""]
    level = [hashlib.sha256(c + b"\x00").digest() for c in leaves]
    while len(level) > 1:
        nxt = [
            hashlib.sha256(level[i] + level[i + 1] + b"\x01").digest() for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return hashlib.sha256(level[0] + le(len(data), 8) + b"sha256-tree-v1" + b"\x02").digest()


def seal_key(token: str) -> bytes:
    # salt = none: RFC 5869's default (HashLen zero bytes), which cryptography applies for None.
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"llorch-vram-seal-v1")
    return hkdf.derive(token.encode("utf-8"))


def _f16(name: str, value: bytes) -> bytes:
    return le(len(name), 2) + name.encode("ascii") + le(len(value), 4) + value


def seal_signature(token: str, s: dict[str, Any]) -> str:
    def opt(v: int | None) -> bytes:
        return b"" if v is None else le(v, 8)

    message = b"llorch-vram-seal-v1" + b"".join(
        (
            _f16("shard_id", s["shard_id"].encode("utf-8")),
            _f16("gpu_device", le(s["gpu_device"], 4)),
            _f16("vram_bytes", le(s["vram_bytes"], 8)),
            _f16("digest_algorithm", s["digest_algorithm"].encode("utf-8")),
            _f16("digest", bytes.fromhex(s["digest"])),
            _f16("sealed_at_ns", le(s["sealed_at_ns"], 8)),
            _f16("worker_id", s["worker_id"].encode("utf-8")),
            _f16("model_ref", b"" if s["model_ref"] is None else s["model_ref"].encode("utf-8")),
            _f16("shard_index", opt(s["shard_index"])),
            _f16("total_shards", opt(s["total_shards"])),
        )
    )
    return hmac.new(seal_key(token), message, hashlib.sha256).hexdigest()


# ------------------------------------------------------------------- vram-model-v1, from the doc


def m_input(parts: list[tuple[str, int, str, bytes]]) -> bytes:
    """The bytes SHA-256 reads for ``M``: section "The model digest M"."""
    out = b"vram-residency-model-v1" + le(len(parts), 4)
    for name, size, alg, digest in parts:
        nb, ab = name.encode("utf-8"), alg.encode("ascii")
        assert nb and len(digest) == 32
        out += le(len(nb), 4) + nb + le(len(ab), 4) + ab + le(size, 8) + digest
    return out


def model_m(parts: list[tuple[str, int, str, bytes]]) -> str:
    return hashlib.sha256(m_input(parts)).hexdigest()


def model_record(
    token: str,
    model_name: str,
    files: list[tuple[str, bytes]],
    ids: list[tuple[str, int]],
    *,
    worker_id: str = "worker-a",
    gpu_device: int = 0,
) -> dict[str, Any]:
    """The record of ``files`` (name, contents) sealed with ``ids`` (shard_id, sealed_at_ns)."""
    alg = "sha256-tree-v1"
    digests = [tree_digest(data) for _, data in files]
    m = model_m([(name, len(data), alg, d) for (name, data), d in zip(files, digests, strict=True)])
    ref = f"{model_name}@vram-model-v1:{m}"
    parts = []
    for i, ((name, data), d, (sid, t)) in enumerate(zip(files, digests, ids, strict=True)):
        seal: dict[str, Any] = {
            "format": "seal-v1",
            "shard_id": sid,
            "gpu_device": gpu_device,
            "vram_bytes": len(data),
            "digest_algorithm": alg,
            "digest": d.hex(),
            "sealed_at_ns": t,
            "worker_id": worker_id,
            "model_ref": ref,
            "shard_index": i,
            "total_shards": len(files),
        }
        seal["signature"] = seal_signature(token, seal)
        parts.append({"name": name, "seal": seal})
    return {
        "format": "vram-model-v1",
        "model_ref": ref,
        "model_digest": m,
        "digest_algorithm": alg,
        "parts": parts,
    }


def kat_ids(n: int) -> list[tuple[str, int]]:
    return [(f"shard-{i:032x}", 1764331200000000000 + i) for i in range(n)]


_HEX64 = re.compile(r"[0-9a-f]{64}")


def reference_check(record: dict[str, Any], token: str) -> str:
    """Section "Checking a record", steps 2 to 8: ``"ok"`` or the error class name."""
    if record.get("format") != "vram-model-v1":
        return "InvalidInput"
    ref, parts = record.get("model_ref"), record.get("parts")
    if not isinstance(ref, str) or not isinstance(parts, list) or not parts:
        return "InvalidInput"
    digest, alg = record.get("model_digest"), record.get("digest_algorithm")
    if digest is not None and not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
        return "InvalidInput"
    if alg is not None and not isinstance(alg, str):
        return "InvalidInput"
    for p in parts:  # step 4 (seal records here are well formed: only their tags are checked)
        if (
            not isinstance(p, dict)
            or not isinstance(p.get("name"), str)
            or not isinstance(p.get("seal"), dict)
        ):
            return "InvalidInput"
        if not hmac.compare_digest(seal_signature(token, p["seal"]), p["seal"]["signature"]):
            return "SealVerificationFailed"
    name, at, rest = ref.rpartition("@")
    if not at or not name or not rest.startswith("vram-model-v1:") or not _HEX64.fullmatch(rest[14:]):
        return "InvalidInput"
    seals = [p["seal"] for p in parts]
    n = len(parts)
    if (
        len({s["digest_algorithm"] for s in seals}) != 1
        or any(s["model_ref"] != ref for s in seals)
        or any(s["shard_index"] != i or s["total_shards"] != n for i, s in enumerate(seals))
    ):
        return "SealVerificationFailed"
    if any(not p["name"] for p in parts):
        return "InvalidInput"
    m = model_m(
        [
            (p["name"], s["vram_bytes"], s["digest_algorithm"], bytes.fromhex(s["digest"]))
            for p, s in zip(parts, seals, strict=True)
        ]
    )
    if m != rest[14:]:
        return "SealVerificationFailed"
    if record.get("model_digest") not in (None, m) or record.get("digest_algorithm") not in (
        None,
        seals[0]["digest_algorithm"],
    ):
        return "SealVerificationFailed"
    return "ok"


def library_check(record: Any) -> str:
    try:
        check_model_record(record, TOKEN)
    except (InvalidInput, SealVerificationFailed) as exc:
        return type(exc).__name__
    return "ok"


# ------------------------------------------------------------------------------- known answers

ONE = ("tiny", [("model.bin", b"abc")])
THREE = ("tiny-3", [("a.bin", pattern(4097)), ("b.bin", b"abc"), ("c-\u00fc.bin", pattern(4096))])


ONE_M = "0b0a3960753cabcdde3995bddec935cff2dc23ed96a1ce8220c7f74148288e78"
ONE_SIGS = ["3542c456223ef3aae1169a03131eb598dba6745875ae296b1782e3336d41854f"]
ONE_INPUT = (
    "7672616d2d7265736964656e63792d6d6f64656c2d763101000000090000006d6f64656c2e62696e0e000000736861"
    "3235362d747265652d7631030000000000000016889f98eeb0e2e16ee2e640cb6eea840349415a15a1c2a69d6766f0"
    "b0b3d896"
)
THREE_M = "9f977aae4efb5ebbe47123af74c7105885c4b5cc63019a812aca26e7ec1d3636"
THREE_SIGS = [
    "9edaabc0ff6e592b36fa695798acfcd47ed318864de0bdefb58cc6dc3d9a68ac",
    "7dfffcfd6d0e5aba684a787ee5db57c924125f4c8b464645f92ad9dbd586c374",
    "d15237c27ec6849fd341d986a9d9907629c074d0512df82d76649c8d55a52b96",
]


def parts_of(files: list[tuple[str, bytes]]) -> list[tuple[str, int, str, bytes]]:
    return [(n, len(d), "sha256-tree-v1", tree_digest(d)) for n, d in files]


@pytest.mark.parametrize(
    ("model", "m", "sigs", "input_len"), [(ONE, ONE_M, ONE_SIGS, 98), (THREE, THREE_M, THREE_SIGS, 231)]
)
def test_known_answers(
    model: tuple[str, list[tuple[str, bytes]]], m: str, sigs: list[str], input_len: int
) -> None:
    name, files = model
    doc = DOC.read_text(encoding="utf-8")
    # The sha256-tree-v1 known answers the doc quotes: this tree_digest is the spec's.
    assert tree_digest(b"abc").hex() == "16889f98eeb0e2e16ee2e640cb6eea840349415a15a1c2a69d6766f0b0b3d896"
    assert seal_key(TOKEN).hex() == "31b83883f044ed633900ca9da7d42fd1fa22af86a56680a4f9f42f73908a18a7"
    data = m_input(parts_of(files))
    assert len(data) == input_len
    assert f"is {input_len} bytes" in doc and data.hex() in doc  # the doc shows these bytes
    assert model_m(parts_of(files)) == m and f"{name}@vram-model-v1:{m}" in doc
    record = model_record(TOKEN, name, files, kat_ids(len(files)))
    assert [p["seal"]["signature"] for p in record["parts"]] == sigs
    assert all(sig in doc for sig in sigs)
    # The library: its own M of the same list, and its checker accepts the reference's record,
    # as a dict and as JSON text.
    assert model_digest([(n, size, alg, d.hex()) for n, size, alg, d in parts_of(files)]) == m
    for form in (record, json.dumps(record), json.dumps(record, ensure_ascii=False).encode("utf-8")):
        checked = check_model_record(form, TOKEN)
        assert checked.model_digest == m and checked.names == tuple(n for n, _ in files)
        assert checked.record() == record
    assert m_input(parts_of(ONE[1])).hex() == ONE_INPUT


def seal_real_files(tmp: Path, name: str, files: list[tuple[str, bytes]]) -> dict[str, Any]:
    paths = []
    for fname, data in files:
        path = tmp / fname
        path.write_bytes(data)
        paths.append(path)
    mgr = VramManager(TOKEN, backend="host", worker_id="worker-a")
    try:
        model = mgr.seal_files(paths, model_name=name, format="raw")
        record = model.record()
        mgr.verify_model(model)
    finally:
        mgr.close()
    return record


def assert_library_record_is_reference(
    record: dict[str, Any], name: str, files: list[tuple[str, bytes]]
) -> None:
    ids = [(p["seal"]["shard_id"], p["seal"]["sealed_at_ns"]) for p in record["parts"]]
    assert record == model_record(TOKEN, name, files, ids)
    assert reference_check(record, TOKEN) == "ok" and library_check(record) == "ok"


@pytest.mark.parametrize(("model", "m"), [(ONE, ONE_M), (THREE, THREE_M)])
def test_library_seals_the_known_answer_files(
    tmp_path: Path, model: tuple[str, list[tuple[str, bytes]]], m: str
) -> None:
    name, files = model
    record = seal_real_files(tmp_path, name, files)
    assert record["model_ref"] == f"{name}@vram-model-v1:{m}"
    assert_library_record_is_reference(record, name, files)


# Any text that has a UTF-8 form (no lone surrogates), of up to 16 characters.
TEXT = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=16)
NAME_TEXT = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12)

# File names a file system takes: letters and digits of any script, a few punctuation marks.
FILE_NAME = st.text(
    st.characters(categories=("L", "N"), max_codepoint=0x2FFFF) | st.sampled_from("-_.+ "),
    min_size=1,
    max_size=20,
).filter(lambda s: s.strip(". ") == s and s not in (".", "..") and len(s.encode()) < 200)


@FAST
@given(
    files=st.lists(
        st.tuples(FILE_NAME, st.binary(min_size=1, max_size=9000)),
        min_size=1,
        max_size=4,
        unique_by=lambda f: f[0],
    ),
    name=NAME_TEXT,
)
def test_library_record_equals_reference_for_real_files(
    tmp_path_factory: pytest.TempPathFactory, files: list[tuple[str, bytes]], name: str
) -> None:
    tmp = tmp_path_factory.mktemp("model")
    assert_library_record_is_reference(seal_real_files(tmp, name, files), name, files)


@FAST
@given(
    files=st.lists(
        st.tuples(TEXT, st.binary(max_size=5000)), min_size=1, max_size=6, unique_by=lambda f: f[0]
    ),
    name=TEXT,
)
def test_library_accepts_reference_records(files: list[tuple[str, bytes]], name: str) -> None:
    """Any part count, any names, sizes including 0 (which the checker accepts; see the doc)."""
    record = model_record(TOKEN, name, files, kat_ids(len(files)))
    m = model_m(parts_of(files))
    assert model_digest([(n, s, a, d.hex()) for n, s, a, d in parts_of(files)]) == m
    assert check_model_record(record, TOKEN).model_digest == m
    assert reference_check(record, TOKEN) == "ok"


# ------------------------------------------------------------------------------------- tampering


def _swap(r: dict[str, Any]) -> None:
    r["parts"][0], r["parts"][1] = r["parts"][1], r["parts"][0]


def _rename(r: dict[str, Any]) -> None:
    r["parts"][1]["name"] = r["parts"][1]["name"] + "x"


def _swap_names(r: dict[str, Any]) -> None:
    r["parts"][0]["name"], r["parts"][1]["name"] = r["parts"][1]["name"], r["parts"][0]["name"]


def _extra_copy(r: dict[str, Any]) -> None:
    r["parts"].append(copy.deepcopy(r["parts"][0]))


def _extra_other_model(r: dict[str, Any]) -> None:
    # A genuine seal of another model, in the position (and of the count) the record now needs.
    n = len(r["parts"])
    other = model_record(TOKEN, "other", [(f"z{i}", b"z") for i in range(n + 1)], kat_ids(n + 1))
    r["parts"].append(other["parts"][n])


def _missing_last(r: dict[str, Any]) -> None:
    r["parts"].pop()


def _missing_first(r: dict[str, Any]) -> None:
    r["parts"].pop(0)


def _edited_size(r: dict[str, Any]) -> None:
    r["parts"][0]["seal"]["vram_bytes"] += 1


def _edited_digest(r: dict[str, Any]) -> None:
    d = r["parts"][0]["seal"]["digest"]
    r["parts"][0]["seal"]["digest"] = ("1" if d[0] == "0" else "0") + d[1:]


def _edited_model_ref(r: dict[str, Any]) -> None:
    r["model_ref"] = r["model_ref"].replace("@", "2@", 1)


def _not_a_model_ref(r: dict[str, Any]) -> None:
    r["model_ref"] = r["model_ref"].replace("vram-model-v1", "vram-model-v2")


def _edited_model_digest(r: dict[str, Any]) -> None:
    r["model_digest"] = "0" * 64


def _edited_algorithm(r: dict[str, Any]) -> None:
    r["digest_algorithm"] = "blake3"


def _model_digest_not_text(r: dict[str, Any]) -> None:
    r["model_digest"] = 5


def _model_digest_a_list(r: dict[str, Any]) -> None:
    r["model_digest"] = [r["model_digest"]]


def _model_digest_upper_case(r: dict[str, Any]) -> None:
    r["model_digest"] = r["model_digest"].upper()


def _model_digest_short(r: dict[str, Any]) -> None:
    r["model_digest"] = r["model_digest"][:63]


def _algorithm_not_text(r: dict[str, Any]) -> None:
    r["digest_algorithm"] = ["sha256-tree-v1"]


def _empty_name(r: dict[str, Any]) -> None:
    r["parts"][0]["name"] = ""


def _name_not_text(r: dict[str, Any]) -> None:
    r["parts"][0]["name"] = 7


def _wrong_format(r: dict[str, Any]) -> None:
    r["format"] = "vram-model-v2"


def _no_parts(r: dict[str, Any]) -> None:
    r["parts"] = []


TAMPERS = {
    "swapped parts": (_swap, "SealVerificationFailed"),
    "renamed file": (_rename, "SealVerificationFailed"),
    "swapped names": (_swap_names, "SealVerificationFailed"),
    "extra part (a copy)": (_extra_copy, "SealVerificationFailed"),
    "extra part (another model's)": (_extra_other_model, "SealVerificationFailed"),
    "missing last part": (_missing_last, "SealVerificationFailed"),
    "missing first part": (_missing_first, "SealVerificationFailed"),
    "edited size": (_edited_size, "SealVerificationFailed"),
    "edited digest": (_edited_digest, "SealVerificationFailed"),
    "edited model_ref": (_edited_model_ref, "SealVerificationFailed"),
    "not a vram-model-v1 ref": (_not_a_model_ref, "InvalidInput"),
    "edited model_digest": (_edited_model_digest, "SealVerificationFailed"),
    "edited digest_algorithm": (_edited_algorithm, "SealVerificationFailed"),
    "model_digest not a string": (_model_digest_not_text, "InvalidInput"),
    "model_digest a list": (_model_digest_a_list, "InvalidInput"),
    "model_digest upper-case hex": (_model_digest_upper_case, "InvalidInput"),
    "model_digest 63 hex": (_model_digest_short, "InvalidInput"),
    "digest_algorithm not a string": (_algorithm_not_text, "InvalidInput"),
    "empty part name": (_empty_name, "InvalidInput"),
    "part name not a string": (_name_not_text, "InvalidInput"),
    "wrong format": (_wrong_format, "InvalidInput"),
    "no parts": (_no_parts, "InvalidInput"),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampered_known_answer_is_refused(tamper: str) -> None:
    edit, error = TAMPERS[tamper]
    record = model_record(TOKEN, THREE[0], THREE[1], kat_ids(3))
    edit(record)
    assert reference_check(record, TOKEN) == error
    assert library_check(record) == error


@FAST
@given(
    files=st.lists(
        st.tuples(TEXT, st.binary(max_size=3000)), min_size=2, max_size=5, unique_by=lambda f: f[0]
    ),
    tamper=st.sampled_from(sorted(TAMPERS)),
)
def test_tampered_record_is_refused(files: list[tuple[str, bytes]], tamper: str) -> None:
    edit, error = TAMPERS[tamper]
    record = model_record(TOKEN, "model", files, kat_ids(len(files)))
    edit(record)
    # Names are unique, so swapping two changes the list M is computed from.
    assert reference_check(record, TOKEN) == error
    assert library_check(record) == error


def test_single_part_missing_or_swapped_is_refused() -> None:
    record = model_record(TOKEN, ONE[0], ONE[1], kat_ids(1))
    three = model_record(TOKEN, THREE[0], THREE[1], kat_ids(3))
    record["parts"] = [three["parts"][0]]  # one part of another model in its place
    assert reference_check(record, TOKEN) == library_check(record) == "SealVerificationFailed"


# ---------------------------------------------------------------- what the doc says is not covered


def test_what_the_checker_does_not_refuse() -> None:
    """Section "What is and is not covered": these check, when the token holder tagged them."""
    # A part of 0 bytes and two parts of one name (the sealer refuses both).
    for files in ([("a.bin", b"")], [("same", b"1"), ("same", b"2")]):
        record = model_record(TOKEN, "m", files, kat_ids(len(files)))
        assert reference_check(record, TOKEN) == library_check(record) == "ok"
    # Parts on different devices, by different workers, with one shard_id.
    a = model_record(
        TOKEN, "m", [("a", b"1"), ("b", b"2")], [("shard-x", 1)] * 2, worker_id="w1", gpu_device=0
    )
    b = model_record(
        TOKEN, "m", [("a", b"1"), ("b", b"2")], [("shard-x", 1)] * 2, worker_id="w2", gpu_device=3
    )
    a["parts"][1] = b["parts"][1]
    assert library_check(a) == "ok"
    # The convenience keys absent or null, and unknown keys anywhere.
    record = model_record(TOKEN, THREE[0], THREE[1], kat_ids(3))
    record["model_digest"] = None
    del record["digest_algorithm"]
    record["extra"] = {"anything": 1}
    record["parts"][0]["extra"] = "ignored"
    assert library_check(record) == "ok"
    # An unknown key of a wrong type anywhere is still ignored (only the two conveniences are
    # parsed, at step 3).
    record["extra"] = 5
    record["parts"][1]["model_digest"] = 5
    assert reference_check(record, TOKEN) == library_check(record) == "ok"


def test_error_order() -> None:
    """A bad tag is found before a malformed model_ref; a binding problem before an empty name."""
    record = model_record(TOKEN, THREE[0], THREE[1], kat_ids(3))
    _edited_size(record)
    _not_a_model_ref(record)
    assert reference_check(record, TOKEN) == library_check(record) == "SealVerificationFailed"
    record = model_record(TOKEN, THREE[0], THREE[1], kat_ids(3))
    _empty_name(record)
    _swap(record)
    assert reference_check(record, TOKEN) == library_check(record) == "SealVerificationFailed"
    # A malformed convenience key is found at step 3, before any tag: InvalidInput even with a
    # bad tag, and even as JSON text.
    for malformed in (_model_digest_not_text, _algorithm_not_text):
        record = model_record(TOKEN, THREE[0], THREE[1], kat_ids(3))
        _edited_size(record)
        malformed(record)
        assert reference_check(record, TOKEN) == library_check(record) == "InvalidInput"
        assert library_check(json.dumps(record)) == "InvalidInput"


def test_sealer_refuses_empty_and_repeated_parts(tmp_path: Path) -> None:
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "one.bin").write_bytes(b"1")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one.bin").write_bytes(b"2")
    mgr = VramManager(TOKEN, backend="host")
    try:
        with pytest.raises(InvalidInput):
            mgr.seal_files([tmp_path / "one.bin", tmp_path / "empty.bin"], model_name="m", format="raw")
        with pytest.raises(InvalidInput):
            mgr.seal_files([tmp_path / "one.bin", tmp_path / "d" / "one.bin"], model_name="m", format="raw")
    finally:
        mgr.close()
