"""Tensor parallelism: one model over several ranks, one authenticated record, one verdict.

    from vram_residency.distributed import TPModel, check_tp_record

    # in every rank of a torch.distributed group (gloo on CPUs, NCCL on GPUs):
    with VramManager(token, device=local_rank) as mgr:
        part = mgr.seal_file(f"model-rank{rank}-of-{world}.safetensors")
        tp = TPModel.seal(mgr, [part], model_name="llama-70b", token=token)  # one all_gather
        tp.verify()          # every rank verifies its shards, one collective: the same verdict
        record = tp.record.record()                                  # JSON, the same on every rank

    # the orchestrator, holding the same token:
    check_tp_record(record, token)

The record format is ``docs/specs/tp-record-v1.md``. torch is needed for the collective parts
only (the ``distributed`` extra); :func:`check_tp_record` and :class:`MultiDeviceManager` work
without it.
"""

from vram_residency.distributed._collective import VERDICT_BYTES, TPModel, seal_tp, verify_shards
from vram_residency.distributed._decoder import TPByteLM, part_file_name, split_byte_lm
from vram_residency.distributed._errors import RankUnresponsive, TPIncident, TPVerificationFailed
from vram_residency.distributed._multidevice import DeviceVerification, MultiDeviceManager
from vram_residency.distributed._record import (
    TP_RECORD_FORMAT,
    RankPart,
    TPRecord,
    check_tp_record,
    tp_key,
    tp_message,
)

__all__ = [
    "TP_RECORD_FORMAT",
    "VERDICT_BYTES",
    "DeviceVerification",
    "MultiDeviceManager",
    "RankPart",
    "RankUnresponsive",
    "TPByteLM",
    "TPIncident",
    "TPModel",
    "TPRecord",
    "TPVerificationFailed",
    "check_tp_record",
    "part_file_name",
    "seal_tp",
    "split_byte_lm",
    "tp_key",
    "tp_message",
    "verify_shards",
]
