"""prune_linear_blocks_: every layer the backend runs as a linear is pruned, or named as skipped."""

import warnings

import pytest
import torch
from torch import nn

from sparse_compile.pruning import prune_linear_blocks_


def zero_blocks(weight, blocksize):
    """Number of all-zero ``blocksize`` x ``blocksize`` blocks, written out with loops."""
    rows, cols = weight.shape
    count = 0
    for r in range(0, rows, blocksize):
        for c in range(0, cols, blocksize):
            count += bool((weight[r : r + blocksize, c : c + blocksize] == 0).all())
    return count


def test_transformers_conv1d_is_pruned():
    conv1d_module = pytest.importorskip("transformers.pytorch_utils")
    model = nn.Sequential()
    model.add_module("c_attn", conv1d_module.Conv1D(96, 64))  # weight [in=64, out=96], as in GPT-2
    model.add_module("c_proj", conv1d_module.Conv1D(64, 96))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped: no warning
        pruned = prune_linear_blocks_(model, sparsity=0.5, blocksize=16)
    assert pruned == ["c_attn.weight", "c_proj.weight"]
    # 4x6 = 24 blocks each, half of them zeroed.
    assert zero_blocks(model.c_attn.weight, 16) == 12 and zero_blocks(model.c_proj.weight, 16) == 12


def test_multihead_attention_with_separate_projections():
    attention = nn.MultiheadAttention(64, 2, kdim=32, vdim=48)
    pruned = prune_linear_blocks_(attention, sparsity=0.5, blocksize=16)
    assert pruned == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]
    assert zero_blocks(attention.k_proj_weight, 16) == 4  # 64x32: 8 blocks


class OwnLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32, 32))

    def forward(self, x):
        return nn.functional.linear(x, self.weight)


def test_unknown_layers_are_named():
    model = nn.Sequential(nn.Linear(32, 32), OwnLinear(), nn.Embedding(10, 32))
    with pytest.warns(UserWarning, match=r"not pruned, 2-D weights of other modules: 1 \(OwnLinear\)$"):
        pruned = prune_linear_blocks_(model, sparsity=0.5, blocksize=16)
    assert pruned == ["0.weight"]


def test_nothing_pruned_is_said():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="pruned no layer"):
        assert prune_linear_blocks_(model, sparsity=0.5, blocksize=16) == []
