"""Sealing model files: one file as one shard, a sharded checkpoint as one ``vram-model-v1`` model.

The file's bytes are streamed into the device buffer through bounded staging (``stream``), then
the manager's one sealing path digests the device memory and seals it. The shard's tensor index
holds each tensor's byte range in the file, so a failed verification names the tensors whose
bytes changed, and ``repair`` can re-read only the damaged units from the same file.

A sharded safetensors checkpoint is found through its ``*.safetensors.index.json``: its files
are sealed in sorted name order (the ``-00001-of-0000N`` order), each file's tensors must be
exactly those the index assigns to it (so two files swapped on disk are refused before anything
is allocated), and the seals bind every file's name, size and digest in order (see
``sources.model``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vram_residency._core import ShardStore
from vram_residency.audit.events import VRAM_ALLOCATION_FAILED
from vram_residency.backends.base import DeviceBuffer
from vram_residency.errors import InsufficientVram, InvalidInput
from vram_residency.formats.tree import KEYED_ALGORITHMS, SHA256_TREE_V1, check_algorithm
from vram_residency.shard import SealedShard
from vram_residency.sources.index import ModelFile, PathArg, resolve_model_files
from vram_residency.sources.layout import OpenedFile, open_model_file
from vram_residency.sources.manifest import Manifest, load_manifest
from vram_residency.sources.model import PartSource, SealedModel, seal_parts
from vram_residency.sources.stream import Observer, Progress, Staging, plan_staging, stream_into

__all__ = ["FileSource", "seal_file", "seal_files"]


@dataclass(frozen=True, slots=True)
class FileSource:
    """Where a shard's bytes came from: ``length`` bytes of ``path`` from ``offset``. Kept with
    the shard as its repair source."""

    path: str
    offset: int
    length: int


def _resolve_manifest(manifest: Manifest | PathArg | None) -> Manifest | None:
    if manifest is None or isinstance(manifest, Manifest):
        return manifest
    return load_manifest(manifest)


def _expected_for(
    opened: OpenedFile,
    name: str | None,
    algorithm: str,
    expected_digest: str | None,
    manifest: Manifest | None,
) -> str | None:
    expected = expected_digest.lower() if isinstance(expected_digest, str) else expected_digest
    if manifest is not None and algorithm in KEYED_ALGORITHMS:
        raise InvalidInput(
            f"a manifest records unkeyed digests; {algorithm} is keyed per shard id, chosen at "
            "seal time: seal with sha256-tree-v1 or blake3 to check a file against a manifest"
        )
    if manifest is not None:
        entry = manifest.entry_for(opened.path, name)
        from_manifest = entry.expected(algorithm, manifest_name=manifest.describe())
        if entry.size is not None and entry.size != opened.size:
            raise InvalidInput(
                f"{opened.path} holds {opened.size} bytes but the manifest records {entry.size}; "
                "nothing was sealed"
            )
        if expected is not None and expected != from_manifest:
            raise InvalidInput("expected_digest and the manifest disagree")
        expected = from_manifest
    return expected


def _fill(
    opened: OpenedFile, staging: Staging, progress: Progress | None, observe: Observer | None = None
) -> Callable[[DeviceBuffer], None]:
    def fill(buf: DeviceBuffer) -> None:
        stream_into(
            opened.fd,
            0,
            opened.size,
            buf,
            what=str(opened.path),
            staging=staging,
            progress=progress,
            observe=observe,
        )
        opened.check_unchanged()

    return fill


def _fill_reopened(
    checked: OpenedFile, staging: Staging, progress: Progress | None
) -> Callable[[DeviceBuffer], None]:
    """The fill of a file parsed and closed earlier: reopened only for its own copy, so one model
    file is open at a time. Refused (``InvalidInput``, and seal_parts frees every part) if the
    path now names another file or the file was written since it was parsed (``reopen``), if it
    changes while it streams (``check_unchanged``), or if the header bytes that landed in the
    buffer are not the ones parsed (``check_header``: exact, where timestamps of a coarse
    clock could miss a write in the same tick)."""

    def fill(buf: DeviceBuffer) -> None:
        with checked.reopen() as opened:
            _fill(opened, staging, progress)(buf)
            if opened.layout.header_sha256 is not None:
                opened.check_header(buf.read(0, opened.layout.tensors[0].end))

    return fill


def seal_file(
    store: ShardStore,
    path: PathArg,
    *,
    device: int | None = None,
    format: str = "auto",
    model_ref: str | None = None,
    shard_index: int | None = None,
    total_shards: int | None = None,
    expected_digest: str | None = None,
    manifest: Manifest | PathArg | None = None,
    digest_algorithm: str = SHA256_TREE_V1,
    progress: Progress | None = None,
    staging_bytes: int | None = None,
    staging_buffers: int | None = None,
    observe: Observer | None = None,
) -> SealedShard:
    check_algorithm(digest_algorithm, keyed=True)
    man = _resolve_manifest(manifest)
    with open_model_file(path, format, max_tensors=store.max_tensors) as opened:
        expected = _expected_for(opened, None, digest_algorithm, expected_digest, man)
        backend = store.backend
        staging = Staging(plan_staging(opened.size, staging_bytes, staging_buffers, backend=backend), backend)
        fill = _fill(opened, staging, progress, observe)
        with staging:
            return store.seal_into(
                opened.size,
                fill,
                device=device,
                model_ref=model_ref,
                shard_index=shard_index,
                total_shards=total_shards,
                expected_digest=expected,
                digest_algorithm=digest_algorithm,
                tensors=opened.layout.tensors,
                source=FileSource(str(opened.path.resolve()), 0, opened.size),
            )


def _check_against_index(opened: OpenedFile, mf: ModelFile) -> None:
    if mf.expected_tensors is None:
        return
    have, want = opened.layout.tensor_names, mf.expected_tensors
    if have != want:
        missing, extra = sorted(want - have), sorted(have - want)
        raise InvalidInput(
            f"{opened.path} does not hold the tensors the index assigns to {mf.name!r} "
            f"(missing {missing[:5]}, unexpected {extra[:5]}): wrong or swapped file; nothing was sealed"
        )


def seal_files(
    store: ShardStore,
    paths: PathArg | Sequence[PathArg],
    *,
    device: int | None = None,
    model_name: str | None = None,
    format: str = "auto",
    manifest: Manifest | PathArg | None = None,
    digest_algorithm: str = SHA256_TREE_V1,
    progress: Progress | None = None,
    staging_bytes: int | None = None,
    staging_buffers: int | None = None,
) -> SealedModel:
    check_algorithm(digest_algorithm, keyed=True)
    man = _resolve_manifest(manifest)
    files = resolve_model_files(paths, max_tensors=store.max_tensors)
    if man is not None and man.is_complete_model:
        man.check_file_list([f.name for f in files])
    # Open, parse and check every file first: a missing, unreadable or corrupt file, one the
    # index does not describe, or a model of more than max_tensors tensors, is refused before any
    # device memory is touched. Each is closed again once checked, and reopened for its copy
    # (_fill_reopened): a model of hundreds of files would otherwise hold hundreds of
    # descriptors through the whole seal, and a worker running at its RLIMIT_NOFILE (1024 by
    # default) would fail with EMFILE. What the held descriptor guaranteed, that the bytes
    # sealed are those of the file parsed, is kept by OpenedFile.reopen and check_header.
    opened: list[OpenedFile] = []
    expected: list[str | None] = []
    tensors = 0
    for mf in files:
        with open_model_file(mf.path, format, max_tensors=store.max_tensors) as o:
            _check_against_index(o, mf)
            expected.append(_expected_for(o, mf.name, digest_algorithm, None, man))
        opened.append(o)
        tensors += len(o.layout.tensor_names)
        if tensors > store.max_tensors:
            raise InvalidInput(
                f"the model lists more than {store.max_tensors} tensors in its first {len(opened)} "
                "files (max_tensors; VramManager(max_tensors=...) raises it); nothing was sealed"
            )
    staging: Staging | None = None
    try:
        need = sum(o.size for o in opened)
        store.check_open()
        free = store.backend.mem_info()[0]
        if need > free:
            # Refused before copying any file, rather than after copying all but the last; the
            # audit trail gets the same event as a refused single allocation.
            exc = InsufficientVram(need, free)
            store.emit(
                VRAM_ALLOCATION_FAILED, requested_bytes=need, reason=str(exc), backend=store.backend.name
            )
            raise exc
        # One set of staging buffers, sized for the largest file, serves every file in turn.
        backend = store.backend
        plan = plan_staging(max(o.size for o in opened), staging_bytes, staging_buffers, backend=backend)
        staging = Staging(plan, backend)
        parts = [
            PartSource(
                name=mf.name,
                size=o.size,
                acquire=_allocator(store, o.size),
                fill=_fill_reopened(o, staging, progress),
                tensors=o.layout.tensors,
                source=FileSource(str(o.path.resolve()), 0, o.size),
                expected_digest=e,
            )
            for o, mf, e in zip(opened, files, expected, strict=True)
        ]
        name = model_name or _default_model_name(files)
        expected_m = (
            man.model_digests.get(digest_algorithm) if man is not None and man.is_complete_model else None
        )
        return seal_parts(
            store,
            parts,
            model_name=name,
            digest_algorithm=digest_algorithm,
            device=device,
            expected_model_digest=expected_m,
        )
    finally:
        if staging is not None:
            staging.close()


def _allocator(store: ShardStore, size: int) -> Callable[[str], DeviceBuffer]:
    return lambda shard_id: store.allocate(size, shard_id=shard_id)


def _default_model_name(files: Sequence[ModelFile]) -> str:
    parent = files[0].path.resolve().parent.name
    return parent or files[0].path.stem or "model"
