"""Shared test fixtures: where the real data lives, and the GPU marker's skip."""

from pathlib import Path

import pytest
import torch

# ../shared/data beside the checkout (see the project README); tests that need it skip with
# this path in their reason when it is absent.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the project expects ../shared/data)")
    return SHARED_DATA
