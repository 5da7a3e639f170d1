"""Shared test configuration.

GPU tests carry ``@pytest.mark.gpu``. Without a GPU they are skipped, unless
``VRAM_RESIDENCY_REQUIRE_GPU=1`` asks for a GPU run: then a missing GPU fails them instead, so a
GPU job can never pass by skipping everything.
"""

from __future__ import annotations

import functools
import os

import pytest


@functools.cache
def _gpu_count() -> int:
    try:
        from cuda.bindings import driver
    except ImportError:
        return 0
    try:
        (err,) = driver.cuInit(0)
    except Exception:  # no driver library at all (cuda-pathfinder raises its own error type)
        return 0
    if err != driver.CUresult.CUDA_SUCCESS:
        return 0
    err, count = driver.cuDeviceGetCount()
    return int(count) if err == driver.CUresult.CUDA_SUCCESS else 0


def gpu_required() -> bool:
    return os.environ.get("VRAM_RESIDENCY_REQUIRE_GPU") == "1"


@pytest.fixture(scope="session")
def gpu_present() -> bool:
    return _gpu_count() > 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _gpu_count() > 0:
        return
    for item in items:
        if "gpu" not in item.keywords:
            continue
        if not gpu_required():
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU on this machine"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "gpu" in item.keywords and gpu_required() and _gpu_count() == 0:
        pytest.fail("VRAM_RESIDENCY_REQUIRE_GPU=1 but no CUDA GPU was found", pytrace=False)
