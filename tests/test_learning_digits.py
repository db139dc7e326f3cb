"""Masks that learn: an MLP on scikit-learn's bundled handwritten digits (8x8, 10 classes, no download).

Measured (torch 2.11 CPU, seed 0, 20 epochs, Adam 1e-2, batch 128, 1347 train / 450 test):
dense 0.973, Supermask 70% (tile 2) 0.971, Bi-Mask 2:4 0.973. The floors below sit a little
under those numbers; run ``pytest tests/test_learning_digits.py -s`` to print them.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_compile.training import apply_nm, apply_supermask, sparsity_summary

sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def digits():
    d = sklearn_datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, perm[:1347], perm[1347:]


def train_and_test(method, digits, epochs=20):
    x, y, tr, te = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    if method == "supermask":
        apply_supermask(model, linear_sparsity=0.7, linear_tile_size=2)
    elif method == "bimask":
        apply_nm(model, 2, 4, perm_every=10, skip_last_layer=True)  # 10 classes: not a multiple of 4
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(tr), generator=gen).split(128):
            b = tr[idx]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[te]).argmax(1) == y[te]).float().mean().item()
    return acc, sparsity_summary(model)


@pytest.mark.slow
def test_sparse_mlps_learn_digits(digits):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead on a shared CPU
    try:
        dense, _ = train_and_test("dense", digits)
        sm, sm_rows = train_and_test("supermask", digits)
        bi, bi_rows = train_and_test("bimask", digits)
    finally:
        torch.set_num_threads(threads)
    print(f"\ndigits test accuracy: dense {dense:.4f}  supermask-70% {sm:.4f}  bimask-2:4 {bi:.4f}")
    # the masks really are at their targets
    assert [round(r["sparsity"], 2) for r in sm_rows] == [0.7, 0.7, 0.69]
    assert [r["sparsity"] for r in bi_rows] == [0.5, 0.5]
    assert dense >= 0.95
    assert sm >= 0.94 and sm >= dense - 0.03
    assert bi >= 0.95 and bi >= dense - 0.03
