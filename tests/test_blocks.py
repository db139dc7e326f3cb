"""kernels/common.py: the padded block view every block-sparse file uses, against a hand-written loop."""

import importlib

import pytest
import torch

from sparse_compile.kernels import BsrWeight, block_mask
from sparse_compile.kernels.common import SUPPORTED_DTYPES, block_view
from sparse_compile.pruning import prune_blocks_


def blocks_by_hand(matrix, b):
    rows, cols = matrix.shape
    nb, kb = -(-rows // b), -(-cols // b)
    out = torch.zeros(nb, b, kb, b, dtype=matrix.dtype)
    for i in range(nb):
        for j in range(kb):
            block = matrix[i * b : (i + 1) * b, j * b : (j + 1) * b]
            out[i, : block.shape[0], j, : block.shape[1]] = block
    return out


@pytest.mark.parametrize("rows, cols, b", [(64, 64, 16), (100, 70, 32), (33, 200, 16), (5, 7, 16), (48, 17, 1), (31, 64, 64)])
def test_block_view_matches_hand_loop(rows, cols, b):
    matrix = torch.randn(rows, cols)
    torch.testing.assert_close(block_view(matrix, b), blocks_by_hand(matrix, b), atol=0, rtol=0)


def test_block_view_of_whole_blocks_is_a_view():
    matrix = torch.randn(64, 96)
    blocks = block_view(matrix, 32)
    assert blocks.shape == (2, 32, 3, 32) and blocks.data_ptr() == matrix.data_ptr()
    blocks[1, :, 2, :] = 0
    assert not matrix[32:, 64:].any() and matrix[:32].all()


@pytest.mark.parametrize("rows, cols, b", [(100, 70, 32), (64, 128, 16), (33, 200, 16)])
def test_its_users_agree_with_the_hand_loop(rows, cols, b):
    weight = torch.randn(rows, cols)
    prune_blocks_(weight, 0.5, b)
    by_hand = blocks_by_hand(weight, b)
    keep = by_hand.ne(0).any(dim=3).any(dim=1)
    assert torch.equal(block_mask(weight, b), keep)
    bsr = BsrWeight.from_dense(weight, b)
    assert torch.equal(bsr.to_dense(), weight)
    assert bsr.nnz_blocks == int(keep.sum())
    # prune_blocks_ zeroes the half of the blocks with the smallest norms (by the same view).
    assert int(keep.sum()) == keep.numel() - round(0.5 * keep.numel())


def test_every_kernel_file_reads_one_dtype_list():
    # importlib: the package attributes bsr_linear/masked_linear are the functions of those names.
    files = [importlib.import_module(f"sparse_compile.kernels.{name}") for name in ("bsr_linear", "masked_linear", "semi_structured")]
    assert all(module.SUPPORTED_DTYPES is SUPPORTED_DTYPES for module in files)
