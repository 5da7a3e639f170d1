"""The errors of a tensor-parallel group: which rank failed, and why every rank stopped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vram_residency.errors import VramError

__all__ = ["RankUnresponsive", "TPIncident", "TPVerificationFailed"]


class TPIncident(VramError):
    """The group can no longer trust its model: every rank has moved to Stopped.

    ``rank`` is the rank that raises it; ``failing_ranks`` the ranks found at fault (empty when
    they cannot be known, see :class:`RankUnresponsive`); ``local`` says whether this rank itself
    is one of them (a fine rank stopped because another failed).
    """

    _fatal = True

    def __init__(self, message: str, *, rank: int, failing_ranks: Sequence[int] = ()) -> None:
        self.rank = rank
        self.failing_ranks: tuple[int, ...] = tuple(failing_ranks)
        super().__init__(message)

    @property
    def local(self) -> bool:
        return self.rank in self.failing_ranks


class TPVerificationFailed(TPIncident):
    """One or more ranks' shards failed verification; every rank learns the same verdict.

    ``tensors`` maps each failing rank to the tensors (or ``shard:<id>`` for a shard without a
    tensor index, or whose tag failed) it reported as changed; ``tensor_counts`` how many in all
    (a long list is truncated to fit the fixed-size verdict)."""

    def __init__(
        self,
        message: str,
        *,
        rank: int,
        failing_ranks: Sequence[int],
        tensors: Mapping[int, Sequence[str]],
        tensor_counts: Mapping[int, int],
    ) -> None:
        self.tensors: dict[int, list[str]] = {int(k): list(v) for k, v in tensors.items()}
        self.tensor_counts: dict[int, int] = dict(tensor_counts)
        super().__init__(message, rank=rank, failing_ranks=failing_ranks)


class RankUnresponsive(TPIncident):
    """The verdict collective did not complete within the timeout (a rank died, hung, or its
    network went away): nobody can vouch for the missing rank's shards, so every rank that notices
    stops. ``failing_ranks`` is empty: a collective that fails does not say reliably who is gone."""
