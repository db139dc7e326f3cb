"""Weight analysis: block density and the sparse/dense decision, against hand-written loops."""

import itertools

import pytest
import torch

from sparse_compile.analysis import BLOCK_OVERHEAD, block_density, decide
from sparse_compile.options import SparseOptions
from sparse_compile.pruning import prune_blocks_


def block_density_by_hand(weight, b):
    rows, cols = weight.shape
    blocks = list(itertools.product(range(0, rows, b), range(0, cols, b)))
    nonzero = sum(bool(weight[r : r + b, c : c + b].ne(0).any()) for r, c in blocks)
    return nonzero / len(blocks)


def random_block_sparse(rows, cols, b, keep, dtype=torch.float32):
    """randn weight (never exact zeros) with random whole b x b blocks zeroed."""
    weight = torch.randn(rows, cols, dtype=dtype)
    block_keep = torch.rand(-(-rows // b), -(-cols // b)) < keep
    mask = block_keep.repeat_interleave(b, 0).repeat_interleave(b, 1)[:rows, :cols]
    return weight * mask


@pytest.mark.parametrize("rows, cols, b", [(64, 64, 16), (100, 70, 32), (33, 200, 16), (128, 256, 64)])
@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 1.0])
def test_block_density_matches_hand_loop(rows, cols, b, keep):
    weight = random_block_sparse(rows, cols, b, keep)
    assert block_density(weight, b) == pytest.approx(block_density_by_hand(weight, b))


def test_single_nonzero_makes_a_block_dense():
    weight = torch.zeros(64, 64)
    weight[17, 40] = 0.5
    assert block_density(weight, 32) == pytest.approx(1 / 4)
    assert block_density(weight, 16) == pytest.approx(1 / 16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8])
def test_unsupported_dtype_stays_dense_with_reason(dtype):
    weight = random_block_sparse(64, 64, 16, 0.1).to(dtype)
    decision = decide(weight, SparseOptions())
    assert decision.format == "dense"
    assert str(dtype).removeprefix("torch.") in decision.reason and "float32" in decision.reason


@pytest.mark.parametrize("threshold", [0.4, "auto"])
def test_weight_narrower_than_a_block_is_padded_and_converted(threshold):
    # A 10 x 512 weight at block 16 is one zero-padded block row; 3 of its 32 blocks hold values.
    weight = random_block_sparse(10, 512, 16, 0.0)
    weight[:, [0, 100, 300]] = 1.0
    decision = decide(weight, SparseOptions(blocksize=16, density_threshold=threshold))
    assert decision.format == "bsr" and decision.blocksize == 16
    assert decision.density == pytest.approx(block_density_by_hand(weight, 16)) == pytest.approx(3 / 32)


def test_dense_narrow_weight_says_the_true_reason():
    decision = decide(torch.randn(10, 512), SparseOptions(blocksize=16, density_threshold=0.4))
    # Each format says why it did not take the weight, BSR first.
    assert decision.format == "dense" and decision.reason == (
        "block density 1.00 > threshold 0.40; not 2:4: inputs 0-3 of row 0 hold 4 nonzeros (at most 2 in every 4)"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_threshold(dtype):
    weight = random_block_sparse(128, 128, 32, 0.5, dtype)
    density = block_density_by_hand(weight, 32)
    below = decide(weight, SparseOptions(blocksize=32, density_threshold=density))
    assert below.format == "bsr" and below.blocksize == 32 and below.density == pytest.approx(density)
    above = decide(weight, SparseOptions(blocksize=32, density_threshold=density - 0.01))
    assert above.format == "dense" and "threshold" in above.reason


def test_auto_blocksize_with_a_threshold_picks_lowest_estimated_cost():
    # Sparse in 32-blocks: 16 and 32 see the same density, 64 and 128 see more.
    weight = random_block_sparse(256, 256, 32, 0.3)
    decision = decide(weight, SparseOptions(blocksize="auto", density_threshold=1.0))
    costs = {b: block_density_by_hand(weight, b) * BLOCK_OVERHEAD[b] for b in (16, 32, 64, 128)}
    assert decision.blocksize == min(costs, key=costs.get)


def test_prune_blocks_keeps_the_largest_blocks():
    weight = torch.randn(96, 80)
    original = weight.clone()
    prune_blocks_(weight, 0.75, 16)
    norms = {
        (r, c): original[r : r + 16, c : c + 16].norm().item()
        for r, c in itertools.product(range(0, 96, 16), range(0, 80, 16))
    }
    kept = sorted(norms, key=norms.get)[round(0.75 * len(norms)) :]
    for (r, c) in norms:
        block = weight[r : r + 16, c : c + 16]
        if (r, c) in kept:
            assert torch.equal(block, original[r : r + 16, c : c + 16])
        else:
            assert torch.equal(block, torch.zeros_like(block))
