"""Test-suite set-up shared by every test module.

Without a CUDA GPU, Triton kernels run through Triton's interpreter. ``TRITON_INTERPRET`` is
read when triton is first imported, so it is set here, before any test module imports triton.
On a GPU machine it is left alone: there the kernels are compiled for real.

GPU tests autotune one config per launch (``SPARSE_COMPILE_MAX_AUTOTUNE_CONFIGS=1``, unless the
environment sets it: ``=0`` tries the whole sets): the whole sets compile every config for every
specialization the tests make, minutes that a GPU session does not have. Every config of the
sets is compiled for sm80 and sm90 by ``tests/test_inspect_kernels.py``, and the benchmarks
autotune and check the whole sets at ViT-B's shapes.
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
def _few_autotune_configs_on_gpu(request, monkeypatch):
    """gpu-marked tests: one autotune config per launch, unless the environment says otherwise."""
    if request.node.get_closest_marker("gpu") is not None:
        from sparse_compile.kernels.autotune_configs import MAX_CONFIGS_ENV  # imports triton: GPU tests only

        if MAX_CONFIGS_ENV not in os.environ:
            monkeypatch.setenv(MAX_CONFIGS_ENV, "1")
    yield


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


#: Modelled ms of the candidates that do not depend on a density: 2:4 does half the math and
#: reads ~56% of the weight bytes; 0.6 of dense is about what 2:4 kernels reach on large layers.
MODELLED_MS = {"dense": 1.0, "2:4": 0.6}


def modelled_timer(requests):
    """A stand-in for real timings (``sparse_compile.measure.timer``): dense takes 1 ms, 2:4
    0.6 ms, BSR ``2 x block density`` ms, so BSR wins below density 0.3 (beating 2:4 too where a
    weight is both). Deterministic, instant."""
    return [
        MODELLED_MS[r.candidate.kind] if r.candidate.kind in MODELLED_MS else 2.0 * r.candidate.density
        for r in requests
    ]


def rewrite_wins_graph_timer(fns, device):
    """A stand-in for the whole-graph check's timer (``sparse_compile.measure.graph_timer``): the
    rewritten graph (first, or alone) 1 ms per call, the plain one 2 ms, so the rewrite is kept."""
    return [[1.0] * 5, [2.0] * 5][: len(fns)]


@pytest.fixture(autouse=True)
def _no_real_timings(monkeypatch, tmp_path_factory):
    """``density_threshold="auto"`` (the default) times kernels and caches the times on disk.
    No test may depend on a timing or on the user's cache: every test gets the modelled timer
    and an empty cache dir of its own; tests of the measuring itself replace both again."""
    from sparse_compile import measure

    monkeypatch.setenv(measure.CACHE_ENV, str(tmp_path_factory.mktemp("timings")))
    monkeypatch.setattr(measure, "timer", modelled_timer)
    monkeypatch.setattr(measure, "graph_timer", rewrite_wins_graph_timer)
    yield
