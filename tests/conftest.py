"""Shared test fixtures: where the real data lives, and the GPU marker's rules.

gpu-marked tests are skipped (reason printed) where no CUDA device is visible. Where one is
visible a gpu test that skips anyway (missing data, missing triton) is reported as FAILED: a
run on a GPU machine must never end green with its GPU tests unrun. REPRODUCTION_GPU_TESTS=require
applies that rule without a GPU (for the rule's own test)."""

import os
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]  # tests/test_gpu.py runs the rule above in a scratch pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (see the project README); tests that need it skip with
# this path in their reason when it is absent.
SHARED_DATA = ROOT.parent / "shared" / "data"
# What `python -m reproduction.gpu prepare` builds for a GPU machine, where ../shared is absent.
BUNDLE = ROOT / "gpu-bundle"


def data_dirs() -> list[Path]:
    """Where tests look for a data folder, first hit wins: $REPRODUCTION_TEST_DATA, the
    checkout's gpu-bundle/, ../shared/data."""
    env = os.environ.get("REPRODUCTION_TEST_DATA")
    return ([Path(env)] if env else []) + [BUNDLE, SHARED_DATA]


def find_data(name: str) -> Path | None:
    """The first `data_dirs()` entry that holds `name`, as that path; None if none does."""
    return next((d / name for d in data_dirs() if (d / name).exists()), None)


def gpu_required() -> bool:
    return torch.cuda.is_available() or os.environ.get("REPRODUCTION_GPU_TESTS") == "require"


def pytest_collection_modifyitems(config, items):
    if gpu_required():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and "gpu" in item.keywords and gpu_required() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"gpu test skipped on a machine with a GPU (a failure here): {reason}. "
                           f"Data is looked for in {', '.join(map(str, data_dirs()))}")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the project expects ../shared/data)")
    return SHARED_DATA


@pytest.fixture
def no_tf32():
    """fp32 matmuls and convolutions on CUDA for one test; the process's settings restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
