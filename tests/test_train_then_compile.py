"""The two halves together: masks learned with sparse_compile.training, served by backend="sparse"."""

import copy

import pytest
import torch
from torch import nn

import sparse_compile
from sparse_compile.training import apply_nm, apply_supermask, finalize


pytestmark = pytest.mark.usefixtures("fresh_compiler")


def mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 10))


@pytest.mark.parametrize("finalize_first", [False, True])
def test_supermask_model_compiles_to_bsr(finalize_first):
    model = mlp()
    apply_supermask(model, linear_sparsity=0.9, linear_tile_size=16, skip_last_layer=True)
    # A few steps so that scores and weights are not at their initial values.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 64)).square().mean().backward()
        optimizer.step()
    model.eval()
    if finalize_first:
        finalize(model)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
        compiled = torch.compile(model, backend="sparse", fullgraph=True, options={"blocksize": 16})
        out = compiled(x)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    report = sparse_compile.report(compiled)
    formats = [layer.format for layer in report.layers]
    assert formats == ["bsr", "bsr", "dense"], str(report)
    # Tile 16 at 90% sparsity: about 10% of the 16x16 blocks remain.
    assert all(layer.density <= 0.15 for layer in report.sparse_layers)


def test_nm_model_runs_2_4_not_bsr():
    # 2:4 masks are fine-grained: every 16x16 block keeps nonzeros, so BSR would not pay; the
    # 2:4 format takes them. Compiled with the Bi-Mask parametrization still registered (the
    # finalized path: test_semi_structured_backend.py).
    model = mlp()
    apply_nm(model, 2, 4, mode="bidirectional", skip_last_layer=True)
    model.eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
        compiled = torch.compile(model, backend="sparse", options={"blocksize": 16})
        out = compiled(x)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    report = sparse_compile.report(compiled)
    assert [layer.format for layer in report.layers] == ["2:4", "2:4", "dense"], str(report)
    assert "no block to skip" in report.layers[2].reason
