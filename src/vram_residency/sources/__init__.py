"""What gets sealed: model files streamed from disk, framework tensors adopted in place, repair.

Usage::

    with VramManager(token) as mgr:
        shard = mgr.seal_file("model.safetensors")               # one file, one shard
        model = mgr.seal_files("checkpoint-dir/")                # sharded safetensors, one model
        adopted = mgr.seal_tensors(torch_module)                 # weights already on the GPU
        mgr.verify_sealed(shard)                                 # names the tensors that changed
        mgr.repair(shard)                                        # re-copies damaged units only

Manifests of expected digests (``manifest``) are written with ``vram-residency digest
--manifest`` or :func:`build_manifest` and passed as ``manifest=``. Multi-part models use the
``vram-model-v1`` binding described in :mod:`vram_residency.sources.model`.
"""

from vram_residency.sources.files import FileSource
from vram_residency.sources.layout import (
    DEFAULT_MAX_TENSORS,
    MAX_SAFETENSORS_HEADER,
    SAFETENSORS_DTYPES,
    FileLayout,
    SafetensorsEntry,
    SafetensorsHeader,
    open_model_file,
    parse_safetensors_header,
    safetensors_header_size,
)
from vram_residency.sources.manifest import (
    Manifest,
    ManifestEntry,
    build_manifest,
    load_manifest,
    load_openssf_manifest,
    write_manifest,
)
from vram_residency.sources.model import (
    MODEL_DIGEST_NAME,
    ModelPart,
    SealedModel,
    check_model_record,
    model_digest,
)
from vram_residency.sources.repair import RepairReport
from vram_residency.sources.tensors import AdoptedSource

__all__ = [
    "DEFAULT_MAX_TENSORS",
    "MAX_SAFETENSORS_HEADER",
    "MODEL_DIGEST_NAME",
    "SAFETENSORS_DTYPES",
    "AdoptedSource",
    "FileLayout",
    "FileSource",
    "Manifest",
    "ManifestEntry",
    "ModelPart",
    "RepairReport",
    "SafetensorsEntry",
    "SafetensorsHeader",
    "SealedModel",
    "build_manifest",
    "check_model_record",
    "load_manifest",
    "load_openssf_manifest",
    "model_digest",
    "open_model_file",
    "parse_safetensors_header",
    "safetensors_header_size",
    "write_manifest",
]
