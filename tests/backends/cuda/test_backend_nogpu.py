"""Without a GPU (CI), backend='cuda' fails with a clear ConfigError, never silently."""

from __future__ import annotations

import sys

import pytest

from vram_residency.backends import cuda
from vram_residency.backends.cuda import _driver
from vram_residency.errors import ConfigError


def _has_gpu() -> bool:
    return cuda.available()


@pytest.mark.skipif(_has_gpu(), reason="a CUDA GPU is present here")
def test_open_backend_fails_clearly_without_gpu() -> None:
    with pytest.raises(ConfigError, match=r"backend='cuda' requested but"):
        cuda.open_backend(0)
    assert cuda.available() is False


def test_missing_cuda_bindings_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_driver, "_driver", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", None)
    with pytest.raises(ConfigError, match=r"backend='cuda' requested but the cuda-bindings package"):
        cuda.open_backend(0)
    assert cuda.available() is False


@pytest.mark.parametrize("device", [-1, 1.0, "0", True])
def test_bad_device_argument(device: object) -> None:
    from vram_residency.backends.cuda._backend import CudaBackend

    with pytest.raises(ConfigError):
        CudaBackend(device)  # type: ignore[arg-type]
