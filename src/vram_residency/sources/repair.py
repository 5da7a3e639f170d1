"""Repair: put back only the damaged 1 MiB units of a shard, from a trusted copy of its bytes.

The manager keeps one digest per 1 MiB unit of every shard (``formats.tree``). A repair digests
the device memory again, finds the units whose digest changed, reads just those units from the
source (the shard's file by default), and writes each one back only after its digest matches
the unit digest taken at seal time: a wrong, edited or truncated source can therefore never write
anything but the sealed bytes. Then the shard is verified against its *original* seal (same tag,
same digest); a ``ShardRepaired`` audit event records the ranges.

The seal's tag is checked first: a repair restores bytes to an intact seal; it cannot make an
edited or forged seal good.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from typing_extensions import Buffer

from vram_residency._core import ShardStore, changed_units, merge_ranges
from vram_residency.audit.events import SHARD_REPAIRED
from vram_residency.errors import InvalidInput, NotSealed, SealVerificationFailed
from vram_residency.formats.tree import UNIT_SIZE, hash_units
from vram_residency.shard import SealedShard
from vram_residency.sources.files import FileSource
from vram_residency.sources.layout import open_model_file, pread_exact

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["RepairReport", "RepairSource", "repair"]

RepairSource = str | os.PathLike[str] | Buffer | None


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What a repair rewrote: half-open byte ranges of the shard (empty: nothing was damaged)."""

    shard_id: str
    repaired_ranges: tuple[tuple[int, int], ...]
    repaired_units: int

    @property
    def repaired_bytes(self) -> int:
        return sum(e - s for s, e in self.repaired_ranges)


@contextmanager
def _reader(source: RepairSource, recorded: Any, n: int) -> Iterator[tuple[str, Callable[[int, int], bytes]]]:
    """``(description, read(offset, length))`` over the shard's bytes as the source holds them."""
    if source is None:
        if isinstance(recorded, FileSource):
            source = recorded.path
        else:
            raise InvalidInput(
                "this shard has no recorded source to repair from (it was sealed from memory or "
                "adopted): pass the original bytes or file as source"
            )
    if isinstance(source, (str, os.PathLike)):
        base = recorded.offset if isinstance(recorded, FileSource) else 0
        with open_model_file(source, "raw") as opened:
            if opened.size < base + n:
                raise InvalidInput(
                    f"{opened.path} holds {opened.size} bytes, fewer than the shard's {n} bytes "
                    f"at offset {base}"
                )
            what = str(opened.path)
            yield what, lambda off, length: pread_exact(opened.fd, base + off, length, what)
        return
    try:
        view = memoryview(source).cast("B")
    except (TypeError, ValueError):
        raise InvalidInput(
            f"source must be a path or a contiguous bytes-like object, not {type(source).__name__}"
        ) from None
    try:
        if len(view) != n:
            raise InvalidInput(f"source holds {len(view)} bytes; the shard holds {n}")
        yield "memory", lambda off, length: bytes(view[off : off + length])
    finally:
        view.release()


def _check_source(source: RepairSource, n: int) -> None:
    # What can be known of the source without opening a file, checked before the shard is: a
    # source that could never repair it is refused whether or not the shard is damaged now.
    if source is None or isinstance(source, (str, os.PathLike)):
        return
    try:
        with memoryview(source) as view:
            size = view.nbytes if view.c_contiguous else -1
    except TypeError:
        size = -1
    if size < 0:
        raise InvalidInput(
            f"source must be a path or a contiguous bytes-like object, not {type(source).__name__}"
        )
    if size != n:
        raise InvalidInput(f"source holds {size} bytes; the shard holds {n}")


def repair(store: ShardStore, shard: SealedShard, source: RepairSource = None) -> RepairReport:
    entry = store.lookup(shard)
    _check_source(source, entry.shard.vram_bytes)
    with entry.lock:
        if entry.buf.closed:
            raise NotSealed(f"shard {shard.shard_id!r} was deallocated")
        sealed = entry.shard
        if not store.tag_matches(shard, entry):
            raise SealVerificationFailed(
                f"seal tag of shard {shard.shard_id} does not match its fields; it cannot be repaired",
                shard_id=shard.shard_id,
                tag_valid=False,
            )
        n, algorithm = sealed.vram_bytes, sealed.digest_algorithm
        key = store.digest_key(algorithm, sealed.shard_id)  # nh-fast-v1: the shard's key
        now = store.backend.hash(entry.buf, algorithm, n, key=key)
        if hmac.compare_digest(now.digest.hex(), sealed.digest):
            return RepairReport(sealed.shard_id, (), 0)
        old = entry.unit_digests
        changed = changed_units(old, now.unit_digests)
        with _reader(source, entry.source, n) as (what, read):
            for u in changed:
                start = u * UNIT_SIZE
                length = min(UNIT_SIZE, n - start)
                data = read(start, length)
                # Each unit is written only once it is proven to be the sealed one: a source that
                # differs anywhere in it writes nothing there.
                if hash_units(data, algorithm, key=key).unit(0) != old[32 * u : 32 * u + 32]:
                    raise InvalidInput(
                        f"{what} does not hold the sealed bytes of [{start}, {start + length}); "
                        "not repairing from it"
                    )
                entry.buf.write(start, data)
        store.verify_held(shard, entry)  # the original seal: raises if anything is still wrong
        ranges = tuple(merge_ranges(changed, n))
    store.emit(
        SHARD_REPAIRED,
        shard_id=sealed.shard_id,
        repaired_ranges=[list(r) for r in ranges],
        repaired_units=len(changed),
        repaired_bytes=sum(e - s for s, e in ranges),
        source=what,
    )
    return RepairReport(sealed.shard_id, ranges, len(changed))
