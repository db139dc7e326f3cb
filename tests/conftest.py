"""Test-suite set-up shared by every test module.

Without a CUDA GPU, Triton kernels run through Triton's interpreter. ``TRITON_INTERPRET`` is
read when triton is first imported, so it is set here, before any test module imports triton.
On a GPU machine it is left alone: there the kernels are compiled for real.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run `pytest -m gpu` on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_compiler():
    """Nothing compiled before the test leaks into it: no cached Dynamo frames, no old reports."""
    import sparse_compile

    torch._dynamo.reset()
    sparse_compile.clear_reports()
    yield
    torch._dynamo.reset()
